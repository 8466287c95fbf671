"""Similarity of generations to their nearest training images: AMG's normalised ℓ2 (nL2) on pixels, and the
cosine of a copy-detection embedding, over a :class:`memfree.index.TrainingIndex` or an exact pixel index.

nL2 = ℓ2(x, n0) / (α · mean ℓ2(x, z) over the k nearest training images z), with k = 50 and
α = 0.5 (Chen et al.). A generation is memorized when nL2 < 1.4: its nearest training image is much
closer than the crowd of its other neighbours, which is what a copy looks like and what following a
prompt with fresh detail does not.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memfree.images import from_uint8

NL2_THRESHOLD = 1.4
TUNING_FILE = "tuning.json"
SCREEN_FILE = "latent-screen.safetensors"   # a LatentScreen an index folder carries (AMG screens with it by default)
COSINE_THRESHOLD = 0.5   # SSCD cosine above which a generation counts as a copy (AMG's Stable Diffusion setting)


def normalised_l2(distances: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """nL2 per row from the ℓ2 distances to the k nearest training images (B, k), nearest first."""
    return distances[:, 0] / (alpha * distances.mean(dim=1)).clamp(min=1e-12)


def fast_l2(q: torch.Tensor, vectors: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """ℓ2 from each query row (B, D) to every stored row, (B, N), by |a|² + |b|² − 2ab in the stored rows' dtype:
    about ten times faster on the CPU than the direct difference. In float64 it is within about 1e-5 of it for
    vectors of a few hundred dimensions. float32 halves the time again; for the pooled latents of a screen (values
    of order one) it is as close except at near-exact copies, where the cancellation is larger but the σ is far over
    any bar, which is all a screen needs."""
    q = q.to(vectors.device, vectors.dtype)
    d2 = (q * q).sum(1, keepdim=True) + norms - 2 * q @ vectors.T
    return d2.clamp(min=0).sqrt().float()


def _rows_and_norms(vectors: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    v = vectors.to(dtype).contiguous()
    return v, (v * v).sum(1)


def similarity_from_nl2(nl2: torch.Tensor) -> torch.Tensor:
    """s = 1 − nL2/2: 1 for an exact copy, 0 for "no closer than the crowd"; nL2 = 1.4 is s = 0.3."""
    return 1 - nl2 / 2


@dataclass
class Neighbours:
    ids: torch.Tensor        # (B,) nearest training image id
    distance: torch.Tensor   # (B,) ℓ2 to it
    nl2: torch.Tensor        # (B,) normalised ℓ2

    @property
    def memorized(self) -> torch.Tensor:
        return self.nl2 < NL2_THRESHOLD


class PixelIndex:
    """Exact nearest-neighbour search over unique training images in [0, 1] pixel space."""

    def __init__(self, images: np.ndarray | torch.Tensor, k: int = 50, alpha: float = 0.5):
        """``images``: uint8 (N, H, W, 3) as stored, or float (N, C, H, W) in [0, 1]."""
        x = from_uint8(images) if isinstance(images, np.ndarray) and images.dtype == np.uint8 else torch.as_tensor(images)
        self.shape = tuple(x.shape[1:])
        self.vectors = x.reshape(len(x), -1).float().contiguous()
        self.k, self.alpha = min(k, len(x)), alpha

    def __len__(self) -> int:
        return len(self.vectors)

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """ℓ2 from each image (B, C, H, W) in [0, 1] to every training image, (B, N)."""
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match the index's {self.shape}")
        q = images.reshape(len(images), -1).float().to(self.vectors.device)
        # The direct difference, not the |a|²+|b|²−2ab shortcut, so an exact copy is at distance 0.
        return torch.cdist(q, self.vectors, compute_mode="donot_use_mm_for_euclid_dist")

    def search(self, images: torch.Tensor) -> Neighbours:
        d = self.distances(images)
        near, ids = d.topk(self.k, dim=1, largest=False)
        return Neighbours(ids=ids[:, 0], distance=near[:, 0], nl2=normalised_l2(near, self.alpha))


def nearest(index, images: torch.Tensor, k: int = 50, alpha: float = 0.5
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """σ of each image (B,) to its nearest training image, and the neighbours' positions (B, k) in
    the index (nearest first; k = 1 for a cosine index). No gradient: this is the per-step check."""
    with torch.no_grad():
        emb = index.embedder(images)
        if index.embedder.metric == "cosine":
            sim, ids = index.search(emb, 1)
            return sim[:, 0].float(), ids
        d, ids = index.search(emb, k)
        return similarity_from_nl2(normalised_l2(d, alpha)), ids


def similarity_to(index, images: torch.Tensor, ids: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The same σ, differentiable in ``images``, against neighbours already found (``ids`` from
    :func:`nearest`), recomputed from the index's stored vectors."""
    emb = index.embedder(images)
    if hasattr(index.embedder, "final_part"):   # a two-stage index compares by its final embedding
        emb = index.embedder.final_part(emb)
    near = index.vectors(ids).to(emb)                               # (B, k, D)
    if index.embedder.metric == "cosine":
        return torch.nn.functional.cosine_similarity(emb, near[:, 0], dim=1)
    d = (emb[:, None, :] - near).norm(dim=-1)
    return similarity_from_nl2(normalised_l2(d, alpha))


