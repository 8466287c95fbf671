"""`memfree bench index`: the index at scale (memfree.index_scale) on synthetic embeddings.

Vectors are generated in chunks from a seed and never held all at once: unit vectors of a mixture of 1024
Gaussian clusters in a 32-d latent space, mapped linearly to ``dim`` with a little noise, so that neighbours are
structured as in a real embedding (of low intrinsic dimension) rather than uniformly random. They are written as embedding shards in the layout a build leaves, then indexed by
:func:`memfree.index_scale.index_from_shards` as `memfree index build` does. Held-out queries from the same
mixture are searched one at a time (p50 / p99 latency); recall@10 is against exact inner-product search,
computed shard by shard; 20 warm-up queries first are not timed. Memory is the process's resident set, sampled
every 20 ms: in all (memory-mapped file pages that were touched count too) and without file-backed pages (anon).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 100_000
CLUSTERS, LATENT, NOISE = 1024, 32, 0.1
WARM = 20


def _mixture(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((CLUSTERS, LATENT), dtype=np.float32)
    lift = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    return centres, lift


def synthetic(n: int, dim: int, seed: int, part: int, mixture) -> np.ndarray:
    """``n`` unit vectors of chunk ``part``: a point of a Gaussian mixture in a LATENT-d space, mapped linearly to
    ``dim`` and given a little isotropic noise (neighbours as hard to find as in a 32-d space), normalised."""
    centres, lift = mixture
    rng = np.random.default_rng([seed, 1, part])
    z = centres[rng.integers(0, CLUSTERS, n)] + 0.5 * rng.standard_normal((n, LATENT), dtype=np.float32)
    x = z @ lift + NOISE * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class PeakMemory:
    """The peak resident set of this process while in the ``with`` block, sampled every 20 ms (MB)."""

    def __enter__(self):
        import psutil
        self.proc, self.peak, self.anon, self.stop = psutil.Process(), 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            m = self.proc.memory_info()
            self.peak, self.anon = max(self.peak, m.rss), max(self.anon, m.rss - m.shared)
            self.stop.wait(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mb, self.anon_mb = round(self.peak / 2**20, 1), round(self.anon / 2**20, 1)


def write_shards(work: Path, n: int, dim: int, seed: int) -> float:
    """Write ``n`` synthetic vectors as embedding shards of CHUNK; returns seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    t0, mixture = time.perf_counter(), _mixture(dim, seed)
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for part, lo in enumerate(range(0, n, CHUNK)):
        name = f"syn-{part:05d}"
        if (shards / f"{name}.json").exists():
            continue
        v = synthetic(min(CHUNK, n - lo), dim, seed, part, mixture)
        np.save(shards / f"{name}.npy", v)
        ids = [f"v{j}" for j in range(lo, lo + len(v))]
        pq.write_table(pa.table({"id": ids, "caption": [f"caption of {i}" for i in ids]}), shards / f"{name}.parquet")
        (shards / f"{name}.json").write_text(json.dumps({"shard": name, "rows": len(v), "skipped": 0}))
    return time.perf_counter() - t0


def exact_top(work: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k positions of each query, shard by shard."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    offset = 0
    for f in sorted((work / "shards").glob("*.npy")):
        v = np.load(f, mmap_mode="r")
        s = queries @ np.asarray(v).T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + offset], 1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        offset += len(v)
    return best_i


