"""A nearest-neighbour index over a training set (one embedding, id and caption per image), searched with FAISS.

Anti-Memorization Guidance uses it during sampling: the k nearest training images of a batch of generations,
their stored vectors (for a differentiable similarity) and their captions. An index is a folder holding
``index.faiss``, ``items.jsonl`` and ``meta.json``; meta.json is written last, so its presence marks a complete index.
An index grown by :func:`add_to_index` holds ``index.N.faiss`` and ``items.N.jsonl`` instead, named in meta.json.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memfree.io import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXACT_LIMIT = 200_000  # above this many vectors "auto" builds an approximate IVF+PQ index
NPROBE = 16


class IndexMismatchError(ValueError):
    """Raised when an index (or a half-built one) does not match the embedder it is used with."""


class Embedder:
    """Maps images (B, 3, H, W) in [0, 1] to vectors (B, dim) float32, differentiably (AMG backpropagates)."""

    kind: str = ""
    dim: int = 0
    metric: str = "l2"

    def spec(self) -> dict:
        """JSON-able description of the embedding (kind, dim, metric, preprocessing); an index stores it."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _resize(images: torch.Tensor, size: int | None, mode: str = "bilinear") -> torch.Tensor:
    if size is None or images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=False)


class PixelEmbedder(Embedder):
    """Raw pixels × 255, compared by Euclidean distance: a uint8 image maps to exact integers 0..255, which
    FAISS's 8-bit direct scalar quantizer stores losslessly. ``size=None`` keeps (and on first call fixes) the
    input size."""

    kind, metric, scale = "pixel", "l2", 255.0

    def __init__(self, size: int | None = None):
        self.size = size
        self.dim = 3 * size * size if size else 0

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "metric": self.metric, "size": self.size,
                "resize": "bilinear", "scale": self.scale}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is None and self.dim == 0 and images.shape[-1] == images.shape[-2]:
            self.size = int(images.shape[-1])
        out = _resize(images.float(), self.size).flatten(1) * self.scale
        if self.dim == 0:
            self.dim = out.shape[1]
        return out


class TorchScriptEmbedder(Embedder):
    """A TorchScript image model (e.g. SSCD, the copy-detection model of Pizzi et al., whose usual preprocessing is
    a resize to 320 (or 288) and the ImageNet mean/std); outputs are L2-normalised and compared by cosine."""

    kind, metric = "torchscript", "cosine"

    def __init__(self, path: str | Path, size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), resize: str = "bilinear"):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"TorchScript model {self.path} does not exist")
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, yet SSCD ships as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        self.size, self.mean, self.std, self.resize = int(size), tuple(map(float, mean)), tuple(map(float, std)), resize
        with torch.no_grad():
            self.dim = int(self(torch.zeros(1, 3, self.size, self.size)).shape[1])

    def to(self, device: torch.device | str) -> "TorchScriptEmbedder":
        """Move the model to ``device`` (inputs must live there too); returns self."""
        self.module.to(device)
        return self

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "metric": self.metric, "size": self.size, "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize, "path": str(self.path)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.float(), self.size, self.resize)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        out = self.module((x - mean) / std)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return F.normalize(out.flatten(1).float(), dim=1)


def parse_embedder(text: str) -> Embedder:
    """An embedder from a CLI string: ``pixel``, ``pixel:SIZE``, ``sscd:PATH`` (resize 320) or
    ``torchscript:PATH`` (resize 224); the TorchScript forms take an optional ``:SIZE`` after the path."""
    kind, _, rest = text.partition(":")
    if kind == "pixel":
        if not rest:
            return PixelEmbedder()
        if rest.isdigit() and int(rest) > 0:
            return PixelEmbedder(int(rest))
    elif kind in ("sscd", "torchscript") and rest:
        size = 320 if kind == "sscd" else 224
        head, _, tail = rest.rpartition(":")
        if not Path(rest).is_file() and head and tail.isdigit():
            rest, size = head, int(tail)
        if not Path(rest).is_file():
            raise ValueError(f"embedder model file {rest} does not exist")
        return TorchScriptEmbedder(rest, size=size)
    raise ValueError(f"unknown embedder {text!r}: use pixel, pixel:SIZE, sscd:PATH or torchscript:PATH")


