"""Prompt audits at scale: millions of prompts scored for memorization (:func:`memfree.detect.detection_scores`)
in chunks, in this process or across Ray workers (each loads the model once), resumably: every chunk is written to
``OUT/part-NNNNNN.parquet`` when scored, and ``OUT/scores.parquet`` (prompt, score, memorized) joins them at the
end. Generation g of every prompt starts from seed + g, so scores do not depend on the chunking or the workers.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from memfree.index import IndexMismatchError
from memfree.io import atomic_write, write_json


def score_chunk(model, prompts: Sequence[str], part: int, out: Path, generations: int, seed: int) -> int:
    """Score one chunk and write ``out/part-NNNNNN.parquet``; returns the number of prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from memfree.detect import detection_scores
    scores = detection_scores(model, list(prompts), generations, seed).mean(axis=1)
    thr = model.settings.threshold
    table = pa.table({"prompt": pa.array(list(prompts), pa.string()), "score": pa.array(scores, pa.float64()),
                      "memorized": pa.array([None if thr is None else bool(s > thr) for s in scores], pa.bool_())})
    atomic_write(out / f"part-{part:06d}.parquet", lambda p: pq.write_table(table, p))
    return len(prompts)


class _ChunkScorer:
    """Ray Data's callable class: the model is loaded once per actor."""

    def __init__(self, model: str | None, out: str, generations: int, seed: int):
        import memfree
        self.model, self.out, self.generations, self.seed = memfree.load(model), Path(out), generations, seed

    def __call__(self, batch: dict) -> dict:
        done = [score_chunk(self.model, json.loads(p), int(i), self.out, self.generations, self.seed)
                for i, p in zip(batch["part"], batch["prompts"])]
        return {"part": np.asarray(batch["part"]), "rows": np.array(done)}


def detect_at_scale(model: str | None, prompts: Sequence[str], out: str | Path, chunk: int = 1024,
                    generations: int = 1, seed: int = 0, ray: bool = False, ray_address: str | None = None,
                    workers: int = 2, on_chunk: Callable[[int], None] | None = None) -> dict:
    """Score ``prompts`` with the model at ``model`` (path or name) into ``out/scores.parquet``, skipping chunks an
    interrupted run finished; returns {prompts, scored_now, seconds, prompts_per_s}."""
    import pyarrow.parquet as pq
    prompts, out = list(prompts), Path(out)
    if not prompts or chunk < 1:
        raise ValueError("no prompts given" if not prompts else "chunk must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    plan = {"model": model, "chunk": chunk, "generations": generations, "seed": seed,
            "prompts": hashlib.sha1(json.dumps(prompts).encode()).hexdigest(), "count": len(prompts)}
    if (out / "plan.json").exists() and json.loads((out / "plan.json").read_text()) != plan:
        raise IndexMismatchError(f"{out} holds an unfinished audit of other prompts or settings; use another --out")
    write_json(out / "plan.json", plan)
    parts = range((len(prompts) + chunk - 1) // chunk)
    pending = [p for p in parts if not (out / f"part-{p:06d}.parquet").exists()]
    t0, scored = time.perf_counter(), 0
    if pending and (ray or ray_address):
        import ray as ray_mod
        started = not ray_mod.is_initialized()
        if started:
            ray_mod.init(**({"address": ray_address} if ray_address else
                            {"num_cpus": workers, "object_store_memory": 256 * 2**20, "include_dashboard": False}),
                         log_to_driver=False)
        try:
            ray_mod.data.DataContext.get_current().enable_progress_bars = False
            ds = ray_mod.data.from_items([{"part": p, "prompts": json.dumps(prompts[p * chunk:(p + 1) * chunk])}
                                         for p in pending], override_num_blocks=len(pending))
            gpus = ray_mod.cluster_resources().get("GPU", 0)
            size = max(1, min(workers, len(pending), int(gpus) or workers))
            for row in ds.map_batches(_ChunkScorer, batch_size=1, compute=ray_mod.data.ActorPoolStrategy(size=size),
                                      num_gpus=1 if gpus else 0,
                                      fn_constructor_args=(model, str(out), generations, seed)).iter_rows():
                scored += int(row["rows"])
                if on_chunk:
                    on_chunk(int(row["part"]))
        finally:
            if started:
                ray_mod.shutdown()
    elif pending:
        import memfree
        m = memfree.load(model)
        for p in pending:
            scored += score_chunk(m, prompts[p * chunk:(p + 1) * chunk], p, out, generations, seed)
            if on_chunk:
                on_chunk(p)
    seconds = time.perf_counter() - t0
    with pq.ParquetWriter(out / ".scores.parquet.tmp", pq.read_schema(out / "part-000000.parquet")) as w:
        for p in parts:
            w.write_table(pq.read_table(out / f"part-{p:06d}.parquet"))
    (out / ".scores.parquet.tmp").replace(out / "scores.parquet")
    return {"prompts": len(prompts), "scored_now": scored, "seconds": round(seconds, 3),
            "prompts_per_s": round(scored / seconds, 2) if scored else None}
