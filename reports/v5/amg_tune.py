"""Tune AMG's image_dup alignment on captions the benchmark never uses.

Each of v5's ten duplicated faces is trained under 20 captions; the benchmark's image_dup set uses 2
of them. This script takes the next 4 training captions of every face (40 prompts, none in any eval
set) with seeds 5000 + i and 6000 + i (the benchmark uses 0-3), so what is tuned here is not what the
benchmark measures. Per configuration: memorization (nL2 < 1.4 to any training image), alignment as
`bench mitigate` scores it, and the paired difference to `none` in points with a bootstrap interval
over prompts. One JSON line per configuration, with the full resolved configuration, is appended to
reports/v5/amg-tune.jsonl. Measured 2026-12-01 as overrides on the preset of the time (three terms,
c1 = c2 = 3): that preset -2.47 points; c1 = c2 = 0.25 -1.61; dissimilarity only -1.51 (the preset
now); lower c3 or other grids worse. '{}' now means the dissimilarity-only preset.
Usage: .venv/bin/python reports/v5/amg_tune.py '{"c3": 150}' '{"grid": 0}' ...   ({} is the preset)"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

import memfree
from memfree.bench.mitigate import _features, trigger_alignment
from memfree.guidance import config_for
from memfree.mitigate import default_index, generate
from memfree.testbed.bundle import load_testbed

OUT = Path(__file__).with_name("amg-tune.jsonl")
SEEDS = (5000, 6000)

model = memfree.load()
tb = load_testbed(model)
index = default_index(model)
used = {e["prompt"] for entries in tb.eval_sets.values() for e in entries}
by_face: dict[int, list[str]] = {}
for t in tb.manifest["train"]:
    if t["kind"] == "image_dup" and t["caption"] not in used:
        by_face.setdefault(t["image"], []).append(t["caption"])
prompts = [c for face in sorted(by_face) for c in by_face[face][:4]]
owners = [{"prompt": p} for p in prompts]


def run(method: str, overrides: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(seeds, prompts) alignment and nL2, and the share of images the dissimilarity term fired on."""
    align, nl2, fired = np.zeros((len(SEEDS), len(prompts))), np.zeros((len(SEEDS), len(prompts))), []
    for a, s in enumerate(SEEDS):
        kw = {"train_index": index, "amg": overrides} if method != "none" else {}
        g = generate(model, prompts, method, seed=s, index=tb.index, progress=False, **kw)
        align[a] = trigger_alignment(tb, "image_dup", owners, _features(tb, g.images))
        nl2[a] = [r.nl2 for r in g.reports]
        fired += [bool(r.extra["amg"]["fired_steps"]["sim"]) for r in g.reports if "amg" in r.extra]
    return align, nl2, {"fired_rate": float(np.mean(fired)) if fired else 0.0}


base, base_nl2, _ = run("none", {})
print(f"none: memorized {np.mean(base_nl2 < 1.4):.3f}, alignment {base.mean():.4f}", flush=True)
for arg in sys.argv[1:] or ["{}"]:
    overrides = json.loads(arg)
    align, nl2, stats = run("amg", overrides)
    diff = align - base
    rng = np.random.default_rng(0)
    boot = [diff[:, rng.integers(0, diff.shape[1], diff.shape[1])].mean() for _ in range(5000)]
    config = {k: v for k, v in asdict(config_for("amg", "l2", **overrides)).items()
              if k in ("c1", "c2", "c3", "lam_lo", "lam_hi", "terms", "check_every", "grid")}
    row = {"config": config, "generations": int(diff.size),
           "none_memorized": float(np.mean(base_nl2 < 1.4)), "memorized": float(np.mean(nl2 < 1.4)),
           "min_nl2": round(float(nl2.min()), 3), "none_alignment": round(float(base.mean()), 4),
           "alignment": round(float(align.mean()), 4), "difference_points": round(100 * float(diff.mean()), 2),
           "ci95_points": [round(100 * float(np.percentile(boot, q)), 2) for q in (2.5, 97.5)], **stats}
    print(json.dumps(row), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