def portable_spec(spec: dict, index_dir: Path) -> dict:
    """An embedder file that ships with the index (inside the folder that holds the index) is recorded
    relative to the index, so the pair can be moved or installed as a package together."""
    if "path" not in spec:
        return spec
    file, home = Path(spec["path"]).resolve(), Path(index_dir).resolve().parent
    if home in file.parents:
        return {**spec, "path": os.path.relpath(file, Path(index_dir).resolve())}
    return spec


def resolved_spec(spec: dict, index_dir: Path) -> dict:
    """The stored spec with an embedder file recorded relative to the index made absolute again."""
    if "path" in spec and not Path(spec["path"]).is_absolute():
        return {**spec, "path": os.path.normpath(Path(index_dir).resolve() / spec["path"])}
    return spec


def embedder_from_spec(spec: dict) -> Embedder:
    """Rebuild the embedder an index was built with from its stored spec."""
    if spec["kind"] == "pixel":
        emb = PixelEmbedder(spec.get("size"))
        emb.dim = spec["dim"]
        return emb
    if spec["kind"] == "torchscript":
        return TorchScriptEmbedder(spec["path"], spec["size"], spec["mean"], spec["std"],
                                   spec.get("resize", "bilinear"))
    raise ValueError(f"unknown embedder kind {spec['kind']!r} in index")


def check_spec(stored: dict, given: dict, where: str) -> None:
    """Raise IndexMismatchError naming every field (but the model path) where two embedder specs differ."""
    keys = [k for k in dict.fromkeys([*stored, *given]) if k != "path"]
    diff = [f"{k} {stored.get(k)!r} (index) vs {given.get(k)!r} (given)" for k in keys if stored.get(k) != given.get(k)]
    if diff:
        raise IndexMismatchError(f"{where} was built with a different embedder: " + "; ".join(diff))


def _index_files(meta: dict) -> tuple[str, str]:
    """The FAISS and items files that ``meta`` names: ``index.faiss`` and ``items.jsonl`` as built; an index grown by
    :func:`add_to_index` names new files, so that replacing meta.json switches every file at once."""
    files = meta.get("files") or {}
    names = (str(files.get("index", "index.faiss")), str(files.get("items", "items.jsonl")))
    if any(Path(name).name != name or name in ("", ".", "..") for name in names):
        raise ValueError(f"meta.json names files outside the index folder: {', '.join(names)}")
    return names


def _remove_unused(folder: Path, meta: dict) -> None:
    """Delete the FAISS and items files in ``folder`` that ``meta`` does not name (left by an index it replaced)."""
    keep = set(_index_files(meta))
    for f in folder.iterdir():
        if f.name not in keep and re.fullmatch(r"index(\.\d+)?\.faiss|items(\.\d+)?\.jsonl", f.name) and f.is_file():
            f.unlink(missing_ok=True)


