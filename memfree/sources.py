"""Training images to index, read shard by shard: a folder of image files, webdataset tar shards in img2dataset's
layout (``KEY.jpg|png|webp``, ``KEY.txt`` caption, ``KEY.json`` metadata) or parquet files (``id``, ``caption`` and
``image`` bytes or an ``image_path``), as local paths or fsspec URLs (``file://``, ``s3://``, ...).

A shard is the unit of resumable work: one tar file, one parquet file, or a run of ``shard_size`` files of a folder.
An image that cannot be read or decoded is skipped and counted, never fatal.
"""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
ID_COLUMNS, CAPTION_COLUMNS = ("id", "key"), ("caption", "text")
BYTES_COLUMNS, PATH_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes"), ("image_path", "path", "file")


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``kind`` is folder, tar or parquet; ``name`` names its output files."""
    name: str
    kind: str
    url: str
    files: tuple[str, ...] = ()
    captions: tuple[str | None, ...] = ()


@dataclass
class Sample:
    id: str
    caption: str | None
    data: bytes | None   # the encoded image; None when the sample has none (counted as skipped)


def _fs(url: str):
    import fsspec
    return fsspec.core.url_to_fs(url)


def _stem(path: str) -> str:
    return posixpath.basename(path.rstrip("/")).split(".")[0] or "shard"


def list_shards(source: str, captions: str | None = None, shard_size: int = 10_000) -> list[Shard]:
    """The shards of ``source``: a tar or parquet file, a glob of them, or a folder holding tar files, parquet files
    or images (these with an optional captions file as for :func:`memfree.index.load_image_source`)."""
    fs, path = _fs(source)
    protocol = source.split("://")[0] + "://" if "://" in source else ""
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith((".tar", ".parquet")))
        if not files:
            return _folder_shards(source, captions, shard_size)
    elif fs.exists(path):
        files = [path]
    else:
        raise ValueError(f"image source {source} does not exist")
    shards = []
    for f in files:
        kind = "tar" if f.lower().endswith(".tar") else "parquet" if f.lower().endswith(".parquet") else None
        if kind is None:
            raise ValueError(f"{f} is neither a .tar (webdataset) nor a .parquet file")
        shards.append(Shard(f"{kind}-{_stem(f)}", kind, protocol + f if protocol and "://" not in f else f))
    if len({s.name for s in shards}) != len(shards):
        raise ValueError(f"the shards of {source} do not have distinct file names")
    return shards


def _folder_shards(source: str, captions: str | None, shard_size: int) -> list[Shard]:
    from pathlib import Path
    from memfree.index import load_image_source
    files, names, caps = load_image_source(Path(source.removeprefix("file://")), captions)
    return [Shard(f"folder-{i // shard_size:06d}", "folder", source, tuple(map(str, files[i:i + shard_size])),
                  tuple(caps[i:i + shard_size])) for i in range(0, len(files), shard_size)]


def read_shard(shard: Shard) -> Iterator[Sample]:
    """The samples of one shard, in stored order."""
    if shard.kind == "folder":
        for f, cap in zip(shard.files, shard.captions):
            try:
                with open(f, "rb") as fh:
                    data = fh.read()
            except OSError:
                data = None
            yield Sample(posixpath.basename(f), cap, data)
    elif shard.kind == "tar":
        yield from _read_tar(shard.url)
    elif shard.kind == "parquet":
        yield from _read_parquet(shard.url)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def _tar_sample(key: str, parts: dict[str, bytes]) -> Sample:
    meta = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = {}
    caption = parts["txt"].decode("utf-8", "replace").strip() if "txt" in parts else meta.get("caption")
    data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    return Sample(str(meta.get("key") or posixpath.basename(key)), caption or None, data)


def _read_tar(url: str) -> Iterator[Sample]:
    """A webdataset tar: consecutive members sharing a key (the path up to the first dot of the name) form a sample."""
    import fsspec
    with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, name = posixpath.split(member.name)
            stem, _, ext = name.partition(".")
            if stem.startswith("_") or not ext:
                continue
            if posixpath.join(folder, stem) != key and key is not None:
                yield _tar_sample(key, parts)
                parts = {}
            key = posixpath.join(folder, stem)
            parts[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield _tar_sample(key, parts)


def _pick(names: list[str], choices: tuple[str, ...], what: str, url: str, required: bool = True) -> str | None:
    found = next((c for c in choices if c in names), None)
    if found is None and required:
        raise ValueError(f"{url} has no {what} column ({' or '.join(choices)}); it has {', '.join(names)}")
    return found


def _read_parquet(url: str) -> Iterator[Sample]:
    import fsspec
    import pyarrow.parquet as pq
    with fsspec.open(url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        id_col, cap_col = _pick(names, ID_COLUMNS, "id", url), _pick(names, CAPTION_COLUMNS, "caption", url, False)
        img_col = _pick(names, BYTES_COLUMNS, "image", url, False)
        path_col = None if img_col else _pick(names, BYTES_COLUMNS + PATH_COLUMNS, "image or image path", url)
        cols = [c for c in (id_col, cap_col, img_col, path_col) if c]
        base = posixpath.dirname(url)
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            rows = batch.to_pydict()
            for r in range(batch.num_rows):
                data = rows[img_col][r] if img_col else None
                if isinstance(data, dict):   # Hugging Face datasets' Image feature: {"bytes", "path"}
                    data = data.get("bytes")
                if path_col and rows[path_col][r]:
                    data = _read_file(rows[path_col][r], base)
                cap = rows[cap_col][r] if cap_col else None
                yield Sample(str(rows[id_col][r]), cap or None, data)


def _read_file(path: str, base: str) -> bytes | None:
    import fsspec
    full = path if "://" in path or posixpath.isabs(path) else posixpath.join(base, path)
    try:
        with fsspec.open(full, "rb") as fh:
            return fh.read()
    except (OSError, ValueError):
        return None


def decode_image(data: bytes | None) -> np.ndarray | None:
    """An encoded image as H×W×3 uint8 RGB, or None when it is missing, corrupt or not an image."""
    if not data:
        return None
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:   # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...) on bad input
        return None
