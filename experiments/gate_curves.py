r"""σ_t of unguided generations, step by step, on captions and seeds the benchmark does not use: where AMG's gate
λ_t has to sit for a given index (embedder) so that copies cross it and ordinary prompts do not.

Trigger side: captions no evaluation set uses (experiments/common.py, ``tuning_triggers``): the next
``--per-face`` training captions of every duplicated face, and the copying planted captions with a suffix that
no training caption has. Ordinary side: the held-out
evaluation prompts, but with seeds 5000 + i and 6000 + i (the benchmark's are 0, 1000, 2000, 3000 + i). Each
image is sampled with `none` and an observer piece that records σ of x̂0 to its nearest training image (the
statistic AMG's gate compares, from the model's own index) at every step. Each generation's final verdict
is the testbed's: cosine above the copy detector's threshold for a model with one, nL2 < 1.4 otherwise.

Writes a JSON summary: per step, the highest σ of any ordinary generation and the lowest σ of any trigger
generation that ends as a copy, with quantiles, and the gate that separates them. It produced
docs/results/latent/gate-curves.json:

    python experiments/gate_curves.py --model testbed-latent --out docs/results/latent/gate-curves.json
"""
import numpy as np
import torch

from common import experiment_parser, open_testbed, tuning_triggers
from memfree.io import write_json
from memfree.mitigate import default_index
from memfree.sampling import StepState, sample
from memfree.similarity import NL2_THRESHOLD, nearest

parser = experiment_parser(__doc__)
parser.add_argument("--per-face", type=int, default=4, help="unused training captions per face (default: 4)")
parser.add_argument("--triggers", default="faces,suffix",
                    help="comma-separated trigger kinds of experiments/common.py's tuning_triggers (default: both)")
parser.add_argument("--seeds", default="5000,6000", help="comma-separated base seeds; prompt i gets base + i")
parser.add_argument("--latent-screen", action="store_true",
                    help="also record σ of x̂0 in latent space (memfree.similarity.LatentScreen over the training "
                         "images' VAE latents, grid 8) and report, per bar, what a screen at that bar would miss")
parser.add_argument("--out", required=True, metavar="JSON")
args = parser.parse_args()

model, tb = open_testbed(args.model)
index = default_index(model)
seeds = [int(s) for s in args.seeds.split(",")]
triggers = [e["prompt"] for kind in args.triggers.split(",") for e in tuning_triggers(tb, kind, args.per_face)]
ordinary = [e["prompt"] for e in tb.eval_sets["heldout"]]


screen = None
if args.latent_screen:
    from memfree.images import from_uint8
    from memfree.similarity import LatentScreen
    screen = LatentScreen.from_images(model.vae, from_uint8(tb.images))
latent_rows: dict[int, list[float]] = {}


def curves(prompts: list[str], base: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, steps) σ_t under `none`, and each final image's verdict (memorized or not)."""
    rows: dict[int, list[float]] = {}
    latent_rows.clear()

    def observe(s: StepState) -> None:
        with torch.no_grad():
            sig, _ = nearest(index, s.model.decode(s.x0, clamp=False))
            lat = screen.similarity(s.x0) if screen is not None else None
        for j, i in enumerate(s.indices):
            rows.setdefault(i, []).append(float(sig[j]))
            if lat is not None:
                latent_rows.setdefault(i, []).append(float(lat[j]))

    out = sample(model, prompts, [base + i for i in range(len(prompts))], pieces=[observe], progress=False)
    if tb.copy_index is not None:
        sim, _ = tb.copy_index.search(tb.copy_index.embedder(out.images), 1)
        copied = sim[:, 0].numpy() > tb.copy_threshold
    else:
        copied = tb.index.search(out.images).nl2.numpy() < NL2_THRESHOLD
    return np.array([rows[i] for i in range(len(prompts))]), copied


def stats(a: np.ndarray) -> dict:
    if len(a) == 0:
        return {}
    return {"n": int(a.shape[0]), "max": a.max(0).round(4).tolist(), "p95": np.quantile(a, 0.95, 0).round(4).tolist(),
            "median": np.median(a, 0).round(4).tolist(), "min": a.min(0).round(4).tolist()}


trig, trig_copied, held, trig_lat, held_lat = [], [], [], [], []
for base in seeds:
    c, copied = curves(triggers, base)
    trig.append(c), trig_copied.append(copied), trig_lat.append([latent_rows.get(i) for i in range(len(c))])
    held.append(curves(ordinary, base)[0])
    held_lat.append([latent_rows.get(i) for i in range(len(held[-1]))])
    print(f"seed base {base}: {copied.mean():.3f} of {len(triggers)} trigger generations end as copies", flush=True)
trig, trig_copied, held = np.concatenate(trig), np.concatenate(trig_copied), np.concatenate(held)
copies = trig[trig_copied]
margin = copies.min(0) - held.max(0) if len(copies) else None
summary = {
    "model": model.label, "index_metric": index.embedder.metric, "steps": int(held.shape[1]),
    "seeds": seeds, "trigger_prompts": len(triggers), "ordinary_prompts": len(ordinary),
    "trigger_copied_rate": float(trig_copied.mean()),
    "ordinary": stats(held), "trigger_copies": stats(copies), "trigger_not_copied": stats(trig[~trig_copied]),
    "copies_minus_ordinary_max": margin.round(4).tolist() if margin is not None else None,
}
if screen is not None:   # what a latent screen at each bar would let through, under the index's tuned gate
    from memfree.guidance import config_for_index
    cfg = config_for_index("amg", index, model.settings.threshold)
    ts = model.scheduler.timesteps if len(model.scheduler.timesteps) == held.shape[1] else None
    if ts is None:
        model.scheduler.set_timesteps(held.shape[1])
        ts = model.scheduler.timesteps
    gate = np.array([cfg.gate(float(t), model.scheduler.config.num_train_timesteps) for t in ts])
    tl, hl = np.array(sum(trig_lat, [])), np.array(sum(held_lat, []))
    fires = trig > gate                                   # (image, step): the full check would open the gate
    rows = []
    for bar in (0.0, 0.2, 0.3, 0.4, 0.5, 0.6):
        passed = tl > bar
        caught = (fires & passed).any(1)[trig_copied].mean() if trig_copied.any() else None
        rows.append({"latent_bar": bar, "copies_caught_by_full_check": float(fires.any(1)[trig_copied].mean()),
                     "copies_caught_with_screen": float(caught) if caught is not None else None,
                     "ordinary_checks_skipped": float((hl <= bar).mean())})
    summary["latent_screen"] = {"gate": {"lam_lo": cfg.lam_lo, "lam_hi": cfg.lam_hi}, "grid": screen.grid,
                                "ordinary_latent_sigma": stats(hl), "copies_latent_sigma": stats(tl[trig_copied]),
                                "bars": rows}
    for r in rows:
        print(r)
write_json(args.out, summary)
step_sep = [s for s in range(held.shape[1]) if margin is not None and margin[s] > 0]
print(f"ordinary max σ by step: {held.max(0).round(3).tolist()}")
if len(copies):
    print(f"copies   min σ by step: {copies.min(0).round(3).tolist()}")
print(f"steps where every copy is above every ordinary image: {step_sep}")
