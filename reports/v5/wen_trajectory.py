"""Where along the trajectory do `wen`'s copies come back? Per-step scores after the spec's `wen`.

For the benchmark's verbatim generations (prompt i, seed 1000·s + i, s = 0..3) this optimises the
embedding as `wen` does (target = the calibrated threshold, 10 iterations), samples from the same x_T,
and prints, for the generations that reached the target, the mean ‖ε_c − ε_u‖₂ at chosen steps for
those that still copied and those that did not, with `none` beside them. One JSON object on stdout.
Usage: .venv/bin/python reports/v5/wen_trajectory.py [MODEL]   (about 5 min on 2 cores)
"""
from __future__ import annotations

import json
import sys

import numpy as np

from memfree.mitigate import optimise_embeddings
from memfree.model import load
from memfree.sampling import initial_noise, sample
from memfree.testbed.bundle import load_testbed

model = load(sys.argv[1] if len(sys.argv) > 1 else None)
tb = load_testbed(model)
prompts = tb.prompts("verbatim")
threshold = model.defaults["detection"]["threshold"]
steps_shown = [0, 1, 2, 3, 5, 10, 20, 30, 49]
rows = {"none": [], "wen": []}
for s in range(4):
    seeds = [1000 * s + i for i in range(len(prompts))]
    x_T = initial_noise(model, seeds)
    embeds = model.encode(prompts).float()
    optimised, _, last = optimise_embeddings(model, embeds, x_T, threshold)
    for name, e in (("none", embeds), ("wen", optimised)):
        out = sample(model, prompts, seeds, latents=x_T, prompt_embeds=e, progress=False)
        nn = tb.index.search(out.images)
        for i in range(len(prompts)):
            rows[name].append({"copied": bool(nn.memorized[i]), "reached": last[i] < threshold,
                               "scores": out.scores[i].tolist()})


def curve(sel: list[dict]) -> list[float] | None:
    if not sel:
        return None
    return [round(float(np.mean([r["scores"][k] for r in sel])), 4) for k in steps_shown]


wen_reached = [r for r in rows["wen"] if r["reached"]]
summary = {"threshold": threshold, "steps": steps_shown,
           "none_copied": curve([r for r in rows["none"] if r["copied"]]),
           "wen_reached_copied": curve([r for r in wen_reached if r["copied"]]),
           "wen_reached_clean": curve([r for r in wen_reached if not r["copied"]]),
           "wen_missed": curve([r for r in rows["wen"] if not r["reached"]]),
           "counts": {"none_copied": sum(r["copied"] for r in rows["none"]), "wen_reached": len(wen_reached),
                      "wen_reached_copied": sum(r["copied"] for r in wen_reached),
                      "wen_copied": sum(r["copied"] for r in rows["wen"])}}
print(json.dumps(summary, indent=1))
