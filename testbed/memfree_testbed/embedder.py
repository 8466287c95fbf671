"""A copy-detection embedder in the manner of SSCD (Pizzi et al., 2022), trained by memfree on the testbed's images.

A small convolutional network maps an image to an L2-normalised 128-vector; the cosine of two vectors
says whether one image is a copy of the other. It learns that with a contrastive loss: two copy-style
augmentations of one training image (crops, flips, colour jitter, grey, blur, noise, overlays) must be
nearer each other than any other image in the batch, and each batch holds pairs of different renders of
one caption, so "same prompt" is never enough to look like a copy. It is saved as TorchScript and read by
memfree's ``torchscript:PATH:64`` loader exactly like the real SSCD file (which takes ImageNet-normalised
input; so does this one).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from memfree.images import from_uint8
from memfree.io import write_text
from memfree_testbed.data import load_dataset

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DIM = 128
TEMPERATURE = 0.05
RECIPES = {"sscd": dict(crop_min=0.5, flip=0.5, jitter=1.0),   # SSCD-like: strong crops, flips, colour changes
           "mild": dict(crop_min=0.75, flip=0.0, jitter=0.5)}  # copies as a generator makes them: whole, upright


class CopyEmbedder(nn.Module):
    """Four stride-2 conv stages, GeM pooling (as SSCD), a linear projection, L2 normalisation."""

    def __init__(self, dim: int = DIM, widths: tuple[int, ...] = (32, 64, 128, 192)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(inplace=True)]
            c = w
        self.trunk = nn.Sequential(*layers)
        self.p = nn.Parameter(torch.tensor(3.0))
        self.project = nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).clamp(min=1e-6)
        pooled = h.pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return F.normalize(self.project(pooled), dim=1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to the ImageNet-normalised input the loader feeds the TorchScript file."""
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=3)


def augment(images: torch.Tensor, g: torch.Generator, crop_min: float = 0.5, flip: float = 0.5,
            jitter: float = 1.0) -> torch.Tensor:
    """Copy-style edits of images (B, 3, H, W) in [0, 1], drawn from ``g``: what a copy of a training image
    may have been through, from a regeneration's softness to a crop with a caption pasted over it.
    ``crop_min`` is the smallest crop side kept, ``flip`` the chance of a mirror image and ``jitter`` scales the
    colour changes (the ``mild`` recipe keeps more of what tells one render of a caption from another)."""
    b, _, h, w = images.shape
    u = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
    out = []
    for i in range(b):
        x = images[i:i + 1]
        s = float(crop_min + (1 - crop_min) * u(1))       # crop side as a share of the image
        ch, cw = max(8, int(h * s)), max(8, int(w * s * float(0.85 + 0.3 * u(1))))
        cw = min(cw, w)
        y0, x0 = int(u(1) * (h - ch + 1)), int(u(1) * (w - cw + 1))
        x = F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True)
        if u(1) < flip:
            x = x.flip(-1)
        if u(1) < 0.3:
            x = _gaussian_blur(x, float(0.4 + 1.2 * u(1)))
        out.append(x)
    x = torch.cat(out)
    bright = (u(b, 1, 1, 1) - 0.5) * 0.4 * jitter
    contrast = 1 + (u(b, 1, 1, 1) - 0.5) * 0.6 * jitter
    sat = 1 + (u(b, 1, 1, 1) - 0.5) * 0.8 * jitter
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * sat
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True) + bright
    x = torch.where(u(b, 1, 1, 1) < 0.1, x.mean(dim=1, keepdim=True).expand_as(x), x)
    x = x + torch.randn(x.shape, generator=g) * (u(b, 1, 1, 1) < 0.3) * 0.06 * u(b, 1, 1, 1)
    for i in range(b):   # an overlay: a flat box or a striped "caption" band over part of the image
        if u(1) < 0.3:
            bh, bw = int(h * float(0.1 + 0.2 * u(1))), int(w * float(0.2 + 0.5 * u(1)))
            y0, x0 = int(u(1) * (h - bh)), int(u(1) * (w - bw))
            patch = u(3, 1, 1).expand(3, bh, bw).clone()
            if u(1) < 0.5:
                patch[:, :, ::3] = 1 - patch[:, :, ::3]
            x[i, :, y0:y0 + bh, x0:x0 + bw] = patch
    return x.clamp(0, 1)


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE over 2B views: each view's positive is the other view of its image, every other view a negative."""
    z = torch.cat([z1, z2])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _same_caption_pairs(manifest: dict) -> list[tuple[int, int]]:
    """Pairs of different unique images trained under one caption (renders of a composition, template images)."""
    by_caption = defaultdict(set)
    for item in manifest["train"]:
        by_caption[item["caption"]].add(int(item["image"]))
    pairs = []
    for ids in by_caption.values():
        ids = sorted(ids)
        pairs += [(a, b) for a, b in zip(ids, ids[1:])]
    return pairs


