"""The alignment probe: a small CNN that reads shape, colour, position, background and size back from
a testbed image, so the agreement of a generation with its prompt is a number (our stand-in for CLIP
score). It is trained on fresh renders of the training compositions only, never the held-out ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from memfree.images import from_uint8
from memfree.io import atomic_write, write_text
from memfree_testbed.render import ATTRIBUTES, STYLES, Style, render


class Probe(nn.Module):
    """Four conv stages to a 4×4 map, a 256-d feature, one linear head per attribute. For images larger than
    32×32 the first stage strides down to 32×32, so a 64×64 probe costs what the 32×32 one does."""

    def __init__(self, size: int = 32):
        super().__init__()
        def block(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(block(3, 32, max(1, size // 32)), block(32, 64, 2), block(64, 64, 1),
                                  block(64, 128, 2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(128 * 16, 256)
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in ATTRIBUTES.items()})
        self.size = size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """256-d feature of images in [0, 1] (B, 3, H, W); also used as an embedding for similarity."""
        x = F.interpolate(x, size=self.size, mode="area") if x.shape[-1] != self.size else x
        return F.silu(self.fc(self.pool(self.body(x * 2 - 1)).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict[str, str]]:
        logits = self(x)
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        return [{k: ATTRIBUTES[k][idx[k][i]] for k in ATTRIBUTES} for i in range(len(x))]


def accuracy(pred: list[dict[str, str]], truth: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy, their mean (``mean``) and the share with every attribute right (``all``)."""
    out = {k: float(np.mean([p[k] == t[k] for p, t in zip(pred, truth)])) for k in ATTRIBUTES}
    out["mean"] = float(np.mean([out[k] for k in ATTRIBUTES]))
    out["all"] = float(np.mean([all(p[k] == t[k] for k in ATTRIBUTES) for p, t in zip(pred, truth)]))
    return out


def train_probe(compositions: list[dict[str, str]], size: int = 32, n_images: int = 24000, steps: int = 1500,
                batch_size: int = 128, seed: int = 0, quiet: bool = False, style: Style = STYLES["v2"]) -> Probe:
    """Train the probe on ``n_images`` fresh renders of ``compositions`` (random detail each time)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    picks = rng.integers(0, len(compositions), n_images)
    truth = [compositions[i] for i in picks]
    x = from_uint8(np.stack([render(a, rng, size, style) for a in tqdm(truth, desc="render probe data", disable=quiet)]))
    y = {k: torch.tensor([v.index(a[k]) for a in truth]) for k, v in ATTRIBUTES.items()}
    probe = Probe(size)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="train probe", disable=quiet):
        b = torch.randint(0, n_images, (batch_size,), generator=g)
        xb = x[b] + 0.03 * torch.randn(x[b].shape, generator=g)  # mild noise: generations are not exact renders
        out = probe(xb.clamp(0, 1))
        loss = sum(F.cross_entropy(out[k], y[k][b]) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


def save_probe(probe: Probe, folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "probe.safetensors", lambda tmp: save_file(probe.state_dict(), str(tmp)))
    write_text(folder / "probe.json", json.dumps({"size": probe.size, "attributes": ATTRIBUTES, **info}, indent=1))


def load_probe(folder: Path) -> Probe:
    cfg = json.loads((folder / "probe.json").read_text())
    probe = Probe(cfg["size"])
    probe.load_state_dict(load_file(str(folder / "probe.safetensors")))
    return probe.eval()