def run_bench(vectors: int, dim: int, work: Path, nprobes: tuple[int, ...] = (16, 32, 64), queries: int = 300,
              memory_budget: int = 4 * 2**30, seed: int = 0, keep: bool = False) -> list[dict]:
    """Build the index of ``vectors`` synthetic vectors in ``work`` and measure recall@10 and latency per nprobe."""
    import faiss
    import torch
    from memfree.index import TrainingIndex
    from memfree.index_scale import index_from_shards
    spec = {"kind": "synthetic", "dim": dim, "metric": "cosine"}
    gen_s = write_shards(work, vectors, dim, seed)
    q = synthetic(queries, dim, seed + 10**6, 0, _mixture(dim, seed))
    truth = exact_top(work, q, 10)
    with PeakMemory() as build_mem:
        t0 = time.perf_counter()
        meta = index_from_shards(work, spec, memory_budget)
        build_s = time.perf_counter() - t0
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count()
    rows = []
    with PeakMemory() as search_mem:
        index = TrainingIndex.load(work, _Fixed(spec))
        ivf = faiss.try_extract_index_ivf(index.index)
        for nprobe in nprobes if ivf is not None else (None,):
            if ivf is not None:
                ivf.nprobe = nprobe
            for i in range(WARM):   # the first queries fault the mapped files in: not timed
                index.search(torch.from_numpy(q[i:i + 1]), 10)
            found, times = [], []
            for i in range(queries):
                t = time.perf_counter()
                _, pos = index.search(torch.from_numpy(q[i:i + 1]), 10)
                times.append((time.perf_counter() - t) * 1000)
                found.append(pos[0].numpy())
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            rows.append({"vectors": vectors, "dim": dim, "nprobe": nprobe, "recall_at_10": round(recall, 4),
                         "p50_ms": round(float(np.percentile(times, 50)), 3),
                         "p99_ms": round(float(np.percentile(times, 99)), 3)})
    disk = sum(f.stat().st_size for f in work.iterdir() if f.is_file())
    common = {"factory": meta["factory"], "rerank_candidates": 100 if meta["scale"]["rerank"] else None,
              "build_seconds": round(build_s, 1), "build_vectors_per_s": round(vectors / build_s),
              "train_seconds": meta["scale"].get("train_seconds"), "fill_seconds": meta["scale"].get("fill_seconds"),
              "generate_seconds": round(gen_s, 1), "peak_memory_mb": max(build_mem.mb, search_mem.mb),
              "build_peak_memory_mb": build_mem.mb, "search_peak_memory_mb": search_mem.mb,
              "build_peak_anon_mb": build_mem.anon_mb, "search_peak_anon_mb": search_mem.anon_mb,
              "warmup_queries": WARM,
              "index_codes_mb": round(meta["scale"]["memory_bytes"] / 2**20, 1),
              "index_files_mb": round(disk / 2**20, 1), "memory_budget_mb": memory_budget // 2**20,
              "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "threads": threads, "queries": queries, "query_batch": 1,
              "data": f"synthetic clustered unit vectors: {CLUSTERS} Gaussian clusters in a {LATENT}-d latent space, "
                      f"lifted linearly to {dim}-d, noise {NOISE}, seed {seed}"}
    if not keep:
        shutil.rmtree(work)
    return [{**r, **common} for r in rows]


class _Fixed:
    """A stand-in embedder of the synthetic vectors (the index only needs its spec, dim and metric)."""

    def __init__(self, spec: dict):
        self.kind, self.dim, self.metric, self._spec = spec["kind"], spec["dim"], spec["metric"], spec

    def spec(self) -> dict:
        return self._spec


def embedding_throughput(images: int, work: Path, side: int = 256, embedder: str = "pixel:64", seed: int = 0) -> dict:
    """Images per second of the embedding stage (read a webdataset shard, decode JPEG, embed, write) on ``images``
    synthetic side×side JPEGs (smooth random images at quality 90), in this process."""
    import io
    import tarfile
    from PIL import Image
    from memfree.index import parse_embedder
    from memfree.index_scale import embed_shards
    from memfree.sources import list_shards
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tarfile.open(work / "00000.tar", "w") as tar:
        for i in range(images):
            small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buf, format="JPEG", quality=90)
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    t0 = time.perf_counter()
    embed_shards(list_shards(str(work / "00000.tar")), parse_embedder(embedder), work / "out")
    seconds = time.perf_counter() - t0
    shutil.rmtree(work)
    return {"images": images, "image_side": side, "format": "JPEG q90 in a webdataset tar", "embedder": embedder,
            "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count()}