def copy_threshold(metric: str) -> float:
    """σ above which a generation counts as memorized: nL2 < 1.4 (σ > 0.3) for pixels, cosine > 0.5 otherwise."""
    return 1 - NL2_THRESHOLD / 2 if metric == "l2" else COSINE_THRESHOLD


def index_tuning(index) -> dict:
    """What an index's folder records about its embedder in ``tuning.json``: ``copy_threshold`` (the σ that
    separates copies for this embedder) and ``amg`` (per preset, AMGConfig values tuned for it). Empty if none.
    An embedder other than SSCD scores unrelated images on its own scale, so its gate cannot be SSCD's."""
    path = getattr(index, "path", None)
    if path is None or not (Path(path) / TUNING_FILE).is_file():
        return {}
    return json.loads((Path(path) / TUNING_FILE).read_text())


def index_latent_screen(index) -> "LatentScreen | None":
    """The :class:`LatentScreen` an index's folder carries in ``latent-screen.safetensors``, or None."""
    path = getattr(index, "path", None)
    if path is None or not (Path(path) / SCREEN_FILE).is_file():
        return None
    return load_latent_screen(Path(path) / SCREEN_FILE)


def load_latent_screen(path: str | Path) -> "LatentScreen":
    """:meth:`LatentScreen.load`, read once per file version (AMG asks for it on every request)."""
    path = Path(path).resolve()
    return _cached_screen(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_screen(path: str, mtime_ns: int) -> "LatentScreen":
    return LatentScreen.load(path)


def write_index_tuning(index_dir: str | Path, copy_threshold: float | None = None, amg: dict | None = None,
                       **notes) -> Path:
    """Record (merging with what is there) an index's copy threshold and AMG values tuned for its embedder."""
    from memfree.io import write_json
    path = Path(index_dir) / TUNING_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    if copy_threshold is not None:
        data["copy_threshold"] = float(copy_threshold)
    if amg is not None:
        data["amg"] = {**data.get("amg", {}), **amg}
    data.update(notes)
    write_json(path, data)
    return path


def index_copy_threshold(index) -> float:
    """The copy threshold of ``index``: its own ``tuning.json`` value, else the metric's default."""
    value = index_tuning(index).get("copy_threshold")
    return float(value) if value is not None else copy_threshold(index.embedder.metric)


def nearest_training(index, images: torch.Tensor, k: int = 50) -> list[dict]:
    """For each image (B, 3, H, W) in [0, 1]: its nearest training item's id and caption, σ, and the verdict."""
    sig, near = nearest(index, images, k)
    limit = index_copy_threshold(index)
    return [{"id": index.ids[int(near[b, 0])], "caption": index.captions[int(near[b, 0])],
             "similarity": float(sig[b]), "memorized": bool(sig[b] > limit)} for b in range(len(images))]


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 64, grid: int | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] as the denoiser sees their latents: the VAE's posterior means, shifted
    (SD3) and scaled by its factors; average-pooled to grid × grid when ``grid`` is given. On the CPU."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parts = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(vae.device, vae.dtype) * 2 - 1
        z = (vae.encode(x).latent_dist.mean.float().cpu() - shift) * vae.config.scaling_factor
        parts.append(F.adaptive_avg_pool2d(z, grid) if grid is not None else z)
    return torch.cat(parts)