class TrainingIndex:
    """Training-set embeddings in FAISS with their ids and captions; results are best first."""

    def __init__(self, embedder: Embedder, index, ids: list[str], captions: list[str | None], factory: str,
                 nprobe: int | None = None, path: Path | None = None):
        import faiss
        self.embedder, self.index, self.ids, self.captions = embedder, index, ids, captions
        self.factory, self.nprobe, self.path = factory, nprobe, path
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe or NPROBE
            ivf.make_direct_map()

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, images, out_dir: str | Path, embedder: Embedder, **kwargs) -> "TrainingIndex":
        """Same as :func:`build_index`."""
        return build_index(images, out_dir, embedder, **kwargs)

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> "TrainingIndex":
        """Open a built index; with ``embedder`` given, check it matches the one the index was built with."""
        import faiss
        path = Path(path)
        if path.is_file():
            raise ValueError(f"index {path} is a file; pass the folder `memfree index build` wrote")
        if not (path / "meta.json").exists():
            state = "incomplete" if path.exists() and any(path.iterdir()) else "missing"
            raise FileNotFoundError(f"index at {path} is {state} (no meta.json); (re)run `memfree index build`")
        try:
            meta = json.loads((path / "meta.json").read_text())
            stored, count, factory = meta["embedder"], int(meta["count"]), str(meta["factory"])
            index_file, items_file = _index_files(meta)
            scaled = meta.get("format") == 3   # built at scale (memfree.index_scale): opened memory-mapped below
            items = [] if scaled else [json.loads(line) for line in (path / items_file).read_text().splitlines()
                                       if line.strip()]
            index = None if scaled else faiss.read_index(str(path / index_file))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"index at {path} is broken ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "rebuild it with `memfree index build`") from e
        if embedder is None:
            embedder = embedder_from_spec(resolved_spec(stored, path))
        elif isinstance(embedder, PixelEmbedder) and embedder.dim == 0 and stored["kind"] == "pixel":
            embedder.size, embedder.dim = stored.get("size"), stored["dim"]
        check_spec(stored, embedder.spec(), f"index at {path}")
        if scaled:
            from memfree.index_scale import open_scaled
            return open_scaled(path, meta, embedder)
        if not (index.ntotal == len(items) == count):
            raise ValueError(f"index at {path} is inconsistent; rerun `memfree index build`")
        return cls(embedder, index, [str(it["id"]) for it in items], [it.get("caption") for it in items],
                   factory, meta.get("nprobe"), path)

    def search(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest stored vectors of each query (B, dim): (distances for l2 / cosine similarities, positions),
        each (B, k) on the queries' device. IVF indexes may return position -1 when too few vectors are probed."""
        q = vectors.detach().float()
        if q.ndim != 2 or q.shape[1] != self.embedder.dim:
            raise ValueError(f"queries must be (B, {self.embedder.dim}), got {tuple(q.shape)}")
        if self.embedder.metric == "cosine":
            q = F.normalize(q, dim=1)
        k = max(1, min(k, len(self)))
        d, i = self.index.search(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32), k)
        d, i = torch.from_numpy(d), torch.from_numpy(i).long()
        if self.embedder.metric == "l2":  # recompute exactly: FAISS's ‖q‖² + ‖x‖² − 2q·x cancels badly on pixels
            found = i >= 0
            d = (q.cpu()[:, None] - self.vectors(i.clamp_min(0))).norm(dim=-1).masked_fill(~found, float("inf"))
            d, order = d.sort(dim=1)
            i = i.gather(1, order)
        return d.to(vectors.device), i.to(vectors.device)

    def vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Stored vectors at integer positions, shape (...,) -> (..., dim) float32 on ``idx``'s device."""
        flat = np.ascontiguousarray(idx.detach().cpu().reshape(-1).numpy(), dtype=np.int64)
        out = self.index.reconstruct_batch(flat) if len(flat) else np.zeros((0, self.embedder.dim), np.float32)
        return torch.from_numpy(out).float().reshape(*idx.shape, -1).to(idx.device)


def _batch_tensor(images, start: int, stop: int) -> list[torch.Tensor]:
    """Images [start, stop) as (B, 3, H, W) float tensors in [0, 1]; one tensor, or one per size if sizes differ."""
    if isinstance(images, np.ndarray):
        arrays = [images[start:stop]]
    else:
        from PIL import Image
        arrays = []
        for p in images[start:stop]:
            try:
                with Image.open(p) as im:
                    arrays.append(np.asarray(im.convert("RGB"))[None])
            except (OSError, SyntaxError, ValueError) as e:
                raise ValueError(f"{p} is not a readable image ({e})") from None
        if len({a.shape for a in arrays}) == 1:
            arrays = [np.concatenate(arrays)]
    return [torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0 for a in arrays]


SIZE_MISMATCH = ("the images have different sizes ({sizes} besides {size}x{size} seen first): "
                 "pass --embedder pixel:SIZE to compare them at one size")


