"""Adding images to a built index (`memfree index add`): exact copies found, ids and captions kept, duplicates and
mismatches refused, trained indexes grown without retraining, interrupted adds resumed, the old index intact."""
import json
import warnings

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import memfree.index as index_module
from memfree.cli import cli
from memfree.index import (IndexMismatchError, PixelEmbedder, TorchScriptEmbedder, TrainingIndex, add_to_index,
                           build_index)
from memfree.similarity import nearest_training

faiss.omp_set_num_threads(1)


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def as_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def index_files(folder):
    return sorted(p.name for p in folder.iterdir())


def save_pngs(folder, images, names):
    folder.mkdir(parents=True)
    for img, name in zip(images, names):
        Image.fromarray(img).save(folder / name)


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


def test_added_image_is_its_own_nearest_neighbour(tmp_path):
    base, new = random_images(40), random_images(5, seed=1)
    build_index(base, tmp_path / "ix", PixelEmbedder(32), progress=False)
    idx = add_to_index(tmp_path / "ix", new, captions=[f"mine {j}" for j in range(5)], batch_size=2, progress=False)
    assert len(idx) == 45 and idx.factory == "SQ8_direct" and idx.ids[38:] == [str(i) for i in range(38, 45)]
    loaded = TrainingIndex.load(tmp_path / "ix")
    assert loaded.ids == idx.ids and loaded.captions == [None] * 40 + [f"mine {j}" for j in range(5)]
    for found in (idx, loaded):
        near = nearest_training(found, as_tensor(new))
        assert [n["id"] for n in near] == ["40", "41", "42", "43", "44"]
        assert [n["similarity"] for n in near] == [1.0] * 5 and all(n["memorized"] for n in near)
        assert [n["caption"] for n in near] == [f"mine {j}" for j in range(5)]
        d, i = found.search(found.embedder(as_tensor(new)), 3)
        assert torch.equal(i[:, 0], torch.arange(40, 45)) and d[:, 0].abs().max() == 0
        assert torch.equal(found.vectors(torch.arange(40, 45)), torch.from_numpy(new).permute(0, 3, 1, 2)
                           .reshape(5, -1).float())   # stored exactly, like the images the index was built from
    near = nearest_training(loaded, as_tensor(base[:3]))   # the training images are found as before
    assert [n["id"] for n in near] == ["0", "1", "2"] and [n["similarity"] for n in near] == [1.0] * 3
    # meta.json names the grown files; the old ones and the staging folder are gone
    assert index_files(tmp_path / "ix") == ["index.45.faiss", "items.45.jsonl", "meta.json"]
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["count"] == 45 and meta["files"] == {"index": "index.45.faiss", "items": "items.45.jsonl"}
    again = add_to_index(tmp_path / "ix", random_images(2, seed=2), progress=False)   # a second add grows it again
    assert len(again) == 47 and again.ids[-2:] == ["45", "46"]
    assert index_files(tmp_path / "ix") == ["index.47.faiss", "items.47.jsonl", "meta.json"]
    rebuilt = build_index(base, tmp_path / "ix", PixelEmbedder(32), progress=False)   # a rebuild replaces it all
    assert len(rebuilt) == 40 and index_files(tmp_path / "ix") == ["index.faiss", "items.jsonl", "meta.json"]
    assert len(TrainingIndex.load(tmp_path / "ix")) == 40


def test_folder_ids_and_captions(tmp_path):
    build_index(random_images(10), tmp_path / "ix", PixelEmbedder(32), progress=False)
    mine = random_images(3, seed=5)
    save_pngs(tmp_path / "mine", mine, ["cat.png", "alice.png", "logo.png"])
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "cat.png", "caption": "my cat"}) + "\n"
                                         + json.dumps({"file": "logo.png", "caption": "our logo"}) + "\n")
    idx = add_to_index(tmp_path / "ix", tmp_path / "mine", captions=tmp_path / "caps.jsonl", progress=False)
    assert idx.ids[10:] == ["alice.png", "cat.png", "logo.png"]   # file names, in sorted order as `index build`
    assert idx.captions[10:] == [None, "my cat", "our logo"]
    near = nearest_training(TrainingIndex.load(tmp_path / "ix"), as_tensor(mine))
    assert [(n["id"], n["caption"], n["similarity"]) for n in near] == [
        ("cat.png", "my cat", 1.0), ("alice.png", None, 1.0), ("logo.png", "our logo", 1.0)]
    paths = [tmp_path / "mine" / "cat.png"]   # a list of paths: ids are file names too, captions a list
    with pytest.raises(ValueError, match="1 of the 1 ids are already in the index.*cat.png.*unique"):
        add_to_index(tmp_path / "ix", paths, captions=["again"], progress=False)
    grown = add_to_index(tmp_path / "ix", paths, ids=["cat-2"], captions=["again"], progress=False)
    assert len(grown) == 14 and (grown.ids[-1], grown.captions[-1]) == ("cat-2", "again")
    with pytest.raises(ValueError, match="captions file goes with a folder"):
        add_to_index(tmp_path / "ix", paths, captions=tmp_path / "caps.jsonl", progress=False)


