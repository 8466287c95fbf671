"""σ_t at every step of every benchmark generation under `amg-every` (checks at every step), to see
when images first cross the gate and what a sparser check cadence could skip. Writes
reports/v5/sigma-curves-summary.json (the full curves go to /tmp/sigma-curves.json). About 6 min.
Usage: .venv/bin/python reports/v5/sigma_curves.py
Up to an image's first gate crossing its trajectory is unguided, so those steps are also what any
other cadence would have seen; after it, the curve is AMG's guided one."""
import json
import statistics

import memfree
import memfree.guidance as G
from memfree.mitigate import default_index, generate
from memfree.testbed.bundle import load_testbed

model = memfree.load()
index = default_index(model)
tb = load_testbed(model)
curve: dict[int, list] = {}
last: dict[str, object] = {}
original_nearest, original_call = G.nearest, G.AMG.__call__


def recording_nearest(index, images, k=50, alpha=0.5):
    """AMG's own check, with its σ kept for the step's record (no second search)."""
    sig, ids = original_nearest(index, images, k, alpha)
    last["sigma"] = sig
    return sig, ids


def recording_call(self, s):
    """Run AMG, then record the σ its check found for each image it checked, and λ."""
    rows = [j for j, i in enumerate(s.indices) if self._due(s.step, i)]
    last.clear()
    original_call(self, s)
    if rows:
        lam = self.config.gate(s.t, model.scheduler.config.num_train_timesteps)
        for r, j in enumerate(rows):
            curve.setdefault(s.indices[j], []).append((s.step, round(float(last["sigma"][r]), 4), round(lam, 4)))


G.nearest = recording_nearest
G.AMG.__call__ = recording_call
curves, summary = {}, {}
for name in ["heldout", "verbatim", "image_dup", "caption_dup", "paraphrase"]:
    entries = tb.eval_sets[name]
    first, at0 = [], []
    for seed in range(4):
        curve.clear()
        generate(model, [e["prompt"] for e in entries], "amg-every", seed=seed * 1000, train_index=index, progress=False)
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
          summary[name]["sigma_step0_max"], flush=True)
json.dump(curves, open("/tmp/sigma-curves.json", "w"))
json.dump(summary, open("reports/v5/sigma-curves-summary.json", "w"), indent=1)