def _embed(embedder: Embedder, images, start: int, stop: int, fixed_size: int | None = None,
           size_mismatch: str = SIZE_MISMATCH) -> np.ndarray:
    batches = _batch_tensor(images, start, stop)
    if fixed_size is not None and any(x.shape[-2:] != (fixed_size, fixed_size) for x in batches):
        sizes = sorted({f"{x.shape[-1]}x{x.shape[-2]}" for x in batches if x.shape[-2:] != (fixed_size, fixed_size)})
        raise ValueError(size_mismatch.replace("{sizes}", ", ".join(sizes)).replace("{size}", str(fixed_size)))
    with torch.no_grad():
        out = torch.cat([embedder(x) for x in batches]).float().numpy()
    if out.shape[1] != embedder.dim:
        raise ValueError(f"embedding has {out.shape[1]} values, expected {embedder.dim}: images of different sizes "
                         "need a fixed size (e.g. --embedder pixel:64)")
    return out


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly ``path`` (no ".npy" appended)."""
    with open(path, "wb") as f:  # a file handle, so np.save does not append ".npy" to the temp name
        np.save(f, array)


def _embed_in_shards(embed, shards: Path, plan: dict, where: str, progress: bool) -> np.ndarray:
    """All ``plan["count"]`` vectors, ``embed(start, stop)`` called batch by batch; each batch is saved to
    ``shards/NNNNNN.npy`` and ``plan`` to ``shards/build.json``, so a rerun with the same plan embeds only the
    batches still missing. A rerun with another plan is refused (``where`` names the unfinished work)."""
    from tqdm.auto import tqdm
    n, batch_size = plan["count"], plan["batch_size"]
    shards.mkdir(parents=True, exist_ok=True)
    if (shards / "build.json").exists():
        old = json.loads((shards / "build.json").read_text())
        check_spec(old["embedder"], plan["embedder"], where)
        if (old["count"], old["batch_size"]) != (n, batch_size):
            raise IndexMismatchError(f"{where} was started with {old['count']} images in batches of "
                                     f"{old['batch_size']}, now {n} in batches of {batch_size}")
        other = [k for k in plan if k not in ("embedder", "count", "batch_size") and old.get(k) != plan[k]]
        if other:
            raise IndexMismatchError(f"{where} was started with other images ({', '.join(other)} differ)")
    else:
        atomic_write(shards / "build.json", lambda p: p.write_text(json.dumps(plan)))
    starts = range(0, n, batch_size)
    for b, start in enumerate(tqdm(starts, desc="embedding", unit="batch", disable=not progress)):
        shard = shards / f"{b:06d}.npy"
        if not shard.exists():
            vec = embed(start, min(start + batch_size, n))
            atomic_write(shard, lambda p: save_npy(p, vec))
    return np.concatenate([np.load(shards / f"{b:06d}.npy") for b in range(len(starts))]).astype(np.float32)


def make_faiss_index(vectors: np.ndarray, metric: str, factory: str) -> tuple[object, str, int | None]:
    """A FAISS index of ``vectors`` for ``metric``: exact up to 200k vectors, IVF-PQ above (``factory="auto"``);
    returns (index, factory name, nprobe or None)."""
    import faiss
    n, dim = vectors.shape
    if factory == "auto":  # 8-bit direct only when lossless: integer pixel values, i.e. no resizing happened
        exact8 = metric == "l2" and vectors.min() >= 0 and vectors.max() <= 255 and (vectors == vectors.round()).all()
        factory = "ivfpq" if n > EXACT_LIMIT else ("sq8" if exact8 else "flat")
    if factory == "flat":
        name, nprobe = "Flat", None
    elif factory == "sq8":  # integer pixel values are stored exactly; cosine vectors need a trained range
        name, nprobe = ("SQ8_direct" if metric == "l2" else "SQ8"), None
    elif factory == "fp16":  # half the size of flat; exact for pixels averaged 2×2 (multiples of 1/4 under 512)
        name, nprobe = "SQfp16", None
    elif factory == "ivfpq":
        if n < 100:
            raise ValueError(f"an IVF+PQ index needs at least 100 images, got {n}; use --factory flat")
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        m = max(d for d in range(1, min(dim, 64) + 1) if dim % d == 0)
        nbits = max(1, min(8, int(math.log2(min(n, 100_000) / 39))))  # 39 training points per PQ centroid
        # "np": skip polysemous training, slow and only useful for polysemous (Hamming-filtered) search
        name, nprobe = f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}") + "np", NPROBE
    else:
        raise ValueError(f"unknown factory {factory!r}: use auto, flat, fp16, sq8 or ivfpq")
    index = faiss.index_factory(dim, name, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = vectors if n <= 100_000 else vectors[np.sort(rng.choice(n, 100_000, replace=False))]
        index.train(sample)
    index.add(vectors)
    return index, name, nprobe


def build_index(images: np.ndarray | Sequence[str | Path], out_dir: str | Path, embedder: Embedder,
                ids: Sequence[str] | None = None, captions: Sequence[str | None] | None = None,
                batch_size: int = 256, factory: str = "auto", progress: bool = True) -> TrainingIndex:
    """Embed ``images`` (uint8 N×H×W×3 array or image paths) in resumable batches and write an index to ``out_dir``.

    Each batch's vectors are saved to ``out_dir/shards``; rerunning after an interruption embeds only missing batches.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no images to index")
    ids = [str(i) for i in (ids if ids is not None else range(n))]
    captions = list(captions) if captions is not None else [None] * n
    if len(ids) != n or len(captions) != n:
        raise ValueError(f"{n} images but {len(ids)} ids and {len(captions)} captions")
    if batch_size < 1:   # checked before any folder is made, so a bad call leaves nothing behind
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out, shards = Path(out_dir), Path(out_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    learns_size = isinstance(embedder, PixelEmbedder) and embedder.size is None
    if embedder.dim == 0:  # e.g. PixelEmbedder() learns its size from the first image
        _embed(embedder, images, 0, 1)
    fixed = embedder.size if learns_size else None
    plan = {"embedder": embedder.spec(), "count": n, "batch_size": batch_size}
    vectors = _embed_in_shards(lambda start, stop: _embed(embedder, images, start, stop, fixed), shards, plan,
                               f"half-built index at {out} (delete the folder to start over)", progress)
    index, name, nprobe = make_faiss_index(vectors, embedder.metric, factory)
    import faiss
    (out / "meta.json").unlink(missing_ok=True)  # an older index here is being replaced: no longer complete
    atomic_write(out / "index.faiss", lambda p: faiss.write_index(index, str(p)))
    lines = "".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in zip(ids, captions))
    atomic_write(out / "items.jsonl", lambda p: p.write_text(lines))
    meta = {"format": 1, "embedder": portable_spec(embedder.spec(), out), "count": n, "factory": name,
            "nprobe": nprobe}
    atomic_write(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    _remove_unused(out, meta)   # the files of an index this one replaced, e.g. one grown by add_to_index
    shutil.rmtree(shards)
    return TrainingIndex(embedder, index, ids, captions, name, nprobe, out)


def _read_captions(path: Path, names: list[str]) -> list[str | None]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text().splitlines()
        if len(lines) != len(names):
            raise ValueError(f"{path} has {len(lines)} captions for {len(names)} images")
        return [line.strip() or None for line in lines]
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"captions file {path} must be .txt, .jsonl or .csv")
    if rows and not {"file", "caption"} <= set(rows[0]):
        raise ValueError(f"captions file {path} needs the fields 'file' and 'caption'")
    by_name = {Path(r["file"]).name: r["caption"] for r in rows}
    unknown = sorted(set(by_name) - set(names))
    if unknown:
        raise ValueError(f"captions file {path} names {len(unknown)} file(s) not among the images "
                         f"(e.g. {', '.join(unknown[:3])}): is it the captions file of this folder?")
    return [by_name.get(name) or None for name in names]


