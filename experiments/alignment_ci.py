"""How sure is the trigger-set alignment gap between a mitigation (`amg` by default) and `none`?

Regenerates one prompt set with the benchmark's seeds (prompt i, seed 1000·s + i, s = 0..3), scores every
image the way `memfree bench mitigate` scores a trigger set (cosine of its probe features to the centre of
the set's planted images), and bootstraps the paired difference of the means over prompts. One JSON object
on stdout.

It produced docs/results/v5/alignment-ci-image_dup.json:

    python experiments/alignment_ci.py --set image_dup > docs/results/v5/alignment-ci-image_dup.json
"""
import json

import numpy as np
import torch

from common import experiment_parser, open_testbed
from memfree.mitigate import METHODS, default_index, generate, method_options
from memfree_bench.mitigate import trigger_alignment

parser = experiment_parser(__doc__, bootstrap=10000)
parser.add_argument("--set", dest="prompt_set", default="image_dup",
                    help="trigger prompt set: verbatim, image_dup, caption_dup or paraphrase (default: image_dup)")
parser.add_argument("--method", default="amg", help="mitigation compared with none (default: amg)")
parser.add_argument("--seeds", type=int, default=4, help="seed rounds s = 0..N-1, seed 1000·s + i (default: 4)")
args = parser.parse_args()
if args.method not in METHODS:
    parser.error(f"unknown mitigation {args.method!r}; choose one of {', '.join(METHODS)}")

model, tb = open_testbed(args.model)
entries = tb.eval_sets[args.prompt_set]
prompts = [e["prompt"] for e in entries]
index = default_index(model) if "index" in method_options(args.method) else None


def per_image(method: str) -> np.ndarray:
    """(seeds, prompts) cosine of each image to its planted group's mean features."""
    out = np.zeros((args.seeds, len(entries)))
    for s in range(args.seeds):
        options = {"index": index} if method != "none" and index is not None else {}
        g = generate(model, prompts, method, seed=s * 1000, progress=False, **options)
        with torch.no_grad():
            feats = torch.cat([tb.probe.features(g.images[i:i + 256]) for i in range(0, len(g.images), 256)])
        out[s] = trigger_alignment(tb, args.prompt_set, entries, feats)
    return out


base, other = per_image("none"), per_image(args.method)
diff = other - base                                  # paired: same prompt, same seed
rng = np.random.default_rng(0)
boot = [diff[:, rng.integers(0, diff.shape[1], diff.shape[1])].mean()   # resample prompts
        for _ in range(args.bootstrap)]
print(json.dumps({"set": args.prompt_set, "generations": int(diff.size), "none": round(float(base.mean()), 4),
                  args.method: round(float(other.mean()), 4), "difference_points": round(100 * float(diff.mean()), 2),
                  "ci95_points": [round(100 * float(np.percentile(boot, q)), 2) for q in (2.5, 97.5)],
                  "images_changed": int((np.abs(diff) > 1e-6).sum())}, indent=2))
