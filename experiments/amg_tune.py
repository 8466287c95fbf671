r"""Tune AMG's alignment on image-duplicate captions that the benchmark never uses.

Each duplicated face of the testbed is trained under many captions; the benchmark's image_dup set uses a
few of them. This takes the next ``--per-face`` training captions of every face that are in no evaluation
set, with seeds 5000 + i and 6000 + i (the benchmark's are 0, 1000, 2000 and 3000 + i), so what is tuned
here is not what the benchmark measures. Per AMG configuration (overrides of the `amg` preset, any
AMGConfig field): the share memorized (nL2 < 1.4 to any training image), alignment as `memfree bench
mitigate` scores a trigger set (cosine of the probe features to the mean features of the planted faces),
and the paired difference to `none` in points with a 95% bootstrap interval over prompts. One JSON line per
configuration on stdout, with the resolved configuration; the `none` baseline goes to stderr.

It produced docs/results/v5/amg-tune.jsonl, with the preset of the time (its rows name their full
configuration); '{}' now means today's dissimilarity-only preset:

    python experiments/amg_tune.py --config '{}' --config '{"c3": 150}' --config '{"grid": 0}' \
        >> docs/results/v5/amg-tune.jsonl
"""
import json
import sys
from dataclasses import asdict

import numpy as np
import torch

from common import experiment_parser, open_testbed
from memfree.guidance import config_for
from memfree.mitigate import default_index, generate
from memfree.similarity import NL2_THRESHOLD
from memfree_bench.mitigate import trigger_alignment

parser = experiment_parser(__doc__, bootstrap=5000)
parser.add_argument("--config", action="append", metavar="JSON",
                    help='AMG overrides as a JSON object, e.g. \'{"c3": 150}\'; repeatable (default: {}, the preset)')
parser.add_argument("--seeds", default="5000,6000", help="comma-separated base seeds; prompt i gets base + i")
parser.add_argument("--per-face", type=int, default=4, help="unused training captions per face (default: 4)")
args = parser.parse_args()

model, tb = open_testbed(args.model)
index = default_index(model)
seeds = [int(s) for s in args.seeds.split(",")]
used = {e["prompt"] for entries in tb.eval_sets.values() for e in entries}
by_face: dict[int, list[str]] = {}
for t in tb.manifest["train"]:
    if t["kind"] == "image_dup" and t["caption"] not in used:
        by_face.setdefault(t["image"], []).append(t["caption"])
prompts = [c for face in sorted(by_face) for c in by_face[face][:args.per_face]]
owners = [{"prompt": p} for p in prompts]


def run(method: str, overrides: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(seeds, prompts) alignment and nL2, and the share of images the dissimilarity term fired on."""
    align, nl2, fired = np.zeros((len(seeds), len(prompts))), np.zeros((len(seeds), len(prompts))), []
    for a, s in enumerate(seeds):
        options = {"index": index, **overrides} if method != "none" else {}
        g = generate(model, prompts, method, seed=s, progress=False, **options)
        with torch.no_grad():
            feats = torch.cat([tb.probe.features(g.images[i:i + 256]) for i in range(0, len(g.images), 256)])
        align[a] = trigger_alignment(tb, "image_dup", owners, feats)
        nl2[a] = tb.index.search(g.images).nl2.numpy()
        fired += [bool(r.extra["amg"]["fired_steps"]["sim"]) for r in g.reports if "amg" in r.extra]
    return align, nl2, {"fired_rate": float(np.mean(fired)) if fired else 0.0}


base, base_nl2, _ = run("none", {})
print(f"none: memorized {np.mean(base_nl2 < NL2_THRESHOLD):.3f}, alignment {base.mean():.4f}", file=sys.stderr)
for arg in args.config or ["{}"]:
    overrides = json.loads(arg)
    align, nl2, stats = run("amg", overrides)
    diff = align - base                                   # paired: same prompt, same seed
    rng = np.random.default_rng(0)
    boot = [diff[:, rng.integers(0, diff.shape[1], diff.shape[1])].mean() for _ in range(args.bootstrap)]
    resolved = config_for("amg", index.embedder.metric, model.settings.threshold, **overrides)
    config = {k: v for k, v in asdict(resolved).items()
              if k in ("c1", "c2", "c3", "lam_lo", "lam_hi", "terms", "check_every", "grid")}
    row = {"config": config, "generations": int(diff.size),
           "none_memorized": float(np.mean(base_nl2 < NL2_THRESHOLD)), "memorized": float(np.mean(nl2 < NL2_THRESHOLD)),
           "min_nl2": round(float(nl2.min()), 3), "none_alignment": round(float(base.mean()), 4),
           "alignment": round(float(align.mean()), 4), "difference_points": round(100 * float(diff.mean()), 2),
           "ci95_points": [round(100 * float(np.percentile(boot, q)), 2) for q in (2.5, 97.5)], **stats}
    print(json.dumps(row), flush=True)