def train_embedder(data_dir: str | Path, out_dir: str | Path, steps: int = 1500, batch_size: int = 96,
                   lr: float = 2e-3, seed: int = 0, checkpoint_every: int = 100, stop_after: int | None = None,
                   quiet: bool = False, recipe: str = "sscd") -> Path | None:
    """Train (or resume) the embedder; returns the TorchScript file OUT/embedder.pt (None when ``stop_after``
    steps ended this call early, with a checkpoint to resume from).

    Half of each batch is pairs of different images under one caption (hard negatives); the batch for a
    step depends on the seed and the step alone, so a resumed run matches an uninterrupted one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, manifest = load_dataset(data_dir)
    pixels = from_uint8(images)
    pairs = torch.tensor(_same_caption_pairs(manifest))
    torch.manual_seed(seed)
    net = CopyEmbedder()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ckpt, state_path = out_dir / "embedder_checkpoint.safetensors", out_dir / "embedder_state.json"
    start, elapsed, log = 0, 0.0, []
    if ckpt.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        net.load_state_dict(load_file(str(ckpt)))
        opt.load_state_dict(torch.load(out_dir / "embedder_optimizer.pt", weights_only=True))
        sched.load_state_dict(state["lr_scheduler"])
        start, elapsed, log = state["step"], state["elapsed_s"], state["log"]
    net.train()
    running = None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train embedder", disable=quiet)
    for step in bar:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        hard = pairs[torch.randint(0, len(pairs), (batch_size // 4,), generator=g)].flatten()
        rest = torch.randint(0, len(pixels), (batch_size - len(hard),), generator=g)
        x = pixels[torch.cat([hard, rest])]
        aug = RECIPES[recipe]
        loss = contrastive_loss(net(normalise(augment(x, g, **aug))), net(normalise(augment(x, g, **aug))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % 25 == 0:
            log.append({"step": step + 1, "loss": round(running, 4), "elapsed_s": round(elapsed, 1)})
        stopping = stop_after is not None and step + 1 - start >= stop_after and step + 1 < steps
        if stopping or (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            tmp = ckpt.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
            os.replace(tmp, ckpt)
            torch.save(opt.state_dict(), out_dir / "embedder_optimizer.tmp")
            os.replace(out_dir / "embedder_optimizer.tmp", out_dir / "embedder_optimizer.pt")
            write_text(state_path, json.dumps({"step": step + 1, "elapsed_s": elapsed, "log": log,
                                               "lr_scheduler": sched.state_dict(), "seed": seed, "steps": steps,
                                               "batch_size": batch_size, "lr": lr, "recipe": recipe,
                                               "data": str(data_dir)}))
        if stopping:
            bar.close()
            return None
    return export_embedder(net.eval(), out_dir / "embedder.pt", manifest["size"])


def export_embedder(net: CopyEmbedder, path: Path, size: int) -> Path:
    """Write the network as TorchScript (traced on a ``size``×``size`` input), atomically."""
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.zeros(1, 3, size, size))
    tmp = path.with_suffix(".tmp")
    torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)
    return path


@torch.no_grad()
def evaluate_copy_detection(embedder, data_dir: str | Path, pairs: int = 1000, seed: int = 1) -> dict:
    """Copy-detection quality on the testbed: cosine of (training image, an augmented copy of it) against
    (training image, a different image under the same caption). Returns the ROC AUC, the threshold that
    best separates the two (highest F1) with its precision and recall, and the medians of both kinds.

    ``embedder`` is anything memfree's index takes (a ``TorchScriptEmbedder``); the augmentations are drawn
    with a seed of their own, so none of these copies was seen in training.
    """
    from memfree.metrics import roc_auc
    images, manifest = load_dataset(data_dir)
    pixels = from_uint8(images)
    g = torch.Generator().manual_seed(seed)
    same = torch.tensor(_same_caption_pairs(manifest))
    pick = same[torch.randint(0, len(same), (pairs,), generator=g)]
    anchors = pixels[pick[:, 0]]
    copies = augment(anchors, g)
    others = pixels[pick[:, 1]]
    ea, ec, eo = embedder(anchors), embedder(copies), embedder(others)
    pos, neg = (ea * ec).sum(dim=1).numpy(), (ea * eo).sum(dim=1).numpy()
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    best = {"f1": -1.0}
    for thr in np.unique(scores):
        hit = scores >= thr
        tp = float((hit & (labels == 1)).sum())
        precision, recall = tp / max(hit.sum(), 1), tp / len(pos)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        if f1 > best["f1"]:
            lower = scores[scores < thr]
            cut = float((thr + lower.max()) / 2) if len(lower) else float(thr)
            best = {"f1": float(f1), "precision": float(precision), "recall": float(recall), "threshold": cut}
    # Fresh renders of the held-out compositions are no copy of anything: their nearest training image's cosine
    # is the floor a copy verdict must clear, so the threshold is kept above the highest of them.
    from memfree_testbed.render import render, style_of
    rng = np.random.default_rng(seed)
    held = manifest["heldout_compositions"]
    fresh = from_uint8(np.stack([render(a, rng, manifest["size"], style_of(manifest)) for a in held]))
    train = torch.cat([embedder(pixels[i:i + 512]) for i in range(0, len(pixels), 512)])
    fresh_near = (embedder(fresh) @ train.T).max(dim=1).values.numpy()
    floor = float(fresh_near.max())
    return {"pairs": pairs, "auc": roc_auc(pos, neg), "pair_threshold": round(best["threshold"], 4),
            "precision": best["precision"], "recall": best["recall"], "f1": best["f1"],
            "median_cosine_copy": float(np.median(pos)), "median_cosine_same_caption": float(np.median(neg)),
            "heldout_render_nearest_cosine": {"median": float(np.median(fresh_near)),
                                              "p95": float(np.quantile(fresh_near, 0.95)), "max": floor},
            "copy_threshold": round(max(best["threshold"], floor + 0.01), 4),
            "recall_at_copy_threshold": float((pos > max(best["threshold"], floor + 0.01)).mean())}
