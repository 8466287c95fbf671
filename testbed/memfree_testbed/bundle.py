"""The testbed's ground truth, shipped next to its weights: unique training images, the manifest with
the evaluation prompt sets, and the alignment probe (in ``<model>/testbed/``), and its training-set index
(in ``<model>/index/``, where memfree looks for a model's own index).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memfree.index import PixelEmbedder, TrainingIndex, build_index
from memfree.model import Model, ModelError
from memfree.similarity import PixelIndex
from memfree_testbed.probe import Probe, load_probe


def model_dir() -> Path:
    """The bundled testbed model (registered with memfree as the named model ``testbed``)."""
    return Path(str(resources.files("memfree_testbed").joinpath("model")))


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


def training_items(images: np.ndarray, manifest: dict) -> tuple[list[str], list[str | None]]:
    """Ids and captions of the unique training images: each image under the caption it was trained with most."""
    counts: dict[int, Counter] = {}
    for item in manifest.get("train", []):
        counts.setdefault(int(item["image"]), Counter())[item["caption"]] += 1
    captions = [counts[i].most_common(1)[0][0] if i in counts else None for i in range(len(images))]
    return [str(i) for i in range(len(images))], captions


def build_testbed_index(model_dir: str | Path, out_dir: str | Path | None = None, progress: bool = True) -> TrainingIndex:
    """The pixel index of a testbed model's training images, written to ``<model>/index`` by default."""
    root = Path(model_dir) / "testbed"
    manifest = json.loads((root / "manifest.json").read_text())
    with np.load(root / "images.npz") as z:
        images = z["images"]
    ids, captions = training_items(images, manifest)
    return build_index(images, out_dir or Path(model_dir) / "index", PixelEmbedder(), ids=ids, captions=captions,
                       progress=progress)
