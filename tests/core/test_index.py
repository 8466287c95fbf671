"""The training-set index: exact pixel search, resumable builds, embedder checks, TorchScript, IVF+PQ, sources, CLI."""
import json
import warnings

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from memfree.cli import cli
from memfree.index import (IndexMismatchError, PixelEmbedder, TorchScriptEmbedder, TrainingIndex, build_index,
                           load_image_source, parse_embedder)

faiss.omp_set_num_threads(1)  # OpenMP threads spin-wait badly on a busy shared CPU; k-means is quick on one


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def pixel_vectors(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).reshape(len(images), -1).double()


@pytest.fixture()
def torchscript_path(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 16))
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(path))
    return path


def test_pixel_index_is_exact(tmp_path):
    images = random_images(300)
    idx = build_index(images, tmp_path / "ix", PixelEmbedder(32), batch_size=64, progress=False)
    assert idx.factory == "SQ8_direct" and len(idx) == 300 and idx.embedder.dim == 3 * 32 * 32
    exact = pixel_vectors(images)
    q = exact[:20].float()
    d, i = idx.search(q, 10)
    assert d.shape == (20, 10) and i.dtype == torch.int64
    assert torch.equal(i[:, 0], torch.arange(20)) and d[:, 0].abs().max() <= 1e-3
    ref, ref_i = torch.cdist(exact[:20], exact).topk(10, largest=False)
    assert torch.allclose(d.double(), ref, rtol=1e-2) and torch.equal(i, ref_i)
    assert torch.equal(idx.vectors(i).double(), exact[i])  # the 8-bit direct quantizer stores ×255 pixels exactly
    assert idx.vectors(torch.tensor([5])).shape == (1, 3072)
    loaded = TrainingIndex.load(tmp_path / "ix")
    assert loaded.ids[:3] == ["0", "1", "2"] and torch.equal(loaded.search(q, 10)[1], i)


class FailingEmbedder(PixelEmbedder):
    def __init__(self, size, fail_after=None):
        super().__init__(size)
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        return super().__call__(images)


def test_interrupted_build_resumes(tmp_path):
    images = random_images(300, size=16)
    out = tmp_path / "ix"
    with pytest.raises(RuntimeError, match="interrupted"):
        build_index(images, out, FailingEmbedder(16, fail_after=2), batch_size=64, progress=False)
    assert sorted(p.name for p in (out / "shards").glob("*.npy")) == ["000000.npy", "000001.npy"]
    assert not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete.*memfree index build"):
        TrainingIndex.load(out)
    with pytest.raises(IndexMismatchError, match="size"):  # leftover shards of a different embedder
        build_index(images, out, PixelEmbedder(8), batch_size=64, progress=False)
    with pytest.raises(IndexMismatchError, match="300 images in batches of 64"):
        build_index(images, out, PixelEmbedder(16), batch_size=32, progress=False)
    emb = FailingEmbedder(16)
    idx = build_index(images, out, emb, batch_size=64, progress=False)
    assert emb.calls == 3 and not (out / "shards").exists()  # 5 batches, 2 already done
    fresh = build_index(images, tmp_path / "fresh", PixelEmbedder(16), batch_size=64, progress=False)
    everything = torch.arange(300)
    assert torch.equal(idx.vectors(everything), fresh.vectors(everything))
    assert (out / "index.faiss").read_bytes() == (tmp_path / "fresh" / "index.faiss").read_bytes()


def test_embedder_mismatch_and_missing_index(tmp_path):
    build_index(random_images(20), tmp_path / "ix", PixelEmbedder(32), progress=False)
    with pytest.raises(IndexMismatchError, match="size 32 \\(index\\) vs 16 \\(given\\)") as e:
        TrainingIndex.load(tmp_path / "ix", PixelEmbedder(16))
    assert "dim" in str(e.value)
    assert TrainingIndex.load(tmp_path / "ix", PixelEmbedder()).embedder.size == 32  # adopts the stored size
    assert len(TrainingIndex.load(tmp_path / "ix", parse_embedder("pixel:32"))) == 20
    with pytest.raises(FileNotFoundError, match="missing.*memfree index build"):
        TrainingIndex.load(tmp_path / "nothing")
    for bad in ("clip", "pixel:x", "sscd:" + str(tmp_path / "no.pt"), "torchscript:"):
        with pytest.raises(ValueError):
            parse_embedder(bad)


def test_torchscript_embedder_cosine_index(tmp_path, torchscript_path):
    emb = parse_embedder(f"torchscript:{torchscript_path}:32")
    assert isinstance(emb, TorchScriptEmbedder) and emb.size == 32 and emb.dim == 16 and emb.metric == "cosine"
    assert parse_embedder(f"sscd:{torchscript_path}").size == 320
    resized = build_index(random_images(30), tmp_path / "resized", PixelEmbedder(24), progress=False)
    d, i = resized.search(resized.vectors(torch.arange(30)), 2)  # exact distances on a Flat L2 index too
    assert resized.factory == "Flat" and torch.equal(i[:, 0], torch.arange(30)) and d[:, 0].max() <= 1e-3
    images = random_images(50)
    idx = build_index(images, tmp_path / "ix", emb, progress=False)
    assert idx.factory == "Flat"
    x = torch.from_numpy(images[:5]).permute(0, 3, 1, 2).float() / 255
    sim, i = idx.search(emb(x), 3)
    assert torch.equal(i[:, 0], torch.arange(5)) and torch.allclose(sim[:, 0], torch.ones(5), atol=1e-4)
    assert (sim[:, :-1] >= sim[:, 1:]).all()
    x.requires_grad_(True)
    emb(x).sum().backward()
    assert x.grad.abs().sum() > 0
    loaded = TrainingIndex.load(tmp_path / "ix")  # rebuilds the embedder from the stored path
    assert loaded.embedder.spec() == emb.spec()
    with pytest.raises(IndexMismatchError, match="size"):
        TrainingIndex.load(tmp_path / "ix", TorchScriptEmbedder(torchscript_path, size=24))


