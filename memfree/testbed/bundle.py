"""The testbed's ground truth, shipped next to its weights: unique training images, the manifest with
the evaluation prompt sets, and the alignment probe. Lives in ``<model>/testbed/``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memfree.model import Model, ModelError
from memfree.similarity import PixelIndex
from memfree.testbed.probe import Probe, load_probe


@dataclass
class Testbed:
    images: np.ndarray   # unique training images, uint8 (N, H, W, 3)
    manifest: dict
    probe: Probe
    index: PixelIndex

    @property
    def eval_sets(self) -> dict[str, list[dict]]:
        return self.manifest["eval"]

    def prompts(self, sets: str) -> list[str]:
        """The prompts of one evaluation set, of several joined by commas (a mixed set, in that order),
        or of every set for ``"all"``."""
        names = list(self.eval_sets) if sets == "all" else [s.strip() for s in sets.split(",") if s.strip()]
        for name in names or [sets]:
            if name not in self.eval_sets:
                raise ValueError(f"unknown prompt set {name!r}; choose from {', '.join(self.eval_sets)} or all")
        return [e["prompt"] for s in names for e in self.eval_sets[s]]


def load_testbed(model: Model | str | Path) -> Testbed:
    """Open the ground truth of a testbed model (``<model>/testbed``); a clear error for other models."""
    root = Path(model.path if isinstance(model, Model) else model) / "testbed"
    if not (root / "manifest.json").exists():
        raise ModelError(f"{root.parent} is not a memfree testbed model (no testbed/manifest.json)")
    manifest = json.loads((root / "manifest.json").read_text())
    with np.load(root / "images.npz") as z:
        images = z["images"]
    return Testbed(images=images, manifest=manifest, probe=load_probe(root), index=PixelIndex(images))


def attach_ground_truth(model_dir: Path, data_dir: Path) -> Path:
    """Copy a data set's images and manifest into ``model_dir/testbed`` (the probe goes there too)."""
    root = Path(model_dir) / "testbed"
    root.mkdir(parents=True, exist_ok=True)
    for name in ("images.npz", "manifest.json"):
        shutil.copyfile(Path(data_dir) / name, root / name)
    return root
