"""`memfree demo`: one self-contained HTML page that shows the problem and the cure on the testbed.

For every prompt: the first-step detection score and verdict, the prompt's words coloured by how much each
drives memorization, the generation without memfree and with its default mitigation (AMG) from the same seed,
and the nearest training image of each with its similarity (nL2, or the
testbed's copy detector where it has one). At the top, a summary of the whole page.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from memfree.explain import explain
from memfree.images import to_uint8
from memfree.io import write_text
from memfree.mitigate import default_indexes, generate
from memfree.model import Model
from memfree.similarity import NL2_THRESHOLD
from memfree_testbed.bundle import Testbed, load_testbed
from memfree_testbed.probe import accuracy

SECTIONS = (("verbatim", 8, "Verbatim: one photo under one caption, {n} times in training"),
            ("image_dup", 4, "Image duplication: one face under {n} different captions"),
            ("caption_dup", 4, "Caption duplication: one caption over {n} images sharing a layout"),
            ("paraphrase", 4, "Paraphrases of verbatim captions"),
            ("heldout", 8, "Held-out prompts: compositions never trained on"))
MITIGATION = "amg"

STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{padding:4px 8px;vertical-align:middle}"
         "table{border-collapse:collapse}tr{border-bottom:1px solid #ddd}.mem{color:#b00;font-weight:bold}"
         ".ok{color:#070}.word{padding:0 2px;border-radius:3px}.note{color:#555;font-size:90%}"
         "img{image-rendering:pixelated}")


def _per_item(manifest: dict, kind: str) -> int:
    """Training items per planted photo, face or caption of ``kind``, read from the data's counts."""
    if kind == "caption_dup":   # one caption per group, each group many distinct images
        return manifest["counts"][kind] // max(len(manifest["eval"][kind]), 1)
    unique = sum(u["kind"] == kind for u in manifest["unique"])
    return manifest["counts"].get(kind, 0) // max(unique, 1)


def _png(img: np.ndarray | torch.Tensor, scale: int = 3, cls: str = "") -> str:
    if isinstance(img, torch.Tensor):
        img = to_uint8(img)
    im = Image.fromarray(img)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f'<img class="{cls}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _coloured_words(words: list[str], significance: list[float], scale: float | None) -> str:
    """The prompt's words on a red background, full red where deleting the word lowers the detection score by
    ``scale`` (the calibrated threshold) or more; so an ordinary prompt's words stay pale."""
    top = scale if scale else max(max(significance, default=0.0), 1e-12)
    return " ".join(f'<span class="word" title="{s:.3f}" style="background:rgba(220,0,0,'
                    f'{min(1.0, max(0.0, s / top)):.2f})">{html.escape(w)}</span>' for w, s in zip(words, significance))


def judge(tb: Testbed, images: torch.Tensor) -> tuple[list[int], list[bool], list[str]]:
    """Each image's nearest training image, the testbed's verdict, and a label: by the testbed's learned copy
    detector (cosine above its threshold) when it has one, else by nL2 < 1.4 on pixels."""
    if tb.copy_index is not None:
        sim, near = tb.copy_index.search(tb.copy_index.embedder(images), 1)
        ids = [int(tb.copy_index.ids[int(j)]) for j in near[:, 0]]
        hit = [bool(c > tb.copy_threshold) for c in sim[:, 0]]
        return ids, hit, [f"cosine {float(c):.2f}" for c in sim[:, 0]]
    found = tb.index.search(images)
    return ([int(i) for i in found.ids], [bool(m) for m in found.memorized],
            [f"nL2 {float(d):.2f}" for d in found.nl2])


def _verdict(label: str, memorized: bool) -> str:
    return f"<span class='{'mem' if memorized else 'ok'}'>{label} {'memorized' if memorized else 'novel'}</span>"


