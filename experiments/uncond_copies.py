"""How often a testbed model copies a training image from the empty prompt (no text at all).

A copy here cannot be undone by anything that edits the prompt or its embedding (`wen` and the Somepalli
baselines): it is the floor for text-side mitigations on the testbed. For each seed count N it samples the
empty prompt from seeds 0..N-1 and reports the share memorized (nL2 < 1.4 to the nearest unique training
image) and the kinds of the training images copied. One JSON object on stdout.

It produced docs/results/v6/uncond-copies.json (and v5's, v5f3's, v4's, v4filt's and v3tok's):

    python experiments/uncond_copies.py > docs/results/v6/uncond-copies.json
"""
import json
from collections import Counter

from common import experiment_parser, open_testbed
from memfree.sampling import sample

parser = experiment_parser(__doc__)
parser.add_argument("--seeds", default="20,200",
                    help="comma-separated seed counts, one run each from seed 0 (default: 20,200)")
args = parser.parse_args()

model, tb = open_testbed(args.model)
result = {}
for n in (int(x) for x in args.seeds.split(",")):
    seeds = list(range(n))
    out = sample(model, [""] * n, seeds, progress=False)
    nn = tb.index.search(out.images)
    kinds = Counter(tb.manifest["unique"][int(i)]["kind"] for i, m in zip(nn.ids, nn.memorized) if m)
    result[f"seeds 0-{n - 1}"] = {"generations": n, "memorized": float(nn.memorized.float().mean()),
                                  "copies_by_kind": kinds}
print(json.dumps(result, indent=1))
