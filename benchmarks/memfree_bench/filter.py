"""`memfree bench filter`: would the training-time filter (Wen et al. §4) drop the right samples?

The filter drops a training sample when ‖ε(x_t, c) − ε(x_t, ∅)‖₂ at its random timestep reaches τ.
It can only cut memorization if planted (duplicated) samples score higher than ordinary ones. This
bench draws training samples from the testbed's own training list, noises them at random timesteps
as training does, scores them with a trained model, and reports per kind of sample (ordinary,
verbatim, image_dup, caption_dup) the score distribution and the share each τ would keep, overall
and by timestep band. Cheap (one minute on 2 CPU cores) and run before paying for a retraining.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from memfree.mitigate import training_scores
from memfree.model import Model
from memfree.images import from_uint8_signed
from memfree_testbed.bundle import load_testbed
from memfree_testbed.train import train_scheduler


def filter_rates(model: Model, thresholds=(1.0, 2.0, 3.0, 4.0, 6.0), samples: int = 1024, seed: int = 0,
                 batch_size: int = 128, bands: int = 5) -> dict:
    """Score ``samples`` random training samples of a testbed model; keep rates per kind and τ."""
    tb = load_testbed(model)
    items = tb.manifest["train"]
    pixels = from_uint8_signed(tb.images)
    sched = train_scheduler()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(items), (samples,), generator=g)
    ts = torch.randint(0, sched.config.num_train_timesteps, (samples,), generator=g)
    uncond = model.encode([""])
    scores = []
    with torch.no_grad():
        for lo in range(0, samples, batch_size):
            chosen = [items[i] for i in pick[lo:lo + batch_size].tolist()]
            x0 = pixels[[c["image"] for c in chosen]]
            t = ts[lo:lo + batch_size]
            x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            scores.append(training_scores(model.unet, x_t, t, model.encode([c["caption"] for c in chosen]), uncond))
    scores = torch.cat(scores).numpy()
    kinds = np.array([items[i]["kind"] for i in pick.tolist()])
    ts = ts.numpy()
    width = sched.config.num_train_timesteps / bands
    rows = []
    for kind in sorted(set(kinds)):
        s, t = scores[kinds == kind], ts[kinds == kind]
        by_band = defaultdict(dict)
        for b in range(bands):
            sel = (t >= b * width) & (t < (b + 1) * width)
            if sel.any():
                by_band[f"{int(b * width)}-{int((b + 1) * width)}"] = {"median": float(np.median(s[sel])),
                                                                     "n": int(sel.sum())}
        rows.append({"kind": kind, "n": int(len(s)), "mean": float(s.mean()),
                     "percentiles": {str(p): float(np.percentile(s, p)) for p in (10, 50, 90, 99)},
                     "keep_rate": {str(tau): float((s < tau).mean()) for tau in thresholds},
                     "median_by_timestep": dict(by_band)})
    return {"samples": samples, "seed": seed, "thresholds": list(thresholds), "rows": rows}


def format_table(result: dict) -> str:
    """Markdown: one line per kind of training sample."""
    taus = result["thresholds"]
    head = "| kind | n | median score | p90 | " + " | ".join(f"kept at τ={t:g}" for t in taus) + " |"
    lines = [head, "|" + "---|" * (4 + len(taus))]
    for r in result["rows"]:
        keep = " | ".join(f"{r['keep_rate'][str(t)]:.2f}" for t in taus)
        lines.append(f"| {r['kind']} | {r['n']} | {r['percentiles']['50']:.2f} | {r['percentiles']['90']:.2f} | {keep} |")
    return "\n".join(lines)
