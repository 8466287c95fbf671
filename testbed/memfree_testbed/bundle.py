"""The testbed's ground truth, shipped next to its weights: unique training images, the manifest with
the evaluation prompt sets, and the alignment probe (in ``<model>/testbed/``), and its training-set index
(in ``<model>/index/``, where memfree looks for a model's own index).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memfree.index import PixelEmbedder, TrainingIndex, build_index
from memfree.io import write_text
from memfree.model import Model, ModelError
from memfree.settings import user_home
from memfree.similarity import PixelIndex, index_copy_threshold
from memfree_testbed.probe import Probe, load_probe


def model_dir() -> Path:
    """The bundled testbed model (registered with memfree as the named model ``testbed``)."""
    return Path(str(resources.files("memfree_testbed").joinpath("model")))


def latent_model_dir() -> Path:
    """The bundled latent testbed, shaped like Stable Diffusion (the named model ``testbed-latent``)."""
    return Path(str(resources.files("memfree_testbed").joinpath("model_latent")))


@dataclass
class Testbed:
    images: np.ndarray   # unique training images, uint8 (N, H, W, 3)
    manifest: dict
    probe: Probe
    index: PixelIndex                       # exact nL2 over the training images' pixels
    copy_index: TrainingIndex | None = None  # the model's own cosine index of a copy-detection embedder, if any
    copy_threshold: float | None = None      # cosine above which that embedder calls a pair a copy

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
    images = ground_truth_images(root)
    copy_index, copy_threshold = None, None
    meta = root.parent / "index" / "meta.json"
    if meta.exists() and json.loads(meta.read_text())["embedder"].get("metric") == "cosine":
        copy_index = TrainingIndex.load(root.parent / "index")
        copy_threshold = index_copy_threshold(copy_index)   # the embedder's own, from the index's tuning.json
    return Testbed(images=images, manifest=manifest, probe=load_probe(root), index=PixelIndex(images),
                   copy_index=copy_index, copy_threshold=copy_threshold)


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def ground_truth_images(root: Path) -> np.ndarray:
    """The unique training images of a testbed's ground truth (uint8 N×H×W×3).

    A compact bundle ships only its planted images and the data recipe: the ordinary renders are drawn
    again from the recipe's seed (seconds) into a cache under memfree's user folder, and checked against
    the recorded SHA-256, so the package stays small and the images are exactly the trained ones.
    """
    if (root / "images.npz").exists():
        with np.load(root / "images.npz") as z:
            return z["images"]
    recipe = json.loads((root / "recipe.json").read_text())
    cache = user_home() / "testbed-data" / recipe["sha256"][:16]
    if not (cache / "images.npz").exists():
        from memfree_testbed.data import build_dataset
        build_dataset(cache, **recipe["build"])
    with np.load(cache / "images.npz") as z:
        images = z["images"]
    if _digest(images) != recipe["sha256"]:
        raise ModelError(f"the testbed images drawn again from {root / 'recipe.json'} differ from the trained ones "
                         f"(another numpy?); the cache is {cache}")
    return images


def recipe_of(manifest: dict) -> dict:
    """The `build_dataset` arguments that wrote a data set, read back from its manifest."""
    ev, counts = manifest["eval"], manifest["counts"]
    return {"seed": manifest["seed"], "size": manifest["size"], "style": manifest.get("style", "v2"),
            "verbatim_captions": manifest.get("verbatim_captions", "laion"), "n_ordinary": counts["ordinary"],
            "repeats": counts["verbatim"] // len(ev["verbatim"]), "n_verbatim": len(ev["verbatim"]),
            "n_image_dup": sum(u["kind"] == "image_dup" for u in manifest["unique"]),
            "n_caption_dup": len(ev["caption_dup"]), "n_eval": len(ev["heldout"])}


def attach_ground_truth(model_dir: Path, data_dir: Path, compact: bool = False) -> Path:
    """Copy a data set's manifest and images into ``model_dir/testbed`` (the probe goes there too).

    ``compact`` ships the recipe and the images' digest instead of the ordinary images (see
    :func:`ground_truth_images`); the planted images are in the manifest's data set either way."""
    root = Path(model_dir) / "testbed"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(data_dir) / "manifest.json", root / "manifest.json")
    if not compact:
        shutil.copyfile(Path(data_dir) / "images.npz", root / "images.npz")
        return root
    manifest = json.loads((root / "manifest.json").read_text())
    with np.load(Path(data_dir) / "images.npz") as z:
        images = z["images"]
    write_text(root / "recipe.json", json.dumps({"build": recipe_of(manifest), "sha256": _digest(images)}, indent=1))
    (root / "images.npz").unlink(missing_ok=True)
    return root


def training_items(images: np.ndarray, manifest: dict) -> tuple[list[str], list[str | None]]:
    """Ids and captions of the unique training images: each image under the caption it was trained with most."""
    counts: dict[int, Counter] = {}
    for item in manifest.get("train", []):
        counts.setdefault(int(item["image"]), Counter())[item["caption"]] += 1
    captions = [counts[i].most_common(1)[0][0] if i in counts else None for i in range(len(images))]
    return [str(i) for i in range(len(images))], captions


def build_testbed_index(model_dir: str | Path, out_dir: str | Path | None = None, progress: bool = True,
                        embedder=None) -> TrainingIndex:
    """The index of a testbed model's training images, written to ``<model>/index`` by default: pixels, or
    the vectors of a copy-detection ``embedder`` (compared by cosine)."""
    root = Path(model_dir) / "testbed"
    manifest = json.loads((root / "manifest.json").read_text())
    images = ground_truth_images(root)
    ids, captions = training_items(images, manifest)
    return build_index(images, out_dir or Path(model_dir) / "index", embedder or PixelEmbedder(), ids=ids,
                       captions=captions, progress=progress)


def attach_amg_companions(model_dir: str | Path, latent_bar: float = 0.3, pixel_size: int = 32,
                          progress: bool = True) -> tuple[TrainingIndex, Path]:
    """What a latent testbed ships for AMG beside its copy-detector index: a pixel index in ``index-pixels/``
    (thumbnails in fp16, a second similarity AMG must escape, since a small learned embedder alone can be
    fooled) and, in ``index/``, a latent screen of the training images' VAE latents with its bar."""
    import torch
    from diffusers import AutoencoderKL
    from memfree.images import from_uint8
    from memfree.similarity import SCREEN_FILE, LatentScreen, write_index_tuning
    model_dir = Path(model_dir)
    root = model_dir / "testbed"
    manifest = json.loads((root / "manifest.json").read_text())
    images = ground_truth_images(root)
    ids, captions = training_items(images, manifest)
    pixels = build_index(images, model_dir / "index-pixels", PixelEmbedder(size=pixel_size), ids=ids,
                         captions=captions, factory="fp16", progress=progress)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", use_safetensors=True).eval()
    with torch.no_grad():
        screen = LatentScreen.from_images(vae, from_uint8(images))
    path = screen.save(model_dir / "index" / SCREEN_FILE)
    write_index_tuning(model_dir / "index", latent_bar=latent_bar)
    return pixels, path
