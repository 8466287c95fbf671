"""Indexes at scale (memfree.sources, memfree.index_scale): webdataset and parquet sources, a Ray build identical to
the single-process one, resuming an interrupted build, parameters from a memory budget, mmap search with fp16
re-ranking, captions by id."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from memfree.index import PixelEmbedder, TrainingIndex, build_index
from memfree.index_scale import (ScaledIndex, build_scaled, choose_params, embed_shards, index_from_shards,
                                 parse_size)
from memfree.sources import list_shards, read_shard

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path, keys, images, corrupt=()):
    with tarfile.open(path, "w") as tar:
        for k, a in zip(keys, images):
            _add(tar, f"{k}.png", b"not an image at all" if k in corrupt else _png(a))
            _add(tar, f"{k}.txt", f"caption of {k}".encode())
            _add(tar, f"{k}.json", json.dumps({"key": k, "url": f"http://x/{k}"}).encode())


def test_webdataset_source_reads_captions_and_skips_a_corrupt_image(tmp_path):
    imgs = _images(12)
    keys = [f"{i:09d}" for i in range(12)]
    (tmp_path / "data").mkdir()
    _write_tar(tmp_path / "data" / "00000.tar", keys[:6], imgs[:6], corrupt={keys[3]})
    _write_tar(tmp_path / "data" / "00001.tar", keys[6:], imgs[6:])
    shards = list_shards(str(tmp_path / "data"))
    assert [s.name for s in shards] == ["tar-00000", "tar-00001"]
    samples = list(read_shard(shards[0]))
    assert [s.id for s in samples] == keys[:6] and samples[1].caption == f"caption of {keys[1]}"
    idx = build_scaled(str(tmp_path / "data"), tmp_path / "index", PixelEmbedder(8))
    assert isinstance(idx, ScaledIndex) and len(idx) == 11
    assert idx.meta["scale"]["skipped"] == 1 and keys[3] not in list(idx.ids)
    d, i = idx.search(torch.from_numpy(imgs[7:8]).permute(0, 3, 1, 2).float().flatten(1), 1)
    assert idx.ids[int(i[0, 0])] == keys[7] and float(d[0, 0]) == 0.0
    assert idx.caption_of(keys[7]) == f"caption of {keys[7]}" and idx.position(keys[3]) is None


def test_parquet_sources_with_bytes_or_paths_read_through_an_fsspec_url(tmp_path):
    imgs = _images(10, seed=1)
    (tmp_path / "pq" / "img").mkdir(parents=True)
    ids = [f"p{i}" for i in range(10)]
    rows = [_png(a) for a in imgs[:5]]
    rows[2] = b"\x89PNG broken"
    pq.write_table(pa.table({"id": ids[:5], "caption": [f"c{i}" for i in range(5)], "image": rows}),
                   tmp_path / "pq" / "a.parquet")
    for i in range(5, 10):
        (tmp_path / "pq" / "img" / f"{i}.png").write_bytes(_png(imgs[i]))
    pq.write_table(pa.table({"id": ids[5:], "caption": [f"c{i}" for i in range(5, 10)],
                             "image_path": [f"img/{i}.png" for i in range(5, 10)]}), tmp_path / "pq" / "b.parquet")
    url = f"file://{tmp_path}/pq/*.parquet"
    assert [s.name for s in list_shards(url)] == ["parquet-a", "parquet-b"]
    idx = build_scaled(url, tmp_path / "index", PixelEmbedder(8))
    assert list(idx.ids) == ids[:2] + ids[3:] and idx.meta["scale"]["skipped"] == 1
    assert idx.caption_of("p9") == "c9"
    np.testing.assert_array_equal(idx.vectors(torch.tensor([8])).numpy()[0],
                                  imgs[9].transpose(2, 0, 1).reshape(-1).astype(np.float32))


def _folder(tmp_path, n=40):
    imgs = _images(n, seed=2)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return imgs, folder


def test_a_ray_build_on_two_workers_is_identical_to_the_single_process_build(tmp_path):
    pytest.importorskip("ray")
    imgs, folder = _folder(tmp_path)
    files = sorted(folder.iterdir())
    single = build_index(files, tmp_path / "single", PixelEmbedder(8), ids=[f.name for f in files], factory="flat",
                         progress=False)
    local = build_scaled(str(folder), tmp_path / "local", PixelEmbedder(8), shard_size=10)
    on_ray = build_scaled(str(folder), tmp_path / "ray", PixelEmbedder(8), shard_size=10, ray=True, workers=2)
    assert list(on_ray.ids) == list(local.ids) == single.ids and on_ray.meta["scale"]["shards"] == 4
    every = torch.arange(len(single))
    assert torch.equal(on_ray.vectors(every), single.vectors(every))
    q = torch.from_numpy(imgs[::7]).permute(0, 3, 1, 2).float().flatten(1) + 3.0
    for a, b in zip(on_ray.search(q, 5), single.search(q, 5)):
        assert torch.equal(a, b)
    for name in ("index.faiss", "items.parquet", "ids.order.npy"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _resumes_from_the_second_shard_to_the_same_index(folder, cut, full_dir) -> None:
    """A build cut after its first shard: no index yet, one shard done; resumed, it embeds the other three
    and ends byte-identical to the uninterrupted build in ``full_dir``."""
    assert not (cut / "meta.json").exists()
    assert sorted(p.name for p in (cut / "shards").glob("folder-*.json")) == ["folder-000000.json"]
    seen = []
    resumed = build_scaled(str(folder), cut, PixelEmbedder(8), shard_size=10, on_shard=seen.append)
    assert [s["shard"] for s in seen] == ["folder-000001", "folder-000002", "folder-000003"]
    full = TrainingIndex.load(full_dir)
    assert list(resumed.ids) == list(full.ids)
    every = torch.arange(len(full))
    assert torch.equal(resumed.vectors(every), full.vectors(every))
    for name in ("index.faiss", "items.parquet", "ids.order.npy"):
        assert (cut / name).read_bytes() == (full_dir / name).read_bytes()


def test_an_interrupted_build_resumes_with_the_missing_shards_only_and_ends_identical(tmp_path):
    _, folder = _folder(tmp_path)
    build_scaled(str(folder), tmp_path / "full", PixelEmbedder(8), shard_size=10)

    def crash_after_first(info):
        raise KeyboardInterrupt("killed after the first shard")

    with pytest.raises(KeyboardInterrupt):
        build_scaled(str(folder), tmp_path / "cut", PixelEmbedder(8), shard_size=10, on_shard=crash_after_first)
    _resumes_from_the_second_shard_to_the_same_index(folder, tmp_path / "cut", tmp_path / "full")
    assert embed_shards(list_shards(str(folder), shard_size=10), PixelEmbedder(8),
                        tmp_path / "cut" / "shards") == {"embedded": 0, "reused": 4}


def test_parameters_follow_the_number_of_vectors_and_the_memory_budget():
    assert parse_size("4GB") == 4 * 2**30 and parse_size("512mb") == 512 * 2**20
    assert choose_params(50_000, 512, parse_size("4GB"))["factory"] == "Flat"
    big = choose_params(10**6, 512, parse_size("4GB"))
    assert (big["nlist"], big["m"], big["rerank"]) == (4096, 64, True)
    tight = choose_params(10**6, 512, parse_size("60MB"))
    assert tight["m"] == 32 and tight["memory_bytes"] <= parse_size("60MB")
    assert choose_params(10**7, 512, parse_size("4GB"))["nlist"] == 16384
    assert choose_params(50_000, 512, parse_size("50MB"))["factory"].startswith("IVF")   # flat would not fit
    with pytest.raises(ValueError, match="do not fit"):
        choose_params(10**6, 512, parse_size("10MB"))


def _write_shards(folder, vectors, per_shard):
    (folder / "shards").mkdir(parents=True)
    for s, lo in enumerate(range(0, len(vectors), per_shard)):
        v = vectors[lo:lo + per_shard]
        np.save(folder / "shards" / f"s{s:03d}.npy", v)
        pq.write_table(pa.table({"id": [f"v{j}" for j in range(lo, lo + len(v))],
                                 "caption": [f"caption {j}" for j in range(lo, lo + len(v))]}),
                       folder / "shards" / f"s{s:03d}.parquet")
        (folder / "shards" / f"s{s:03d}.json").write_text(json.dumps({"rows": len(v), "skipped": 0}))


def test_ivfpq_index_is_memory_mapped_and_fp16_reranking_finds_the_exact_neighbours(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    x = centres[rng.integers(0, 20, 6000)] + 0.3 * rng.normal(size=(6000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    _write_shards(tmp_path, x, 1000)
    spec = {"kind": "torchscript", "dim": 32, "metric": "cosine", "size": 8, "mean": [0, 0, 0], "std": [1, 1, 1],
            "resize": "bilinear", "path": "unused.pt"}
    meta = index_from_shards(tmp_path, spec, memory_budget=parse_size("200KB"))
    assert meta["factory"].startswith("IVF") and meta["scale"]["rerank"] and meta["count"] == 6000
    emb = PixelEmbedder(2)   # any embedder object of dim 32 and cosine metric
    emb.dim, emb.metric, emb.spec = 32, "cosine", lambda: spec
    idx = TrainingIndex.load(tmp_path, emb)
    assert isinstance(idx, ScaledIndex) and isinstance(idx.stored, np.memmap)
    q = x[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims, pos = idx.search(torch.from_numpy(q), 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pos.numpy(), exact)])
    assert recall >= 0.9
    assert (pos[:, 0].numpy() == exact[:, 0]).mean() >= 0.95
    np.testing.assert_allclose(sims[:, 0].numpy(), (q * x[pos[:, 0].numpy()]).sum(1), atol=2e-3)
    assert idx.ids[4321] == "v4321" and idx.caption_of("v4321") == "caption 4321" and idx.position("nope") is None


def test_a_prompt_audit_at_scale_resumes_chunk_by_chunk_and_matches_memfree_detect(tiny_sd_path, tmp_path):
    import memfree
    from memfree.detect import detect
    from memfree.detect_scale import detect_at_scale
    prompts = [f"a photo of thing number {i}" for i in range(5)]

    def crash(part):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        detect_at_scale(str(tiny_sd_path), prompts, tmp_path / "audit", chunk=2, on_chunk=crash)
    res = detect_at_scale(str(tiny_sd_path), prompts, tmp_path / "audit", chunk=2)
    assert (res["prompts"], res["scored_now"]) == (5, 3)
    table = pq.read_table(tmp_path / "audit" / "scores.parquet").to_pydict()
    want = [d.score for d in detect(memfree.load(str(tiny_sd_path)), prompts, progress=False)]
    assert table["prompt"] == prompts
    np.testing.assert_allclose(table["score"], want, rtol=1e-5)


def test_the_cli_builds_from_webdataset_shards_and_reports_the_skipped_images(tmp_path):
    from click.testing import CliRunner
    from memfree.cli import cli
    (tmp_path / "data").mkdir()
    keys = [f"k{i}" for i in range(6)]
    _write_tar(tmp_path / "data" / "a.tar", keys, _images(6, seed=4), corrupt={"k5"})
    r = CliRunner().invoke(cli, ["index", "build", "--images", str(tmp_path / "data"), "--embedder", "pixel:4",
                                 "--out", str(tmp_path / "idx"), "--memory-budget", "64MB", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "indexed 5 images (1 skipped: unreadable) from 1 shards" in r.output
    assert TrainingIndex.load(tmp_path / "idx").captions[4] == "caption of k4"


def test_a_build_killed_by_sigkill_mid_way_resumes_and_ends_identical(tmp_path):
    """A real process killed with SIGKILL (no handler, no cleanup) while it embeds the second shard."""
    import os
    import signal
    import subprocess
    import sys
    import time
    _, folder = _folder(tmp_path)
    build_scaled(str(folder), tmp_path / "full", PixelEmbedder(8), shard_size=10)
    script = (
        "import sys, time\n"
        "from memfree.index import PixelEmbedder\n"
        "from memfree.index_scale import build_scaled\n"
        "class Slow(PixelEmbedder):\n"
        "    def __call__(self, images):\n"
        "        time.sleep(0.5)\n"
        "        return super().__call__(images)\n"
        f"build_scaled({str(folder)!r}, {str(tmp_path / 'cut')!r}, Slow(8), shard_size=10, batch_size=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = tmp_path / "cut" / "shards" / "folder-000000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)                                   # well inside the second shard (5 batches of 0.5 s each)
    assert proc.poll() is None, "the build ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    _resumes_from_the_second_shard_to_the_same_index(folder, tmp_path / "cut", tmp_path / "full")


def test_two_stage_search_ranks_the_candidates_by_the_final_embedder(tmp_path):
    from memfree.index_scale import TwoStageIndex
    from memfree.similarity import nearest, similarity_to
    imgs, folder = _folder(tmp_path)
    idx = build_scaled(str(folder), tmp_path / "two", PixelEmbedder(2), shard_size=10, final_embedder=PixelEmbedder(8))
    assert isinstance(idx, TwoStageIndex) and idx.embedder.dim == 2 * 2 * 3 + 8 * 8 * 3
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    order = [int(str(i).split(".")[0]) for i in idx.ids]   # positions -> image numbers (000.png ...)
    final = PixelEmbedder(8)(x[order])
    assert torch.allclose(idx.vectors(torch.arange(len(idx))), final, atol=1e-2)   # stored in fp16, in index order
    q = x[[3, 17, 29]] * 0.9 + 0.05
    exact = torch.cdist(PixelEmbedder(8)(q), final).topk(5, largest=False)
    d, i = idx.search(idx.embedder(q), 5)          # 40 images < 100 candidates: every image is ranked
    assert torch.equal(i, exact.indices) and torch.allclose(d, exact.values, atol=0.05)
    assert [order[int(j)] for j in i[:, 0]] == [3, 17, 29]
    idx.candidates = 1                              # with one candidate the first stage alone decides
    first = TrainingIndex.load(tmp_path / "two").first.search(PixelEmbedder(2)(q), 1)[1]
    assert torch.equal(idx.search(idx.embedder(q), 1)[1], first)
    idx.candidates = 100
    sig, near = nearest(idx, q, k=5)               # AMG's check and step work on it, by the final embedding
    again = similarity_to(idx, q.requires_grad_(True), near)
    assert torch.allclose(sig, again.detach(), atol=1e-3)
    again.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_index_build_cli_with_a_final_embedder_builds_a_two_stage_index(tmp_path):
    from click.testing import CliRunner
    from memfree.cli import cli
    from memfree.index_scale import TwoStageIndex
    _, folder = _folder(tmp_path)
    r = CliRunner().invoke(cli, ["index", "build", "--images", str(folder), "--embedder", "pixel:2",
                                  "--final-embedder", "pixel:8", "--out", str(tmp_path / "cli"), "--quiet"])
    assert r.exit_code == 0, r.output
    idx = TrainingIndex.load(tmp_path / "cli")
    assert isinstance(idx, TwoStageIndex) and idx.meta["final_embedder"]["dim"] == 192