def test_duplicate_and_repeated_ids_are_refused(tmp_path):
    build_index(random_images(10), tmp_path / "ix", PixelEmbedder(32), ids=[f"t{i}" for i in range(10)],
                progress=False)
    before = (tmp_path / "ix" / "index.faiss").read_bytes(), (tmp_path / "ix" / "items.jsonl").read_text()
    with pytest.raises(ValueError, match=r"2 of the 3 ids are already in the index .*\(e\.g\. t3, t7\)"):
        add_to_index(tmp_path / "ix", random_images(3, seed=1), ids=["t3", "new", "t7"], progress=False)
    with pytest.raises(ValueError, match="repeat 1 id.*x"):
        add_to_index(tmp_path / "ix", random_images(3, seed=1), ids=["x", "y", "x"], progress=False)
    with pytest.raises(ValueError, match="3 images but 2 ids and 3 captions"):
        add_to_index(tmp_path / "ix", random_images(3, seed=1), ids=["a", "b"], progress=False)
    with pytest.raises(ValueError, match="no images to add"):
        add_to_index(tmp_path / "ix", random_images(0), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        add_to_index(tmp_path / "ix", random_images(1), batch_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        add_to_index(tmp_path / "nothing", random_images(1), progress=False)
    assert index_files(tmp_path / "ix") == ["index.faiss", "items.jsonl", "meta.json"]   # untouched
    assert ((tmp_path / "ix" / "index.faiss").read_bytes(), (tmp_path / "ix" / "items.jsonl").read_text()) == before
    assert len(TrainingIndex.load(tmp_path / "ix")) == 10


def test_image_size_and_embedder_mismatches(tmp_path, torchscript_path):
    build_index(random_images(10), tmp_path / "exact", PixelEmbedder(32), progress=False)
    # an index storing 32x32 pixels exactly refuses other sizes rather than store resized, rounded pixels
    with pytest.raises(ValueError, match="stores 32x32 images exactly .* these are 16x16: resize them to 32x32"):
        add_to_index(tmp_path / "exact", random_images(3, size=16), progress=False)
    with pytest.raises(IndexMismatchError, match="size 32 \\(index\\) vs 16 \\(given\\)"):
        add_to_index(tmp_path / "exact", random_images(3, size=16), embedder=PixelEmbedder(16), progress=False)
    assert len(TrainingIndex.load(tmp_path / "exact")) == 10
    assert len(add_to_index(tmp_path / "exact", random_images(3), embedder=PixelEmbedder(32), progress=False)) == 13
    # an index that resizes (pixel:24, Flat) resizes new images as its training images were
    big = random_images(4, size=32, seed=3)
    build_index(random_images(10), tmp_path / "resized", PixelEmbedder(24), progress=False)
    idx = add_to_index(tmp_path / "resized", big, progress=False)
    direct = build_index(big, tmp_path / "direct", PixelEmbedder(24), factory="flat", progress=False)
    assert idx.factory == "Flat" and torch.equal(idx.vectors(torch.arange(10, 14)), direct.vectors(torch.arange(4)))
    # a cosine (TorchScript) index: its own stored embedder embeds the new images
    emb = TorchScriptEmbedder(torchscript_path, size=16)
    build_index(random_images(20, size=16), tmp_path / "cos", emb, progress=False)
    new = random_images(4, size=16, seed=4)
    idx = add_to_index(tmp_path / "cos", new, progress=False)
    sim, i = idx.search(emb(as_tensor(new)), 2)
    assert torch.equal(i[:, 0], torch.arange(20, 24)) and torch.allclose(sim[:, 0], torch.ones(4), atol=1e-5)
    with pytest.raises(IndexMismatchError, match="size"):
        add_to_index(tmp_path / "cos", new, ids=list("abcd"), embedder=TorchScriptEmbedder(torchscript_path, size=8),
                     progress=False)


def test_trained_ivfpq_index_grows_without_retraining(tmp_path, torchscript_path):
    emb = TorchScriptEmbedder(torchscript_path, size=8)
    build_index(random_images(2000, size=8), tmp_path / "ix", emb, factory="ivfpq", progress=False)
    old = TrainingIndex.load(tmp_path / "ix")
    ivf = faiss.try_extract_index_ivf(old.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    codebooks = faiss.vector_to_array(faiss.downcast_index(old.index).pq.centroids)
    new = random_images(30, size=8, seed=9)
    idx = add_to_index(tmp_path / "ix", new, batch_size=8, progress=False)
    loaded = TrainingIndex.load(tmp_path / "ix")
    assert len(loaded) == loaded.index.ntotal == 2030 and loaded.factory == old.factory and loaded.nprobe == 16
    grown = faiss.try_extract_index_ivf(loaded.index)
    assert grown.nlist == ivf.nlist and np.array_equal(grown.quantizer.reconstruct_n(0, grown.nlist), centroids)
    assert np.array_equal(faiss.vector_to_array(faiss.downcast_index(loaded.index).pq.centroids), codebooks)
    # the new vectors are PQ-encoded with the trained codebooks: close to the exact embeddings, and found
    with torch.no_grad():
        exact = emb(as_tensor(new))
    err = (loaded.vectors(torch.arange(2000, 2030)) - exact).norm(dim=1)
    assert err.mean() < 0.1, err.mean()
    _, i = loaded.search(exact, 10)
    assert (i == torch.arange(2000, 2030)[:, None]).any(1).float().mean() >= 0.8
    # the codes of the first 2000 vectors are the ones the build wrote
    assert torch.equal(loaded.vectors(torch.arange(2000)), old.vectors(torch.arange(2000)))
    assert torch.equal(idx.vectors(torch.arange(2030)), loaded.vectors(torch.arange(2030)))


def interrupt_after(monkeypatch, calls):
    """Make the embedding fail after ``calls`` batches; returns the list of (start, stop) embedded."""
    real, seen = index_module._embed, []

    def embed(embedder, images, start, stop, *args):
        if len(seen) >= calls:
            raise RuntimeError("interrupted")
        seen.append((start, stop))
        return real(embedder, images, start, stop, *args)
    monkeypatch.setattr(index_module, "_embed", embed)
    return seen


def test_interrupted_add_leaves_old_index_and_resumes(tmp_path, monkeypatch):
    base, new = random_images(30, size=16), random_images(10, size=16, seed=7)
    caps = [f"c{j}" for j in range(10)]
    for name in ("a", "b"):
        build_index(base, tmp_path / name, PixelEmbedder(16), progress=False)
    add_to_index(tmp_path / "b", new, captions=caps, batch_size=4, progress=False)   # the uninterrupted add

    with monkeypatch.context() as m:
        interrupt_after(m, 1)
        with pytest.raises(RuntimeError, match="interrupted"):
            add_to_index(tmp_path / "a", new, captions=caps, batch_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "adding").glob("*.npy")) == ["000000.npy"]
    old = TrainingIndex.load(tmp_path / "a")   # the old index, intact
    assert len(old) == 30 and old.ids == [str(i) for i in range(30)]
    assert nearest_training(old, as_tensor(base[:2]))[1]["id"] == "1"
    with pytest.raises(IndexMismatchError, match="unfinished add .*10 images in batches of 4, now 10 in batches of 5"):
        add_to_index(tmp_path / "a", new, captions=caps, batch_size=5, progress=False)
    with pytest.raises(IndexMismatchError, match="unfinished add .*other images \\(ids differ\\)"):
        add_to_index(tmp_path / "a", new, ids=[f"x{j}" for j in range(10)], batch_size=4, progress=False)

    with monkeypatch.context() as m:
        seen = interrupt_after(m, 99)
        idx = add_to_index(tmp_path / "a", new, captions=caps, batch_size=4, progress=False)
    assert seen == [(4, 8), (8, 10)]   # only the batches still missing
    assert len(idx) == 40 and idx.ids[30:] == [str(i) for i in range(30, 40)] and idx.captions[30:] == caps
    assert index_files(tmp_path / "a") == index_files(tmp_path / "b") == ["index.40.faiss", "items.40.jsonl",
                                                                           "meta.json"]
    for f in index_files(tmp_path / "a"):   # the same index as the uninterrupted add, byte for byte
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_crash_around_the_switch(tmp_path, monkeypatch):
    base, new = random_images(30, size=16), random_images(6, size=16, seed=7)
    build_index(base, tmp_path / "ix", PixelEmbedder(16), progress=False)
    real_write = index_module.atomic_write

    def no_meta(path, write):
        if path.name == "meta.json":
            raise OSError("disk full")
        return real_write(path, write)
    with monkeypatch.context() as m:   # the grown files are written, meta.json is not: still the old index
        m.setattr(index_module, "atomic_write", no_meta)
        with pytest.raises(OSError, match="disk full"):
            add_to_index(tmp_path / "ix", new, progress=False)
    assert {"index.36.faiss", "index.faiss", "meta.json"} <= set(index_files(tmp_path / "ix"))
    assert len(TrainingIndex.load(tmp_path / "ix")) == 30

    def cut(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:   # meta.json switched, the clean-up cut short
        m.setattr(index_module, "_remove_unused", cut)
        with pytest.raises(KeyboardInterrupt):
            add_to_index(tmp_path / "ix", new, progress=False)
    assert len(TrainingIndex.load(tmp_path / "ix")) == 36 and (tmp_path / "ix" / "adding").exists()
    again = add_to_index(tmp_path / "ix", new, progress=False)   # the same call again adds nothing twice
    assert len(again) == 36 and again.ids[30:] == [str(i) for i in range(30, 36)]
    assert index_files(tmp_path / "ix") == ["index.36.faiss", "items.36.jsonl", "meta.json"]
    near = nearest_training(TrainingIndex.load(tmp_path / "ix"), as_tensor(new))
    assert [n["id"] for n in near] == [str(i) for i in range(30, 36)]
    with pytest.raises(ValueError, match="already in the index"):   # once finished, the same ids are refused
        add_to_index(tmp_path / "ix", new, ids=[str(i) for i in range(30, 36)], progress=False)


def test_cli_index_add(tmp_path):
    train = random_images(3)
    save_pngs(tmp_path / "train", train, ["0.png", "1.png", "2.png"])
    mine = random_images(2, seed=11)
    save_pngs(tmp_path / "mine", mine, ["me.png", "you.png"])
    (tmp_path / "caps.txt").write_text("a photo of me\nyou\n")
    runner = CliRunner()
    r = runner.invoke(cli, ["index", "build", "--images", str(tmp_path / "train"), "--out", str(tmp_path / "ix"),
                            "--quiet"])
    assert r.exit_code == 0, r.output
    add = ["index", "add", "--index", str(tmp_path / "ix"), "--images", str(tmp_path / "mine"),
           "--captions", str(tmp_path / "caps.txt"), "--batch-size", "1", "--quiet"]
    r = runner.invoke(cli, add)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"added 2 images to {tmp_path / 'ix'}: 5 in all"
    idx = TrainingIndex.load(tmp_path / "ix")
    assert idx.ids == ["0.png", "1.png", "2.png", "me.png", "you.png"] and idx.captions[3:] == ["a photo of me", "you"]
    near = nearest_training(idx, as_tensor(mine))
    assert [(n["id"], n["similarity"]) for n in near] == [("me.png", 1.0), ("you.png", 1.0)]
    r = runner.invoke(cli, add)   # the same folder again: refused in one line, the index unchanged
    assert r.exit_code == 1 and "2 of the 2 ids are already in the index" in r.output and "Traceback" not in r.output
    assert len(TrainingIndex.load(tmp_path / "ix")) == 5
    r = runner.invoke(cli, ["index", "add", "--index", str(tmp_path / "none"), "--images", str(tmp_path / "mine")])
    assert r.exit_code == 1 and "missing" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["index", "add", "--index", str(tmp_path / "ix"), "--images", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output