def test_ivfpq_recall(tmp_path, torchscript_path):
    emb = TorchScriptEmbedder(torchscript_path, size=8)
    idx = build_index(random_images(2000, size=8), tmp_path / "ix", emb, factory="ivfpq", progress=False)
    assert idx.factory.startswith("IVF") and idx.nprobe == 16
    loaded = TrainingIndex.load(tmp_path / "ix")
    assert loaded.factory == idx.factory and len(loaded) == 2000
    with torch.no_grad():
        exact = torch.cat([emb(torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255)
                           for b in np.array_split(random_images(2000, size=8), 4)])
        queries = emb(torch.from_numpy(random_images(200, size=8, seed=1)).permute(0, 3, 1, 2).float() / 255)
    stored = loaded.vectors(torch.arange(2000).view(2, 1000))  # PQ-approximated, close to the exact vectors
    err = (stored.view(2000, 16) - exact).norm(dim=1)
    assert stored.shape == (2, 1000, 16) and err.mean() < 0.1
    truth = (queries @ exact.T).argmax(1)
    _, i = loaded.search(queries, 10)
    recall = (i == truth[:, None]).any(1).float().mean().item()
    assert recall >= 0.5, recall


def test_load_image_source(tmp_path):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for name in ("b.png", "a.png", "c.png"):
        Image.fromarray(random_images(1, seed=len(name) + ord(name[0]))[0]).save(pngs / name)
    (pngs / "notes.md").write_text("not an image")
    (tmp_path / "caps.txt").write_text("first\nsecond\nthird\n")
    files, ids, caps = load_image_source(str(pngs), str(tmp_path / "caps.txt"))
    assert [f.name for f in files] == ids == ["a.png", "b.png", "c.png"] and caps == ["first", "second", "third"]
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "b.png", "caption": "bee"}) + "\n")
    assert load_image_source(str(pngs), str(tmp_path / "caps.jsonl"))[2] == [None, "bee", None]
    (tmp_path / "short.txt").write_text("one\n")
    with pytest.raises(ValueError, match="1 captions for 3 images"):
        load_image_source(str(pngs), str(tmp_path / "short.txt"))
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError):
            load_image_source(str(bad), None)
    idx = build_index(files, tmp_path / "ix", PixelEmbedder(), ids=ids, captions=caps, progress=False)
    assert idx.embedder.size == 32 and idx.factory == "SQ8_direct" and idx.search(idx.vectors(torch.tensor([1])), 1)[1].item() == 1


def test_cli_index_build(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(random_images(3)):
        Image.fromarray(img).save(folder / f"{i}.png")
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "caption": c}) + "\n"
                                                 for i, c in enumerate(["b", "c"])))
    r = CliRunner().invoke(cli, ["index", "build", "--images", str(folder), "--captions", str(tmp_path / "caps.jsonl"),
                                 "--out", str(tmp_path / "ix"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "3 images" in r.output and "dim 3072" in r.output and "SQ8_direct" in r.output
    idx = TrainingIndex.load(tmp_path / "ix")
    assert idx.captions == ["b", "c", None] and idx.embedder.spec()["size"] == 32
    r = CliRunner().invoke(cli, ["index", "build", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output


def test_an_embedder_shipped_beside_its_index_moves_with_it(tmp_path, torchscript_path):
    """A model folder holding both the embedder file and the index can be moved (or installed) as one."""
    import json
    import shutil
    model = tmp_path / "model"
    (model / "embedder").mkdir(parents=True)
    shutil.copy(torchscript_path, model / "embedder" / "net.pt")
    images = random_images(6, size=16)
    build_index(images, model / "index", TorchScriptEmbedder(model / "embedder" / "net.pt", size=16), progress=False)
    assert json.loads((model / "index" / "meta.json").read_text())["embedder"]["path"] == "../embedder/net.pt"
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(model, moved)
    loaded = TrainingIndex.load(moved / "index")
    assert loaded.embedder.path == moved / "embedder" / "net.pt"
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    sim, i = loaded.search(loaded.embedder(x), 1)
    assert torch.equal(i[:, 0], torch.arange(6)) and torch.allclose(sim[:, 0], torch.ones(6), atol=1e-4)


def test_an_fp16_pixel_index_keeps_resized_pixels_and_ranks_as_the_flat_one(tmp_path):
    """Half the size of Flat: thumbnails (non-integer after resizing) come back within fp16 rounding, and the
    neighbours and distances of a query match the exact index's."""
    images = np.random.default_rng(3).integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    flat = build_index(images, tmp_path / "flat", PixelEmbedder(size=8), factory="flat", progress=False)
    half = build_index(images, tmp_path / "half", PixelEmbedder(size=8), factory="fp16", progress=False)
    assert half.factory == "SQfp16" and TrainingIndex.load(tmp_path / "half").factory == "SQfp16"
    stored = flat.vectors(torch.arange(40))
    assert not torch.equal(stored, stored.round())                        # resizing left fractions
    assert (half.vectors(torch.arange(40)) - stored).abs().max() < 0.13    # fp16 spacing is 1/8 under 256
    query = flat.embedder(torch.from_numpy(images[:5]).permute(0, 3, 1, 2).float() / 255 * 0.9)
    (d_flat, i_flat), (d_half, i_half) = flat.search(query, 5), half.search(query, 5)
    assert torch.equal(i_flat, i_half) and torch.allclose(d_flat, d_half, rtol=1e-3)
