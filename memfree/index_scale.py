"""Indexes of internet-size training sets (hundreds of millions of images and more).

A build has two stages. **Embedding**: the source's shards (:mod:`memfree.sources`) are embedded one by one, in
this process or on Ray Data in an actor pool; each shard leaves ``shards/NAME.npy`` (float32 vectors),
``shards/NAME.parquet`` (id, caption) and, written last, ``shards/NAME.json`` (rows, skipped), so an interrupted
build resumes with the shards still missing. **Indexing**: an IVF-PQ index whose parameters follow from the number
of vectors and a memory budget (:func:`choose_params`; exact below 200k vectors) is trained on a sample and filled
shard by shard, never holding all vectors in memory. Beside it: ``vectors.f16.npy`` (for exact re-ranking, read
memory-mapped), ``items.parquet`` (id and caption by position, in row groups) and ``ids.sorted.npy`` /
``ids.order.npy`` (position by id). meta.json (format 3) is written last; :meth:`TrainingIndex.load` opens the
index memory-mapped as a :class:`ScaledIndex`.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memfree.index import (EXACT_LIMIT, Embedder, IndexMismatchError, TrainingIndex, check_spec, embedder_from_spec,
                           portable_spec, resolved_spec, save_npy)
from memfree.io import atomic_write, write_json
from memfree.sources import Shard, decode_image, list_shards, read_shard

ROW_GROUP = 4096       # items.parquet rows per row group: a caption lookup reads one group
RERANK = 10            # an IVF-PQ search re-ranks RERANK * k candidates exactly from the fp16 vectors
TRAIN_PER_LIST = 39    # FAISS's minimum training points per k-means centroid
TRAIN_MAX = 2**18      # at most this many training vectors (0.5 GB at 512-d; FAISS copies them twice)


def parse_size(text: str) -> int:
    """Bytes from ``4GB``, ``512MB``, ``1.5G`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (write e.g. 4GB or 512MB)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def choose_params(n: int, dim: int, memory_budget: int, factory: str = "auto") -> dict:
    """Index parameters for ``n`` vectors of ``dim`` whose search-time memory (codes, ids, centroids) must fit
    ``memory_budget`` bytes: exact (Flat) when small enough, else IVF with nlist ≈ 4·√n (a power of two) and PQ
    with the most bytes per vector (at most 64) that fit."""
    if factory not in ("auto", "flat", "ivfpq"):
        raise ValueError(f"unknown factory {factory!r}: use auto, flat or ivfpq")
    if factory == "flat" or (factory == "auto" and n <= EXACT_LIMIT and n * dim * 4 <= memory_budget):
        if n * dim * 4 > memory_budget:
            raise ValueError(f"a flat index of {n} vectors needs {n * dim * 4 / 2**20:.0f} MB, over the budget")
        return {"factory": "Flat", "nlist": None, "m": None, "nprobe": None, "rerank": False,
                "memory_bytes": n * dim * 4}
    if n < 1000:
        raise ValueError(f"an IVF-PQ index needs at least 1000 vectors, got {n}; use factory flat")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(16, min(nlist, 65536, 2 ** int(math.log2(n // TRAIN_PER_LIST))))
    fixed = nlist * dim * 4
    per_vector = (memory_budget - fixed) / n - 8   # 8 bytes: the id stored with each code
    fits = [m for m in range(1, min(64, dim) + 1) if dim % m == 0 and m <= per_vector]
    if not fits:
        need = (fixed + n * (8 + min(d for d in range(1, dim + 1) if dim % d == 0 and d >= min(8, dim)))) / 2**20
        raise ValueError(f"{n} vectors do not fit a memory budget of {memory_budget / 2**20:.0f} MB "
                         f"(an IVF-PQ index needs at least {need:.0f} MB)")
    m = max(fits)
    nprobe = max(16, min(128, nlist // 64))
    coarse = f"IVF{nlist}" + ("_HNSW32" if nlist > 4096 else "")   # many lists: assign through a graph, not a scan
    return {"factory": f"{coarse},PQ{m}np", "nlist": nlist, "m": m, "nprobe": nprobe, "rerank": True,
            "memory_bytes": int(fixed + n * (m + 8))}


# -- embedding, shard by shard ---------------------------------------------------------------------------------
def embed_shard(shard: Shard, embedder: Embedder, out: Path, batch_size: int = 256) -> dict:
    """Embed one shard into ``out/NAME.npy`` and ``out/NAME.parquet``; ``out/NAME.json`` ({rows, skipped}) is
    written last and marks the shard done. Images that cannot be decoded are skipped and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    ids, caps, vecs, batch, skipped = [], [], [], [], 0

    def flush():
        by_shape: dict[tuple, list[int]] = {}
        for j, a in enumerate(batch):
            by_shape.setdefault(a.shape, []).append(j)
        out_b = np.zeros((len(batch), embedder.dim), np.float32)
        with torch.no_grad():
            for js in by_shape.values():
                x = torch.from_numpy(np.stack([batch[j] for j in js])).permute(0, 3, 1, 2).float() / 255.0
                out_b[js] = embedder(x).float().cpu().numpy()
        vecs.append(out_b)
        batch.clear()

    for s in read_shard(shard):
        img = decode_image(s.data)
        if img is None:
            skipped += 1
            continue
        ids.append(s.id)
        caps.append(s.caption)
        batch.append(img)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, embedder.dim), np.float32)
    table = pa.table({"id": pa.array(ids, pa.string()), "caption": pa.array(caps, pa.string())})
    atomic_write(out / f"{shard.name}.npy", lambda p: save_npy(p, vectors))
    atomic_write(out / f"{shard.name}.parquet", lambda p: pq.write_table(table, p))
    info = {"shard": shard.name, "rows": len(ids), "skipped": skipped}
    write_json(out / f"{shard.name}.json", info)
    return info


class _ShardEmbedder:
    """The callable class of Ray Data's actor pool: each actor rebuilds the embedder once, then embeds whole shards."""

    def __init__(self, spec: dict, out: str, batch_size: int, device: str):
        self.embedder = embedder_from_spec(spec)
        if device != "cpu" and hasattr(self.embedder, "to"):
            self.embedder.to(device)
        self.out, self.batch_size = Path(out), batch_size

    def __call__(self, batch: dict) -> dict:
        infos = [embed_shard(Shard(**json.loads(s)), self.embedder, self.out, self.batch_size) for s in batch["shard"]]
        return {k: np.array([i[k] for i in infos]) for k in ("shard", "rows", "skipped")}


def _embed_on_ray(pending: list[Shard], embedder: Embedder, out: Path, batch_size: int, address: str | None,
                  workers: int, on_shard: Callable[[dict], None] | None) -> None:
    import dataclasses
    import ray
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:   # a local cluster of `workers` CPUs and a small object store: shards travel as file names only
            ray.init(num_cpus=workers, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 and embedder.spec()["kind"] != "pixel"
        ds = ray.data.from_items([{"shard": json.dumps(dataclasses.asdict(s))} for s in pending],
                                 override_num_blocks=len(pending))
        size = max(1, min(workers, len(pending), int(gpus) if use_gpu else workers))
        done = ds.map_batches(_ShardEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                              num_gpus=1 if use_gpu else 0,
                              num_cpus=0 if use_gpu else 1,
                              fn_constructor_args=(embedder.spec(), str(out), batch_size, "cuda" if use_gpu else "cpu"))
        for row in done.iter_rows():
            if on_shard:
                on_shard({"shard": str(row["shard"]), "rows": int(row["rows"]), "skipped": int(row["skipped"])})
    finally:
        if started:
            ray.shutdown()


def embed_shards(shards: Sequence[Shard], embedder: Embedder, out: Path, batch_size: int = 256, ray: bool = False,
                 ray_address: str | None = None, workers: int = 2,
                 on_shard: Callable[[dict], None] | None = None) -> dict:
    """Embed the shards not yet done in ``out`` (in this process, or on Ray with ``ray`` / ``ray_address``);
    returns {"embedded": shards embedded now, "reused": shards found done}."""
    out.mkdir(parents=True, exist_ok=True)
    plan = {"embedder": embedder.spec()}
    if (out / "build.json").exists():
        check_spec(json.loads((out / "build.json").read_text())["embedder"], plan["embedder"],
                    f"half-built index at {out.parent} (delete {out} to start over)")
    else:
        write_json(out / "build.json", plan)
    pending = [s for s in shards if not (out / f"{s.name}.json").exists()]
    if pending and (ray or ray_address):
        _embed_on_ray(pending, embedder, out, batch_size, ray_address, workers, on_shard)
    else:
        for s in pending:
            info = embed_shard(s, embedder, out, batch_size)
            if on_shard:
                on_shard(info)
    return {"embedded": len(pending), "reused": len(shards) - len(pending)}


# -- the index, from the embedded shards -----------------------------------------------------------------------
def _shard_names(shards_dir: Path) -> list[str]:
    return sorted(p.stem for p in shards_dir.glob("*.json") if p.name != "build.json")


def index_from_shards(out_dir: str | Path, embedder_spec: dict, memory_budget: int = 4 * 2**30,
                      factory: str = "auto", names: Sequence[str] | None = None, seed: int = 0,
                      final_spec: dict | None = None) -> dict:
    """Write the index of the embedded shards in ``out_dir/shards`` (``names``, default all, in sorted order) to
    ``out_dir``, holding one shard's vectors at a time; returns meta.json's content. With ``final_spec``, the
    second embedder's shards in ``out_dir/final-shards`` become ``final.f16.npy`` (two-stage search)."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    out, shards = Path(out_dir), Path(out_dir) / "shards"
    names = list(names) if names is not None else _shard_names(shards)
    infos = [json.loads((shards / f"{s}.json").read_text()) for s in names]
    counts = [i["rows"] for i in infos]
    n, dim, metric = sum(counts), int(embedder_spec["dim"]), embedder_spec["metric"]
    if n == 0:
        raise ValueError("no images to index (every image was skipped)" if infos else "no images to index")
    params = choose_params(n, dim, memory_budget, factory)
    (out / "meta.json").unlink(missing_ok=True)   # whatever index was here is being replaced
    vec = lambda s: np.load(shards / f"{s}.npy", mmap_mode="r")
    index = faiss.index_factory(dim, params["factory"], faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    if not index.is_trained:   # a sample spread over all shards, read through memory maps
        size = min(n, max(TRAIN_PER_LIST * params["nlist"], 256 * 64), TRAIN_MAX)
        take = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        bounds = np.cumsum([0] + counts)
        sample = np.empty((size, dim), np.float32)
        for s, lo, hi in zip(names, bounds, bounds[1:]):
            a, b = np.searchsorted(take, [lo, hi])
            sample[a:b] = vec(s)[take[a:b] - lo]
        index.train(sample)
        del sample
    t1 = time.perf_counter()
    f16 = None   # written sequentially, not through a memory map (whose dirty pages would count as resident)
    if params["rerank"]:
        f16 = open(out / ".vectors.f16.npy.tmp", "wb")
        np.lib.format.write_array_header_1_0(f16, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)})
    writer = pq.ParquetWriter(out / ".items.parquet.tmp", pa.schema([("id", pa.string()), ("caption", pa.string())]))
    ids, pos = [], 0
    try:
        for s, c in zip(names, counts):
            v = np.load(shards / f"{s}.npy").astype(np.float32, copy=False)
            if len(v) != c or (c and v.shape[1] != dim):
                raise ValueError(f"shard {s} holds {v.shape} vectors, its record says {c} of {dim}")
            index.add(v)
            if f16 is not None:
                f16.write(v.astype(np.float16).tobytes())
            table = pq.read_table(shards / f"{s}.parquet")
            writer.write_table(table, row_group_size=ROW_GROUP)
            ids.append(np.array([i.encode() for i in table.column("id").to_pylist()] or [b""], bytes)[:c])
            pos += c
    finally:
        writer.close()
        if f16 is not None:
            f16.close()
    keys = np.concatenate(ids)
    del ids
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(dup):
        raise ValueError(f"{len(dup)} ids repeat across the shards (e.g. {sorted_keys[dup[0]].decode()}); "
                         "ids must be unique")
    atomic_write(out / "ids.sorted.npy", lambda p: save_npy(p, sorted_keys))
    atomic_write(out / "ids.order.npy", lambda p: save_npy(p, order.astype(np.int64)))
    (out / ".items.parquet.tmp").replace(out / "items.parquet")
    files = {"index": "index.faiss", "items": "items.parquet"}
    if params["rerank"]:
        (out / ".vectors.f16.npy.tmp").replace(out / "vectors.f16.npy")
        files["vectors"] = "vectors.f16.npy"
    else:
        (out / "vectors.f16.npy").unlink(missing_ok=True)
    atomic_write(out / "index.faiss", lambda p: faiss.write_index(index, str(p)))
    if final_spec is not None:
        files["final"] = _write_final(out, names, counts, final_spec)
    meta = {"format": 3, "embedder": portable_spec(embedder_spec, out), "count": n, "factory": params["factory"],
            "nprobe": params["nprobe"], "files": files,
            **({"final_embedder": portable_spec(final_spec, out)} if final_spec is not None else {}),
            "scale": {**params, "shards": len(names), "skipped": sum(i["skipped"] for i in infos),
                      "memory_budget": memory_budget, "train_seconds": round(t1 - t0, 1),
                      "fill_seconds": round(time.perf_counter() - t1, 1)}}
    write_json(out / "meta.json", meta)
    return meta


def build_scaled(source: str, out_dir: str | Path, embedder: Embedder, captions: str | None = None,
                 batch_size: int = 256, shard_size: int = 10_000, memory_budget: int = 4 * 2**30,
                 factory: str = "auto", ray: bool = False, ray_address: str | None = None, workers: int = 2,
                 on_shard: Callable[[dict], None] | None = None, final_embedder: Embedder | None = None
                 ) -> "ScaledIndex":
    """Index ``source`` (a folder, tar / parquet files or a glob of them, local or an fsspec URL) into ``out_dir``:
    shards embedded resumably (on Ray with ``ray`` or ``ray_address``), then the index within ``memory_budget``.
    With ``final_embedder`` (e.g. a copy detector) the search is two-stage: ``embedder`` finds candidates, the
    final embedder's stored vectors rank them and give the similarity (as AMG's authors used CLIP, then SSCD)."""
    out, shards = Path(out_dir), list_shards(source, captions, shard_size)
    if embedder.dim == 0 or (final_embedder is not None and final_embedder.dim == 0):
        raise ValueError("indexing at scale needs an embedder of fixed size: pass e.g. --embedder pixel:64")
    if not shards:
        raise ValueError(f"{source} holds no images")
    embed_shards(shards, embedder, out / "shards", batch_size, ray, ray_address, workers, on_shard)
    if final_embedder is not None:
        embed_shards(shards, final_embedder, out / "final-shards", batch_size, ray, ray_address, workers, on_shard)
    index_from_shards(out, embedder.spec(), memory_budget, factory, [s.name for s in shards],
                      final_spec=final_embedder.spec() if final_embedder is not None else None)
    return TrainingIndex.load(out, embedder)


# -- the built index, memory-mapped ----------------------------------------------------------------------------
class ItemColumn(Sequence):
    """One column of items.parquet read by position, a row group at a time (the last few kept)."""

    def __init__(self, path: Path, name: str):
        import pyarrow.parquet as pq
        self.file, self.name = pq.ParquetFile(path), name
        rows = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.cumsum([0] + rows)   # the first position of each row group
        self.n, self._cache = self.file.metadata.num_rows, {}

    def __len__(self) -> int:
        return self.n

    def _group(self, g: int) -> list:
        if g not in self._cache:
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[g] = self.file.read_row_group(g, columns=[self.name]).column(0).to_pylist()
        return self._cache[g]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = int(i) + (self.n if int(i) < 0 else 0)
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._group(g)[i - int(self.starts[g])]

    def __iter__(self):
        for g in range(self.file.num_row_groups):
            yield from self.file.read_row_group(g, columns=[self.name]).column(0).to_pylist()


def _write_final(out: Path, names: Sequence[str], counts: Sequence[int], spec: dict) -> str:
    """Concatenate the final embedder's shards, in the index's order, into ``final.f16.npy``; the same images
    must have been kept (ids compared shard by shard)."""
    import pyarrow.parquet as pq
    shards, final, dim = out / "shards", out / "final-shards", int(spec["dim"])
    with open(out / ".final.f16.npy.tmp", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (sum(counts), dim)})
        for s, c in zip(names, counts):
            if not (final / f"{s}.json").exists():
                raise ValueError(f"shard {s} has no final embedding in {final}")
            v = np.load(final / f"{s}.npy")
            ids = [pq.read_table(d / f"{s}.parquet").column("id") for d in (final, shards)]
            same = ids[0].equals(ids[1])
            if len(v) != c or not same:
                raise ValueError(f"shard {s}: the two embedders kept different images; delete {final} and rebuild")
            f.write(v.astype(np.float16).tobytes())
    (out / ".final.f16.npy.tmp").replace(out / "final.f16.npy")
    return "final.f16.npy"


class ScaledIndex(TrainingIndex):
    """A format-3 index: the FAISS index memory-mapped, items read by position or id from parquet, and exact
    re-ranking of IVF-PQ candidates from the fp16 vectors on disk."""

    def __init__(self, embedder: Embedder, index, path: Path, meta: dict):
        import faiss
        files = meta["files"]
        self.embedder, self.index, self.path, self.meta = embedder, index, path, meta
        self.factory, self.nprobe = str(meta["factory"]), meta.get("nprobe")
        self.ids, self.captions = ItemColumn(path / files["items"], "id"), ItemColumn(path / files["items"], "caption")
        self.stored = np.load(path / files["vectors"], mmap_mode="r") if files.get("vectors") else None
        self._keys = np.load(path / "ids.sorted.npy", mmap_mode="r")
        self._order = np.load(path / "ids.order.npy", mmap_mode="r")
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = self.nprobe or 16

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def position(self, item_id: str) -> int | None:
        """The position of ``item_id``, by binary search in the sorted ids on disk; None when absent."""
        key = str(item_id).encode()
        j = int(np.searchsorted(self._keys, key))
        return int(self._order[j]) if j < len(self._keys) and self._keys[j] == key else None

    def caption_of(self, item_id: str) -> str | None:
        """The caption of ``item_id`` (KeyError when the id is not indexed), reading one row group."""
        pos = self.position(item_id)
        if pos is None:
            raise KeyError(item_id)
        return self.captions[pos]

    def search(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stored is None:
            return super().search(vectors, k)
        q = vectors.detach().float().cpu()
        if q.ndim != 2 or q.shape[1] != self.embedder.dim:
            raise ValueError(f"queries must be (B, {self.embedder.dim}), got {tuple(q.shape)}")
        if self.embedder.metric == "cosine":
            q = F.normalize(q, dim=1)
        k = max(1, min(k, len(self)))
        _, cand = self.index.search(np.ascontiguousarray(q.numpy()), min(len(self), RERANK * k))
        cand = torch.from_numpy(cand).long()
        found = (cand >= 0).numpy()
        flat = np.where(found, cand.numpy(), 0).reshape(-1)
        uniq, inv = np.unique(flat, return_inverse=True)
        x = torch.from_numpy(np.asarray(self.stored[uniq], dtype=np.float32))[torch.from_numpy(inv)]
        d, i = best_of(q, x.reshape(*cand.shape, -1), cand, self.embedder.metric, k)
        return d.to(vectors.device), i.to(vectors.device)

    def vectors(self, idx: torch.Tensor) -> torch.Tensor:
        if self.stored is None:
            return super().vectors(idx)
        return stored_rows(self.stored, idx)


def best_of(q: torch.Tensor, x: torch.Tensor, cand: torch.Tensor, metric: str, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each query q (B, D) by exact comparison with their vectors x (B, C, D): ℓ2
    distances (smallest first) or inner products (largest first), and their positions ``cand`` (B, C); a missing
    candidate (position −1) ranks last and comes back as −1."""
    found = cand >= 0
    k = min(k, cand.shape[1])
    if metric == "l2":
        d, order = (q[:, None] - x).norm(dim=-1).masked_fill(~found, float("inf")).topk(k, dim=1, largest=False)
    else:
        d, order = (x @ q[:, :, None])[..., 0].masked_fill(~found, float("-inf")).topk(k, dim=1)
    return d, cand.gather(1, order).masked_fill(~torch.isfinite(d), -1)


def stored_rows(stored: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (any shape) of an fp16 vector file opened memory-mapped, as float32 on ``idx``'s device."""
    flat = idx.detach().cpu().reshape(-1).numpy()
    out = np.asarray(stored[flat], dtype=np.float32) if len(flat) else np.zeros((0, stored.shape[1]), np.float32)
    return torch.from_numpy(out).reshape(*idx.shape, -1).to(idx.device)


def open_scaled(path: Path, meta: dict, embedder: Embedder) -> "ScaledIndex | TwoStageIndex":
    """Open a format-3 index (called by :meth:`TrainingIndex.load`), the FAISS index memory-mapped; a
    :class:`TwoStageIndex` when it was built with a final embedder."""
    import faiss
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)   # zero-copy mmap of the lists (FAISS >= 1.10)
    index = faiss.read_index(str(path / meta["files"]["index"]), flag)
    if index.ntotal != int(meta["count"]):
        raise ValueError(f"index at {path} is inconsistent; rerun `memfree index build`")
    first = ScaledIndex(embedder, index, path, meta)
    if "final_embedder" in meta:
        return TwoStageIndex(first, embedder_from_spec(resolved_spec(meta["final_embedder"], path)))
    return first


class _TwoStageEmbedder:
    """Both embeddings of an image side by side, [candidate | final]; compared by the final one's metric."""

    def __init__(self, first: Embedder, final: Embedder):
        self.first, self.final = first, final
        self.metric, self.dim = final.metric, first.dim + final.dim

    def spec(self) -> dict:
        return {"kind": "two-stage", "first": self.first.spec(), "final": self.final.spec(), "dim": self.dim,
                "metric": self.metric}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(images), self.final(images)], dim=1)

    def first_part(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding[:, :self.first.dim]

    def final_part(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding[:, self.first.dim:]


class TwoStageIndex:
    """Two-stage search over a format-3 index: its own embedder finds ``candidates`` per query (IVF-PQ, re-ranked
    exactly when it can), then the final embedder's vectors (``final.f16.npy``, memory-mapped) rank them; the
    distances or similarities returned are the final embedder's. ``embedder`` yields both embeddings of an image;
    ids, captions and lookups by id are the first index's."""

    candidates = 100

    def __init__(self, first: ScaledIndex, final_embedder: Embedder):
        self.first = first
        self.embedder = _TwoStageEmbedder(first.embedder, final_embedder)
        self.final = np.load(first.path / first.meta["files"]["final"], mmap_mode="r")
        self.path, self.meta, self.ids, self.captions = first.path, first.meta, first.ids, first.captions
        self.factory, self.nprobe = first.factory, first.nprobe

    def __len__(self) -> int:
        return len(self.first)

    def position(self, item_id: str) -> int | None:
        return self.first.position(item_id)

    def caption_of(self, item_id: str) -> str | None:
        return self.first.caption_of(item_id)

    def search(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best of the first stage's candidates by the final embedding: (scores, positions), each (B, k)."""
        q = vectors.detach().float().cpu()
        if q.ndim != 2 or q.shape[1] != self.embedder.dim:
            raise ValueError(f"queries must be (B, {self.embedder.dim}): both embeddings, got {tuple(q.shape)}")
        first, final = self.embedder.first_part(q), self.embedder.final_part(q)
        _, cand = self.first.search(first, max(k, self.candidates))
        cand = cand.cpu()
        if self.embedder.metric == "cosine":
            final = F.normalize(final, dim=1)
        d, i = best_of(final, self.vectors(cand.clamp(min=0)), cand, self.embedder.metric, k)
        return d.to(vectors.device), i.to(vectors.device)

    def vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """The final embedder's stored vectors of the items at ``idx``."""
        return stored_rows(self.final, idx)


__all__ = ["IndexMismatchError", "ScaledIndex", "TwoStageIndex", "build_scaled", "choose_params", "embed_shard",
           "embed_shards", "index_from_shards", "open_scaled", "parse_size"]