class LatentScreen:
    """A cheap first stage for AMG's check: x̂0 compared, without decoding it, with the training images' own VAE
    latents average-pooled to a small grid, by σ = 1 − nL2/2 over the k nearest (the pixel measure, in latent
    space). An image whose latent σ stays under a bar skips the decode, the embedder and the index search."""

    def __init__(self, latents: torch.Tensor, grid: int = 8, k: int = 50, alpha: float = 0.5):
        """``latents``: (N, C, H, W) of the training images, as the UNet sees them (times the scaling factor)."""
        self.grid, self.alpha = int(grid), alpha
        self.vectors = F.adaptive_avg_pool2d(latents.float(), self.grid).flatten(1).contiguous()
        self.k = min(k, len(self.vectors))
        self._rows = _rows_and_norms(self.vectors, torch.float32)   # a screen: float32 is exact enough, twice as fast

    def __len__(self) -> int:
        return len(self.vectors)

    def similarity(self, x0: torch.Tensor) -> torch.Tensor:
        """σ of each x̂0 (B, C, H, W) in latent space to the nearest training latents, (B,)."""
        q = F.adaptive_avg_pool2d(x0.detach().float(), self.grid).flatten(1)
        near, _ = fast_l2(q, *self._rows).topk(self.k, dim=1, largest=False)
        return similarity_from_nl2(normalised_l2(near, self.alpha))

    @classmethod
    def from_images(cls, vae, images: torch.Tensor, grid: int = 8, batch_size: int = 64) -> "LatentScreen":
        """Encode training images (N, 3, H, W) in [0, 1] with ``vae`` (:func:`encode_latents`)."""
        return cls(encode_latents(vae, images, batch_size), grid)

    def save(self, path: str | Path) -> Path:
        """Write the pooled vectors and settings to a safetensors file."""
        from safetensors.torch import save_file
        path = Path(path)
        save_file({"vectors": self.vectors.contiguous()}, str(path),
                  metadata={"grid": str(self.grid), "k": str(self.k), "alpha": str(self.alpha)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatentScreen":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta, vectors = f.metadata(), f.get_tensor("vectors")
        screen = cls.__new__(cls)
        screen.grid, screen.k, screen.alpha = int(meta["grid"]), int(meta["k"]), float(meta["alpha"])
        screen.vectors = vectors.float()
        screen._rows = _rows_and_norms(screen.vectors, torch.float32)
        return screen


class _LatentPool:
    """The "embedder" of a :class:`LatentIndex`: a latent (B, C, H, W) average-pooled to grid × grid, flattened.
    Differentiable, and it reads latents, not images, so AMG hands it x̂0 without decoding."""

    metric = "l2"
    space = "latent"

    def __init__(self, grid: int, dim: int):
        self.grid, self.dim = int(grid), int(dim)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(latents.float(), self.grid).flatten(1)


class LatentIndex:
    """An exact nL2 index over the training images' VAE latents, for AMG in latent space: x̂0 is compared with
    them and steered away from the nearest without a decode, an embedder or a backward pass through either.
    It has the parts of a :class:`memfree.index.TrainingIndex` that AMG uses (``embedder``, ``search``,
    ``vectors``, ``ids``, ``captions``, ``path`` for ``tuning.json``), so AMG takes either."""

    FILE = "latents.safetensors"

    def __init__(self, latents: torch.Tensor, captions: list[str | None], ids: list[str] | None = None,
                 grid: int = 8, path: str | Path | None = None):
        """``latents``: (N, C, H, W) of the training images as the UNet sees them (times the scaling factor)."""
        vectors = F.adaptive_avg_pool2d(latents.float(), grid).flatten(1)
        if len(captions) != len(vectors):
            raise ValueError(f"{len(captions)} captions for {len(vectors)} latents")
        self.vectors_ = vectors.contiguous()
        self._rows = _rows_and_norms(self.vectors_)
        self.embedder = _LatentPool(grid, vectors.shape[1])
        self.captions = list(captions)
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(vectors))]
        self.path = Path(path) if path is not None else None

    def __len__(self) -> int:
        return len(self.vectors_)

    def search(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ2 distances and positions of the k nearest stored latents, each (B, k), nearest first (an exhaustive
        search; distances by :func:`fast_l2`)."""
        d = fast_l2(vectors.detach(), *self._rows)
        return d.topk(max(1, min(k, len(self))), dim=1, largest=False)

    def vectors(self, idx: torch.Tensor) -> torch.Tensor:
        return self.vectors_[idx.long()]

    @classmethod
    def from_images(cls, vae, images: torch.Tensor, captions: list[str | None], grid: int = 8,
                    batch_size: int = 64, **kwargs) -> "LatentIndex":
        """Encode training images (N, 3, H, W) in [0, 1] with ``vae`` (:func:`encode_latents`)."""
        return cls(encode_latents(vae, images, batch_size), captions, grid=grid, **kwargs)

    def save(self, folder: str | Path) -> Path:
        """Write the pooled latents (fp16) and the items to ``folder``, atomically per file."""
        from safetensors.torch import save_file
        from memfree.io import write_json
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (self.FILE + ".tmp")
        save_file({"vectors": self.vectors_.half().contiguous()}, str(tmp), metadata={"grid": str(self.embedder.grid)})
        tmp.replace(folder / self.FILE)
        write_json(folder / "items.json", {"ids": self.ids, "captions": self.captions})
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "LatentIndex":
        from safetensors import safe_open
        folder = Path(folder)
        if not (folder / cls.FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no latent index ({cls.FILE})")
        with safe_open(str(folder / cls.FILE), "pt") as f:
            grid, vectors = int(f.metadata()["grid"]), f.get_tensor("vectors").float()
        items = json.loads((folder / "items.json").read_text())
        index = cls.__new__(cls)
        index.vectors_, index.embedder = vectors, _LatentPool(grid, vectors.shape[1])
        index._rows = _rows_and_norms(vectors)
        index.captions, index.ids, index.path = items["captions"], items["ids"], folder
        return index


def is_latent_index(index) -> bool:
    """Whether ``index`` compares latents (x̂0 as is) rather than decoded images."""
    return getattr(index.embedder, "space", "pixels") == "latent"


def latent_screen_from_files(model_dir: str | Path, files, size: int | None = None, grid: int = 8,
                             batch_size: int = 16, progress: bool = True) -> "LatentScreen":
    """A :class:`LatentScreen` of image files, encoded by the VAE in ``model_dir/vae`` (any diffusers family) at
    ``size`` × ``size`` (default: the VAE's sample size)."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from tqdm.auto import tqdm
    vae = AutoencoderKL.from_pretrained(Path(model_dir) / "vae", use_safetensors=True).eval()
    side = int(size or vae.config.sample_size)
    parts = []   # a batch of files at a time: the images are never all in memory, only their pooled latents
    for i in tqdm(range(0, len(files), batch_size), desc="latent screen", disable=not progress):
        batch = [np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC)) for f in
                 files[i:i + batch_size]]
        parts.append(encode_latents(vae, torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255,
                                    batch_size, grid))
    return LatentScreen(torch.cat(parts), grid)
