r"""Where AMG's time goes on held-out prompts: the check's decode, the index searches (embedding included), the latent
screen, the dissimilarity gradient and the rest of the piece, each timed by a wrapper, over ``--rounds`` seed rounds
of the benchmark's held-out prompts (round r: seed r·1000 + i). Also counts the rows decoded and screened. It
produced docs/results/latent/amg-cost-parts.json:

    OMP_NUM_THREADS=1 python experiments/amg_cost_parts.py --model testbed-latent --rounds 4 \
        --out docs/results/latent/amg-cost-parts.json
"""
import time
from collections import Counter

import memfree.guidance as guidance
from common import experiment_parser, open_testbed
from memfree.cli import parse_options
from memfree.io import write_json
from memfree.mitigate import generate

parser = experiment_parser(__doc__)
parser.add_argument("--rounds", type=int, default=4)
parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="an AMG option, repeatable")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()
options = parse_options("amg", tuple(args.opt))   # typed as `memfree generate --opt` types them

seconds, calls, rows = Counter(), Counter(), Counter()


def timed(owner, name: str, part: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            seconds[part] += time.perf_counter() - start
            calls[part] += 1
    setattr(owner, name, wrapper)


timed(guidance, "nearest", "index search (embedding and search)")
timed(guidance, "similarity_to", "dissimilarity gradient")
timed(guidance, "branch_eps", "caption-deduplication branch")
timed(guidance.AMG, "_latent_sigma", "latent screen")
timed(guidance.AMG, "_decoded", "decode for the check")
per_row = guidance.AMG._per_row


def counting_per_row(s, key, todo, compute):
    def count(r):
        rows["decoded" if key.startswith("amg_decoded") else "screened"] += len(r)
        return compute(r)
    return per_row(s, key, todo, count)


guidance.AMG._per_row = staticmethod(counting_per_row)

model, tb = open_testbed(args.model)
prompts = [e["prompt"] for e in tb.eval_sets["heldout"]]
generate(model, prompts[:8], "amg", seed=0, progress=False, **options)   # warm-up: first calls load the indexes
seconds.clear(), calls.clear(), rows.clear()
total = inside = 0.0
for r in range(args.rounds):
    g = generate(model, prompts, "amg", seed=r * 1000, progress=False, **options)
    total, inside = total + g.seconds, inside + g.piece_seconds
images = len(prompts) * args.rounds
parts = {k: {"seconds": round(v, 3), "calls": calls[k], "share_of_amg": round(v / inside, 3)}
         for k, v in seconds.most_common()}
parts["rest of the piece"] = {"seconds": round(inside - sum(seconds.values()), 3),
                              "share_of_amg": round(1 - sum(seconds.values()) / inside, 3)}
result = {"model": model.label, "options": options, "images": images, "seconds_per_image": total / images,
          "amg_share_of_total": inside / total, "rows_per_image": {k: v / images for k, v in rows.items()},
          "parts": parts}
write_json(args.out, result)
print(f"AMG {inside:.2f} s of {total:.2f} s ({inside / total:.1%}); rows per image {result['rows_per_image']}")
for k, v in parts.items():
    print(f"  {k:40s} {v['seconds']:7.2f} s  {v['share_of_amg']:.0%}")