def run_demo(model: Model, out_dir: str | Path, seed: int = 0, progress: bool = True,
             sizes: dict[str, int] | None = None, mitigation: str = MITIGATION) -> dict:
    """Generate every section's prompts without and with ``mitigation`` (image i from seed + i in both) and write
    ``out_dir/index.html``; ``sizes`` overrides how many prompts each section shows. Returns the summary."""
    t0 = time.perf_counter()
    tb = load_testbed(model)
    indexes = default_indexes(model)
    threshold = model.settings.threshold
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    body: list[str] = []
    seconds = {"none": 0.0, mitigation: 0.0}
    sections = [(name, (sizes or {}).get(name, n), title) for name, n, title in SECTIONS]
    sections = [sec for sec in sections if sec[1] > 0]   # a size of 0 leaves the section out
    scale = max(1, 96 // tb.images.shape[1])   # thumbnails about 96 pixels wide: ×3 at 32×32, ×1 at 64×64
    for name, n, title in tqdm(sections, desc="demo", unit="section", disable=not progress):
        entries = tb.eval_sets[name][:n]
        prompts = [e["prompt"] for e in entries]
        base = generate(model, prompts, "none", seed=seed, progress=False)
        cured = generate(model, prompts, mitigation, seed=seed, index=indexes, progress=False)
        seconds["none"] += base.seconds
        seconds[mitigation] += cured.seconds
        (ids_base, mem_base, label_base), (ids_cured, mem_cured, label_cured) = judge(tb, base.images), judge(
            tb, cured.images)
        row = {"prompts": len(prompts), "memorized_without": float(np.mean(mem_base)),
               "memorized_with": float(np.mean(mem_cured))}
        if name == "heldout":
            attrs = [e["attrs"] for e in entries]
            row["alignment_without"] = accuracy(tb.probe.predict(base.images), attrs)["mean"]
            row["alignment_with"] = accuracy(tb.probe.predict(cured.images), attrs)["mean"]
        summary[name] = row
        body.append(f"<h2 id='{name}'>{html.escape(title.format(n=_per_item(tb.manifest, name)))}</h2>"
                    "<table><tr><th>prompt (words coloured by significance)</th><th>detection</th>"
                    "<th>training image</th><th>without memfree</th><th>its nearest training image</th>"
                    f"<th>with memfree ({html.escape(mitigation)})</th><th>its nearest training image</th></tr>")
        for i, e in enumerate(entries):
            ex = explain(model, e["prompt"], seed=seed + i)
            score = base.reports[i].score_before
            flagged = threshold is not None and score > threshold
            verdict = "uncalibrated" if threshold is None else ("MEMORIZED" if flagged else "ok")
            planted = sorted(set([e["image"]] if "image" in e else e.get("images", [])))
            left = _png(tb.images[planted[0]], scale) if planted else "<i>none (novel composition)</i>"
            untouched = not cured.reports[i].applied and torch.equal(cured.images[i], base.images[i])
            note = ("<div class='note'>bit-identical to the generation without memfree: AMG's gate never fired"
                    "</div>" if untouched else "")
            body.append(
                f"<tr class='row'><td>{_coloured_words(ex.words, ex.significance, threshold)}</td>"
                f"<td class='{'mem' if flagged else 'ok'}'>{score:.3f} {verdict}</td><td>{left}</td>"
                f"<td>{_png(base.images[i], scale, 'without')}<br>{_verdict(label_base[i], mem_base[i])}</td>"
                f"<td>{_png(tb.images[ids_base[i]], scale)}</td>"
                f"<td>{_png(cured.images[i], scale, 'with')}<br>{_verdict(label_cured[i], mem_cured[i])}{note}</td>"
                f"<td>{_png(tb.images[ids_cured[i]], scale)}</td></tr>")
        body.append("</table>")
    ratio = seconds[mitigation] / max(seconds["none"], 1e-9)
    criterion = (f"the testbed's copy detector gives its nearest training image a cosine above {tb.copy_threshold:.3f}"
                 if tb.copy_index is not None else
                 f"its nearest training image has nL2 &lt; {NL2_THRESHOLD} (AMG's normalised ℓ2)")
    head = ["<!doctype html><meta charset='utf-8'><title>memfree demo</title>", f"<style>{STYLE}</style>",
            "<h1>memfree on its testbed: what the model copies, and what memfree does about it</h1>",
            f"<p>Model <code>{html.escape(model.label)}</code>, {type(model.scheduler).__name__} "
            f"{model.settings.num_inference_steps} steps, guidance {model.settings.guidance_scale}, image i of each "
            f"section from seed {seed} + i, without memfree and with <code>{html.escape(mitigation)}</code>. A "
            f"generation is memorized when {criterion}. Detection is Wen et al.'s first-step score against the model's calibrated threshold"
            f"{'' if threshold is None else f' ({threshold:.3f})'}; a word's colour is how much the score falls "
            "when it is deleted (full red: by the threshold or more).</p>", _summary_table(summary, ratio, mitigation)]
    total = time.perf_counter() - t0
    page = "\n".join(head + body + [f"<p class='note'>Made in {total:.1f} s.</p>"])
    write_text(out_dir / "index.html", page)
    return {"html": str(out_dir / "index.html"), "seconds": round(total, 1), "sets": summary,
            "time_ratio": ratio}


def _summary_table(summary: dict[str, dict], ratio: float, mitigation: str) -> str:
    rows = "".join(f"<tr><td>{name}</td><td>{s['prompts']}</td><td>{s['memorized_without']:.0%}</td>"
                   f"<td>{s['memorized_with']:.0%}</td></tr>" for name, s in summary.items())
    held = summary.get("heldout")
    align = ("" if held is None else f"<p>Held-out alignment (the probe's attribute accuracy): "
             f"<b>{held['alignment_without']:.3f}</b> without memfree, <b>{held['alignment_with']:.3f}</b> with.</p>")
    return (f"<h2 id='summary'>Summary</h2><table id='summary-table'><tr><th>prompt kind</th><th>prompts</th>"
            f"<th>memorized without memfree</th><th>memorized with {html.escape(mitigation)}</th></tr>{rows}</table>"
            f"{align}<p>Time with memfree: <b>{ratio:.2f}×</b> the time without (this page's generations).</p>")
