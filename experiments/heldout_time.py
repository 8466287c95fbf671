r"""AMG's time on ordinary prompts, interleaved: `none`, `amg` as shipped, `amg` with its checks decoded in float32
(before stop 41 they always were) and `amg` without its spot check, one after the other on the same held-out prompts,
for ``--rounds`` seed rounds (round r: prompt i gets seed r·1000 + i, the benchmark's). Interleaving spreads whatever
else the machine does over all of them, which a run of one method after another does not. It produced
docs/results/latent/heldout-time.json (stop 40's variants: heldout-time-stop40.json):

    OMP_NUM_THREADS=1 python experiments/heldout_time.py --model testbed-latent --rounds 4 \
        --out docs/results/latent/heldout-time.json
"""
from common import experiment_parser, open_testbed
from memfree.io import write_json
from memfree.mitigate import generate

parser = experiment_parser(__doc__)
parser.add_argument("--rounds", type=int, default=4)
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
prompts = [e["prompt"] for e in tb.eval_sets["heldout"]]
runs = {"none": ("none", {}), "amg": ("amg", {}),
        "amg, checks decoded in float32": ("amg", {"check_precision": "fp32"}),
        "amg without the spot check": ("amg", {"spot_check": 0.0})}
seconds, piece_seconds, rounds = {k: 0.0 for k in runs}, {k: 0.0 for k in runs}, []
generate(model, prompts[:8], "amg", seed=0, progress=False)   # warm-up: first calls load the indexes
for r in range(args.rounds):
    row = {}
    for name, (method, options) in runs.items():
        g = generate(model, prompts, method, seed=r * 1000, progress=False, **options)
        seconds[name] += g.seconds
        piece_seconds[name] += g.piece_seconds
        row[name] = round(g.seconds / len(prompts), 4)
    rounds.append(row)
    print(r, row, flush=True)
result = {"model": model.label, "prompts": len(prompts), "rounds": rounds,
          "seconds_per_image": {k: v / (len(prompts) * args.rounds) for k, v in seconds.items()},
          "ratio_to_none": {k: v / seconds["none"] for k, v in seconds.items()},
          # the time inside AMG's pieces over none's whole time: the same cost, free of the noise of two timings
          "piece_share_of_none": {k: v / seconds["none"] for k, v in piece_seconds.items()}}
write_json(args.out, result)
print(result["ratio_to_none"])
