"""`wen` with its target at several fractions of the calibrated detection threshold, on benchmark sets.

For every prompt set, `none` and then `wen` at each target scale (wen's option ``target_scale``: the target
is that fraction of the threshold) and iteration budget (``max_iters``) are scored as `memfree bench mitigate`
scores a row (memorization, alignment, Fréchet distance, time); ``overhead_ratio`` is the time against
`none` on the same set in the same run. `wen` flags by the threshold whatever the target, so prompts the
detector passes stay bit-identical. One JSON line per row on stdout, labelled with ``target_scale``,
``target`` (the absolute score it stands for) and ``max_iters``.

It produced docs/results/v6/wen-targets.jsonl (0.9, 0.8, 0.7 x, the defaults):

    python experiments/wen_targets.py > docs/results/v6/wen-targets.jsonl

and docs/results/v6/wen-deeper.jsonl (0.6 x), with ``--scales 0.6``; on v5, docs/results/v5/wen-deeper.jsonl
with ``--sets verbatim,image_dup,caption_dup,paraphrase,heldout --iters 10,50 --scales 0.6``.
"""
import json

from common import experiment_parser, open_testbed
from memfree_bench.mitigate import evaluate_method

parser = experiment_parser(__doc__)
parser.add_argument("--sets", default="verbatim,image_dup,caption_dup,paraphrase",
                    help="comma-separated prompt sets (default: the four trigger sets)")
parser.add_argument("--iters", default="10", help="comma-separated iteration budgets (wen's max_iters; default: 10)")
parser.add_argument("--scales", default="0.9,0.8,0.7",
                    help="comma-separated targets as fractions of the threshold (default: 0.9,0.8,0.7)")
parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt, 0..N-1 as in the benchmark (default: 4)")
args = parser.parse_args()

model, tb = open_testbed(args.model)
threshold = model.settings.threshold
if threshold is None:
    parser.error(f"{model.label} has no calibrated threshold: run `memfree calibrate` first")
seeds = list(range(args.seeds))
scales = [float(x) for x in args.scales.split(",")]
iters = [int(n) for n in args.iters.split(",")]

for name in args.sets.split(","):
    none = evaluate_method(model, tb, "none", name, seeds)
    none["overhead_ratio"] = 1.0
    print(json.dumps(none), flush=True)
    for scale in scales:
        for n in iters:
            row = evaluate_method(model, tb, "wen", name, seeds, target_scale=scale, max_iters=n)
            row["overhead_ratio"] = row["seconds_per_image"] / none["seconds_per_image"]
            row.update(target=scale * threshold, max_iters=n, target_scale=scale)   # labels, after the run
            print(json.dumps(row), flush=True)
