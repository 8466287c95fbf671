"""σ_t at every step of every benchmark generation under `amg-every` (AMG checking at every step), to see when
images first cross the gate λ_t and what a sparser check cadence could skip.

The benchmark's generations (prompt i, seed 1000·s + i, s = 0..3) are sampled under `amg-every` with one
more sampling piece in front of AMG's: it records, for every image and step, the σ of x̂0 to its nearest
training image (memfree.similarity.nearest_training on the same x̂0, index and k that AMG's own check uses,
so the same value) and the gate λ_t. Up to an image's first gate crossing its trajectory is unguided, so
those steps are also what any other cadence would have seen; after it, the curve is AMG's guided one.
Writes a summary per prompt set (generations, how many cross the gate, at which step they first do, σ at
step 0) and, with --curves, every curve.

It produced docs/results/v5/sigma-curves-summary.json (on v5):

    python experiments/sigma_curves.py --out docs/results/v5/sigma-curves-summary.json --curves /tmp/sigma-curves.json
"""
import statistics
import sys

from common import experiment_parser, open_testbed
from memfree.guidance import config_for
from memfree.io import write_json
from memfree.mitigate import Mitigation, build_mitigation, default_index, generate
from memfree.sampling import StepState
from memfree.similarity import nearest_training

parser = experiment_parser(__doc__)
parser.add_argument("--sets", default="heldout,verbatim,image_dup,caption_dup,paraphrase",
                    help="comma-separated prompt sets (default: the benchmark's five)")
parser.add_argument("--seeds", type=int, default=4, help="seed rounds s = 0..N-1, seed 1000·s + i (default: 4)")
parser.add_argument("--out", required=True, metavar="JSON", help="summary file")
parser.add_argument("--curves", default=None, metavar="JSON",
                    help="also write every curve here: {set/seed/i: [[step, sigma, lambda], ...]}")
args = parser.parse_args()

model, tb = open_testbed(args.model)
index = default_index(model)
config = config_for("amg-every", index.embedder.metric, model.settings.threshold)
curve: dict[int, list] = {}


def record(s: StepState) -> None:
    """σ of every image's x̂0 at this step, before AMG changes ε̂ (amg-every checks every image at every step)."""
    lam = config.gate(s.t, model.scheduler.config.num_train_timesteps)
    near = nearest_training(index, s.model.decode(s.x0, clamp=False), k=config.k)
    for j, i in enumerate(s.indices):
        curve.setdefault(i, []).append((s.step, round(near[j]["similarity"], 4), round(lam, 4)))


class RecordedAMG(Mitigation):
    """`amg-every` with :func:`record` as a piece in front of AMG's."""

    name = "amg-every"

    def __init__(self):
        self.amg = build_mitigation("amg-every", index=index)

    def pieces(self, request):
        return [record, *self.amg.pieces(request)]

    def finish(self, request, out):
        self.amg.finish(request, out)


curves, summary = {}, {}
for name in args.sets.split(","):
    entries = tb.eval_sets[name]
    first, at0 = [], []
    for seed in range(args.seeds):
        curve.clear()
        generate(model, [e["prompt"] for e in entries], RecordedAMG(), seed=seed * 1000, progress=False)
        for i in range(len(entries)):
            c = curve[i]
            curves[f"{name}/{seed}/{i}"] = c
            at0.append(c[0][1])
            first.append(next((st for st, sig, lam in c if sig > lam), None))
    crossed = sorted(f for f in first if f is not None)
    summary[name] = {"generations": len(first), "crossed_gate": len(crossed),
                     "first_crossing_steps": crossed, "sigma_step0_median": statistics.median(at0),
                     "sigma_step0_max": max(at0)}
    print(name, summary[name]["crossed_gate"], "of", len(first), "cross the gate; σ at step 0 at most",
          summary[name]["sigma_step0_max"], file=sys.stderr, flush=True)
if args.curves:
    write_json(args.curves, curves)
write_json(args.out, summary)
