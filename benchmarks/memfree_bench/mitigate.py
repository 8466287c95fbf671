"""`memfree bench mitigate`: MemBench-style comparison of mitigations on the testbed.

For every method and prompt set (the planted kinds, their paraphrases, held-out ordinary prompts),
each prompt is generated with several seeds through :func:`memfree.mitigate.generate`. Per row:

* ``memorization_rate``: share of generations whose nearest training image has nL2 < 1.4;
* ``top5_similarity`` / ``top1_similarity``: mean of the top 5% and the maximum of the similarity
  s = 1 − nL2/2 (1 for an exact copy, 0 for "no closer than the crowd"; the memorization threshold
  nL2 = 1.4 is s = 0.3). It plays the part of MemBench's SSCD similarity;
* ``alignment``: on held-out prompts, the probe's attribute accuracy (our CLIP score). On trigger
  prompts, which no attribute describes, the cosine similarity of the probe's features to the mean
  features of the training images of the prompt's own kind (photos, faces, or the template group):
  it asks "is this the kind of picture the caption calls for", not "is it the copy";
* ``frechet``: Fréchet distance between the probe features (256-d) of the generations and of the
  training images of the same kind (the ordinary images for held-out prompts), a stand-in for FID;
* ``seconds_per_image`` and ``overhead_ratio`` (against ``none`` on the same set, same run).

Rows are appended to the JSON file as they finish; running again with the same file resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memfree.guidance import AMG_METHODS
from memfree.mitigate import METHODS, default_indexes, generate
from memfree.model import Model
from memfree_testbed.bundle import Testbed, load_testbed
from memfree_testbed.probe import accuracy
from memfree.images import from_uint8
from memfree.io import atomic_write, write_json
from memfree.similarity import NL2_THRESHOLD, similarity_from_nl2

SETS = ("verbatim", "image_dup", "caption_dup", "paraphrase", "heldout")
DEFAULT_METHODS = ("none", "wen", "rta", "rna", "gni", "cwr", "amg", "amg-strong")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    root = np.real(root[0] if isinstance(root, tuple) else root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def _kind_images(tb: Testbed, name: str, entry: dict) -> list[int]:
    """Training image ids that define what a prompt of set ``name`` should look like."""
    unique = tb.manifest["unique"]
    if name == "heldout":
        return [u["id"] for u in unique if u["kind"] == "ordinary"]
    if name == "caption_dup":
        return list(entry["images"])
    kind = "verbatim" if name in ("verbatim", "paraphrase") else name
    return [u["id"] for u in unique if u["kind"] == kind]


def _features(tb: Testbed, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([tb.probe.features(images[i:i + 256]) for i in range(0, len(images), 256)])


def trigger_alignment(tb: Testbed, name: str, owners: list[dict], feats: torch.Tensor) -> list[float]:
    """Per image of a trigger set: cosine of its probe features to the mean features of the planted
    images its prompt belongs to (``owners[i]`` is image i's eval entry)."""
    cos, centres = [], {}
    for e, f in zip(owners, feats):
        ids = tuple(_kind_images(tb, name, e))
        if ids not in centres:
            centres[ids] = _features(tb, from_uint8(tb.images[list(ids)])).mean(0)
        cos.append(float(torch.nn.functional.cosine_similarity(f, centres[ids], dim=0)))
    return cos


def evaluate_method(model: Model, tb: Testbed, method: str, name: str, seeds: list[int], limit: int | None = None,
                    **kwargs) -> dict:
    """One row: generate every prompt of a set (its first ``limit`` ones) with every seed under ``method`` and
    score it."""
    entries = tb.eval_sets[name][:limit]
    images, reports, seconds = [], [], 0.0
    for s in seeds:  # one request per seed: prompt i gets seed s·1000 + i, the same for every method
        g = generate(model, [e["prompt"] for e in entries], method, seed=s * 1000, progress=False, **kwargs)
        images.append(g.images), reports.extend(g.reports)
        seconds += g.seconds
    images = torch.cat(images)
    owners = [e for _ in seeds for e in entries]
    nl2 = tb.index.search(images).nl2
    sim = similarity_from_nl2(nl2).sort(descending=True).values
    top = max(1, int(round(0.05 * len(sim))))
    feats = _features(tb, images)
    if name == "heldout":
        alignment = accuracy(tb.probe.predict(images), [e["attrs"] for e in owners])["mean"]
    else:
        alignment = float(np.mean(trigger_alignment(tb, name, owners, feats)))
    ref_ids = sorted({i for e in entries for i in _kind_images(tb, name, e)})
    ref = _features(tb, from_uint8(tb.images[ref_ids])).numpy()
    applied = [r for r in reports if r.applied]
    if tb.copy_index is not None:   # a model with a learned copy detector: its verdict beside nL2's
        cos, _ = tb.copy_index.search(tb.copy_index.embedder(images), 1)
        by_cosine = {"memorization_rate_cosine": float((cos[:, 0] > tb.copy_threshold).float().mean()),
                         "top1_cosine": float(cos[:, 0].max())}
    else:
        by_cosine = {}
    return {
        "method": method, "prompt_set": name, "prompts": len(entries), "generations": len(images),
        "memorization_rate": float((nl2 < NL2_THRESHOLD).float().mean()), **by_cosine,
        "top5_similarity": float(sim[:top].mean()), "top1_similarity": float(sim[0]),
        "alignment": alignment, "frechet": frechet_distance(feats.numpy(), ref),
        "seconds_per_image": seconds / len(images),
        "applied_rate": len(applied) / len(reports),
        "score_before": float(np.mean([r.score_before for r in reports])),
        "score_after": float(np.mean([r.score_after for r in reports])),
        "mean_iterations": float(np.mean([r.iterations for r in applied])) if applied else 0.0,
        **_amg_stats(reports),
    }


def _amg_stats(reports: list) -> dict:
    """For AMG rows: similarity checks per image (what the cadence and the screen save), the share of
    images each term fired on, and the share screened out by the detection score."""
    logs = [r.extra["amg"] for r in reports if "amg" in r.extra]
    if not logs:
        return {}
    return {"checks_per_image": float(np.mean([g["checked_steps"] for g in logs])),
            "screened_rate": float(np.mean([g["screened_out"] for g in logs])),
            "fired_rate": {t: float(np.mean([bool(g["fired_steps"][t]) for g in logs])) for t in ("spe", "dup", "sim")}}


def run_bench(model: Model, json_out: str | Path, methods=DEFAULT_METHODS, sets=SETS, seeds=(0, 1, 2, 3),
              plot: str | Path | None = None, progress: bool = True, options: dict[str, dict] | None = None,
              limit: int | None = None) -> dict:
    """Run (or resume) the benchmark; rows already in ``json_out`` for the same settings are kept.
    ``options`` maps a method to its options (``{"wen": {"target_scale": 1.0}}``); ``limit`` takes the first
    prompts of each set only (`memfree demo` shows the first 4 or 8)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    tb = load_testbed(model)
    options = {m: dict(o) for m, o in (options or {}).items()}
    index = default_indexes(model) if any(m in AMG_METHODS for m in methods) else None
    json_out = Path(json_out)
    settings = {"seeds": list(seeds), "num_inference_steps": model.settings.num_inference_steps,
                "guidance_scale": model.settings.guidance_scale, "threshold": model.settings.threshold,
                "options": options, **({"limit": limit} if limit is not None else {})}
    result = {"settings": settings, "rows": []}
    if json_out.exists():
        old = json.loads(json_out.read_text())
        if old.get("settings") == settings:
            result = old
    done = {(r["method"], r["prompt_set"]) for r in result["rows"]}
    todo = [(m, s) for s in sets for m in (["none"] + [m for m in methods if m != "none"]) if (m, s) not in done]
    for m, s in tqdm(todo, desc="bench mitigate", disable=not progress):
        kwargs = {**({"index": index} if m in AMG_METHODS else {}), **options.get(m, {})}
        result["rows"].append(evaluate_method(model, tb, m, s, list(seeds), limit, **kwargs))
        _ratios(result["rows"])
        write_json(json_out, result)
    _ratios(result["rows"])
    write_json(json_out, result)
    if plot:
        plot_rows(result["rows"], plot)
    return result


def _ratios(rows: list[dict]) -> None:
    base = {r["prompt_set"]: r["seconds_per_image"] for r in rows if r["method"] == "none"}
    for r in rows:
        b = base.get(r["prompt_set"])
        r["overhead_ratio"] = r["seconds_per_image"] / b if b else None


def format_table(rows: list[dict]) -> str:
    """A Markdown table, one line per method and prompt set."""
    cosine = any("memorization_rate_cosine" in r for r in rows)
    head = ("| method | prompt set | memorized | " + ("copies (detector) | " if cosine else "") +
            "top-5% sim | top-1 sim | alignment | Fréchet | applied | s/image | × none |")
    lines = [head, "|" + "---|" * (11 if cosine else 10)]
    for r in sorted(rows, key=lambda r: (SETS.index(r["prompt_set"]) if r["prompt_set"] in SETS else 99,
                                         list(METHODS).index(r["method"]) if r["method"] in METHODS else 99)):
        ratio = "" if r.get("overhead_ratio") is None else f"{r['overhead_ratio']:.2f}"
        detector = f"{r['memorization_rate_cosine']:.3f} | " if cosine else ""
        lines.append(f"| {r['method']} | {r['prompt_set']} | {r['memorization_rate']:.3f} | {detector}{r['top5_similarity']:.3f} "
                     f"| {r['top1_similarity']:.3f} | {r['alignment']:.3f} | {r['frechet']:.2f} | {r.get('applied_rate', 0):.2f} "
                     f"| {r['seconds_per_image']:.3f} | {ratio} |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str | Path) -> None:
    """Top-5% similarity against alignment, one marker per method, one panel per prompt set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = [s for s in SETS if any(r["prompt_set"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3.2), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for r in rows:
            if r["prompt_set"] == s:
                ax.scatter(r["alignment"], r["top5_similarity"], label=r["method"])
                ax.annotate(r["method"], (r["alignment"], r["top5_similarity"]), fontsize=7)
        ax.axhline(0.3, color="grey", lw=0.5, ls="--")
        ax.set_title(s), ax.set_xlabel("alignment"), ax.set_ylabel("top-5% similarity")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