def load_image_source(images: str | Path, captions: str | Path | None = None
                      ) -> tuple[np.ndarray | list[Path], list[str], list[str | None]]:
    """Images, ids and captions to index from a folder of image files with an optional captions file (.txt in
    sorted file order, or .jsonl/.csv with file and caption)."""
    path = Path(images)
    if not path.exists():
        raise ValueError(f"image source {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"image source {path} is not a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    names = [p.name for p in files]
    if captions and not Path(captions).is_file():
        raise ValueError(f"captions file {captions} does not exist")
    caps = _read_captions(Path(captions), names) if captions else [None] * len(files)
    return files, names, caps


ADDING = "adding"   # the folder, inside an index, where add_to_index keeps its plan and embedded batches


def add_to_index(index_dir: str | Path, images: np.ndarray | Sequence[str | Path] | str | Path,
                 ids: Sequence[str] | None = None, captions: Sequence[str | None] | str | Path | None = None,
                 batch_size: int = 256, embedder: Embedder | None = None, progress: bool = True) -> TrainingIndex:
    """Add images to the built index at ``index_dir``, e.g. to protect images of your own (a client's catalogue, a
    person's photos) that the training-set crawl did not hold: AMG then steers away from them as from training images.

    ``images`` is what :func:`build_index` takes (a uint8 N×H×W×3 array or image paths) or a folder of images, whose
    ``captions`` may then be a captions file as for :func:`load_image_source`. Default ids: the file names for
    paths and folders, the next positions (``len(index)``, ``len(index) + 1``, ...) for an array. Ids already in
    the index, or repeated, are refused.

    The images are embedded with the index's own embedder, rebuilt from its stored spec (``embedder``, if given, is
    used instead and must match that spec); a pixel index that stores pixels exactly (``SQ8_direct``) takes only
    images of its size. A trained FAISS index (IVF+PQ, SQ8) encodes the new vectors with its trained quantizers,
    without retraining; an exact one grows. Embedding is resumable as in :func:`build_index`: batches are saved to
    ``index_dir/adding``, and a rerun of an interrupted add embeds only the missing ones. The grown index is
    written to new files and switched to by replacing meta.json, so a crash leaves the old index loadable.
    """
    path = Path(index_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(images, (str, Path)):
        caption_file = captions if isinstance(captions, (str, Path)) else None
        images, names, file_captions = load_image_source(images, caption_file)
        captions = file_captions if captions is None or caption_file is not None else captions
    elif isinstance(captions, (str, Path)):
        raise ValueError("a captions file goes with a folder of images; with an array or paths pass a list")
    else:
        names = None if isinstance(images, np.ndarray) else [Path(p).name for p in images]
    n = len(images)
    if n == 0:
        raise ValueError("no images to add")
    index = TrainingIndex.load(path, embedder)
    if json.loads((path / "meta.json").read_text()).get("format") == 3:
        raise ValueError(f"the index at {path} was built at scale: add a shard of images to its source and rerun "
                         "`memfree index build` (finished shards are reused)")
    staging = path / ADDING
    staged = json.loads((staging / "build.json").read_text()) if (staging / "build.json").exists() else None
    # default array ids continue from the size the index had when this add began, so a rerun names them alike
    onto = int(staged.get("onto", len(index))) if staged and ids is None and names is None else len(index)
    ids = [str(i) for i in (ids if ids is not None else names if names is not None else range(onto, onto + n))]
    captions = list(captions) if captions is not None else [None] * n
    if len(ids) != n or len(captions) != n:
        raise ValueError(f"{n} images but {len(ids)} ids and {len(captions)} captions")
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    repeated = [i for i, c in counts.items() if c > 1]
    if repeated:
        raise ValueError(f"the new images repeat {len(repeated)} id(s) (e.g. {', '.join(repeated[:3])}); "
                         "ids must be unique")
    plan = {"embedder": index.embedder.spec(), "count": n, "batch_size": batch_size, "onto": onto,
            "ids": hashlib.sha1(json.dumps(ids).encode()).hexdigest()}
    meta = json.loads((path / "meta.json").read_text())
    if staged is not None and staged.get("ids") == plan["ids"] and index.ids[len(index) - n:] == ids \
            and len(index) == int(staged.get("onto", -1)) + n:
        _remove_unused(path, meta)   # this very add was switched to before; only its clean-up was cut short
        shutil.rmtree(staging)
        return index
    known = set(index.ids)
    present = [i for i in ids if i in known]
    if present:
        raise ValueError(f"{len(present)} of the {n} ids are already in the index at {path} (e.g. "
                         f"{', '.join(present[:3])}); ids must stay unique: pass other ids or rename the files")
    emb, exact = index.embedder, index.factory == "SQ8_direct" and isinstance(index.embedder, PixelEmbedder)
    fixed = emb.size if exact else None
    mismatch = (f"the index at {path} stores " + "{size}x{size} images exactly (pixel embedder) and these are "
                "{sizes}: resize them to {size}x{size} first")
    vectors = _embed_in_shards(lambda start, stop: _embed(emb, images, start, stop, fixed, mismatch), staging, plan,
                               f"unfinished add to the index at {path} (delete {staging} to start over)", progress)
    import faiss
    grown = index.index
    ivf = faiss.try_extract_index_ivf(grown)
    if ivf is not None:
        ivf.make_direct_map(False)   # stored as build_index stores it; TrainingIndex makes it again
    grown.add(vectors)   # trained indexes encode with their trained quantizers: no retraining
    total = grown.ntotal
    files = {"index": f"index.{total}.faiss", "items": f"items.{total}.jsonl"}
    old_items = (path / _index_files(meta)[1]).read_text()
    lines = old_items + ("" if not old_items or old_items.endswith("\n") else "\n") + "".join(
        json.dumps({"id": i, "caption": c}) + "\n" for i, c in zip(ids, captions))
    atomic_write(path / files["index"], lambda p: faiss.write_index(grown, str(p)))
    atomic_write(path / files["items"], lambda p: p.write_text(lines))
    new_meta = {**meta, "format": 2, "count": total, "files": files}
    atomic_write(path / "meta.json", lambda p: p.write_text(json.dumps(new_meta, indent=1)))  # the switch
    _remove_unused(path, new_meta)
    shutil.rmtree(staging)
    return TrainingIndex(emb, grown, index.ids + ids, index.captions + captions, index.factory, index.nprobe, path)
