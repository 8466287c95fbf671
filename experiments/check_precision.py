r"""How far a bf16 decode moves a check's σ: on every check AMG runs for the first prompts of the held-out, verbatim
and image-duplicate sets (seed 5000 + i, which the benchmark does not use), x̂0 is decoded in float32 and in bf16
and σ measured against each index; also the time of each decode. It produced
docs/results/latent/check-precision.json:

    OMP_NUM_THREADS=1 python experiments/check_precision.py --model testbed-latent \
        --out docs/results/latent/check-precision.json
"""
import time

import torch

import memfree.guidance as guidance
from common import experiment_parser, open_testbed
from memfree.io import write_json
from memfree.mitigate import generate

parser = experiment_parser(__doc__)
parser.add_argument("--prompts", type=int, default=32, help="prompts per set")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

moved: dict[str, list[torch.Tensor]] = {}
decode_seconds = {"fp32": 0.0, "bf16": 0.0}
decoded = guidance.AMG._decoded


def compare(self, s, rows, x0):
    with torch.no_grad():
        images = {}
        for precision in decode_seconds:
            start = time.perf_counter()
            images[precision] = guidance.check_decode(s.model, x0, precision)
            decode_seconds[precision] += time.perf_counter() - start
        full, _ = guidance.nearest(self.index, images["fp32"])
        low, _ = guidance.nearest(self.index, images["bf16"])
    moved.setdefault(self.index.path.name, []).append((full - low).abs())
    return decoded(self, s, rows, x0)


guidance.AMG._decoded = compare
model, tb = open_testbed(args.model)
for name in ("heldout", "verbatim", "image_dup"):
    generate(model, [e["prompt"] for e in tb.eval_sets[name]][:args.prompts], "amg", seed=5000, progress=False)
result = {"model": model.label, "prompts_per_set": args.prompts, "decode_seconds": decode_seconds,
          "sigma_moved": {k: {"checks": len(torch.cat(v)), "max": float(torch.cat(v).max()),
                              "p99": float(torch.cat(v).quantile(0.99))} for k, v in moved.items()}}
write_json(args.out, result)
print(result)
