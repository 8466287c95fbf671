"""Where along the trajectory do `wen`'s copies come back? Per-step detection scores after wen's optimisation.

For the benchmark's verbatim generations (prompt i, seed 1000·s + i, s = 0..3) this optimises every prompt
embedding as `wen` does (target = ``--target-scale`` x the calibrated threshold, 1.0 by default as in the
measured file; lr 0.05, 10 iterations; unlike the `wen` mitigation it optimises every prompt, not only the
flagged ones), samples from the same x_T, and reports the mean ‖ε_c − ε_u‖₂ at chosen steps for the
generations that reached the target and still copied, those that reached it and did not, those that missed
it, and the `none` generations that copied. One JSON object on stdout.

It produced docs/results/v6/wen-trajectory.json (and v5's before it):

    python experiments/wen_trajectory.py > docs/results/v6/wen-trajectory.json
"""
import json

import numpy as np

from common import experiment_parser, open_testbed
from memfree.mitigate.wen import optimise_embeddings
from memfree.sampling import initial_noise, sample

STEPS_SHOWN = [0, 1, 2, 3, 5, 10, 20, 30, 49]

parser = experiment_parser(__doc__)
parser.add_argument("--set", dest="prompt_set", default="verbatim", help="prompt set (default: verbatim)")
parser.add_argument("--seeds", type=int, default=4, help="seed rounds s = 0..N-1, seed 1000·s + i (default: 4)")
parser.add_argument("--target-scale", type=float, default=1.0,
                    help="target as a fraction of the calibrated threshold (default: 1.0, the threshold)")
parser.add_argument("--max-iters", type=int, default=10, help="optimiser steps at most (default: 10)")
args = parser.parse_args()

model, tb = open_testbed(args.model)
prompts = tb.prompts(args.prompt_set)
threshold = model.settings.threshold
if threshold is None:
    parser.error(f"{model.label} has no calibrated threshold: run `memfree calibrate` first")
target = args.target_scale * threshold
steps_shown = [k for k in STEPS_SHOWN if k < model.settings.num_inference_steps]
rows = {"none": [], "wen": []}
for s in range(args.seeds):
    seeds = [1000 * s + i for i in range(len(prompts))]
    x_T = initial_noise(model, seeds)
    embeds = model.encode(prompts).float()
    optimised, _, last = optimise_embeddings(model, embeds, x_T, target, max_iters=args.max_iters)
    for name, e in (("none", embeds), ("wen", optimised)):
        out = sample(model, prompts, seeds, latents=x_T, prompt_embeds=e, progress=False)
        nn = tb.index.search(out.images)
        for i in range(len(prompts)):
            rows[name].append({"copied": bool(nn.memorized[i]), "reached": last[i] < target,
                               "scores": out.scores[i].tolist()})


def curve(sel: list[dict]) -> list[float] | None:
    """Mean score at each shown step over the chosen generations (None when there are none)."""
    if not sel:
        return None
    return [round(float(np.mean([r["scores"][k] for r in sel])), 4) for k in steps_shown]


wen_reached = [r for r in rows["wen"] if r["reached"]]
summary = {"threshold": threshold, "target": target, "steps": steps_shown,
           "none_copied": curve([r for r in rows["none"] if r["copied"]]),
           "wen_reached_copied": curve([r for r in wen_reached if r["copied"]]),
           "wen_reached_clean": curve([r for r in wen_reached if not r["copied"]]),
           "wen_missed": curve([r for r in rows["wen"] if not r["reached"]]),
           "counts": {"none_copied": sum(r["copied"] for r in rows["none"]), "wen_reached": len(wen_reached),
                      "wen_reached_copied": sum(r["copied"] for r in wen_reached),
                      "wen_copied": sum(r["copied"] for r in rows["wen"])}}
print(json.dumps(summary, indent=1))
