"""How well *any* model of a testbed data set could separate memorized from ordinary prompts by
Wen et al.'s first-step score, computed from the data alone.

At the first sampling step x_t is almost pure noise, so a well-trained model predicts x̂0 ≈ E[x0 | c]
for the prompt and E[x0] without it, and ‖ε_c − ε_u‖ = √(ᾱ/(1−ᾱ))·‖x̂0_c − x̂0_u‖. For a memorized
caption E[x0 | c] is its one training image; for an ordinary caption it is the mean of that
caption's renders. The score can only separate the two when the planted images sit further from the
data mean than ordinary captions' means do. This module measures those distances and the AUC they
allow; on the bundled model the measured first-step scores follow them (README, "The testbed").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memfree.metrics import roc_auc
from memfree_testbed.data import load_dataset
from memfree_testbed.render import render, style_of


def prior_limit_separation(data_dir: str | Path, renders: int = 48, seed: int = 0) -> dict:
    """Distance of each evaluation prompt's expected image from the training mean (on the model's
    [-1, 1] scale), per set, and the AUC of each planted set against the ordinary ones."""
    images, manifest = load_dataset(data_dir)
    x = images.astype(np.float64) / 127.5 - 1
    ids = np.array([t["image"] for t in manifest["train"]])
    mean = x[ids].mean(0)                      # what the unconditional model predicts at pure noise
    style, size, rng = style_of(manifest), manifest["size"], np.random.default_rng(seed)

    def caption_mean(attrs: dict) -> np.ndarray:
        return np.mean([render(attrs, rng, size, style) / 127.5 - 1 for _ in range(renders)], axis=0)

    ev = manifest["eval"]
    dist = {
        "verbatim": [np.linalg.norm(x[e["image"]] - mean) for e in ev["verbatim"]],
        "image_dup": [np.linalg.norm(x[e["image"]] - mean) for e in ev["image_dup"]],
        "caption_dup": [np.linalg.norm(x[e["images"]].mean(0) - mean) for e in ev["caption_dup"]],
        "ordinary": [np.linalg.norm(caption_mean(e["attrs"]) - mean) for e in ev["heldout"] + ev["seen_once"]],
    }
    out = {"style": style.name, "median_distance": {k: float(np.median(v)) for k, v in dist.items()},
           "min_distance": {k: float(np.min(v)) for k, v in dist.items()},
           "max_distance": {k: float(np.max(v)) for k, v in dist.items()}}
    out["auc"] = {k: roc_auc(dist[k], dist["ordinary"]) for k in ("verbatim", "image_dup", "caption_dup")}
    return out
