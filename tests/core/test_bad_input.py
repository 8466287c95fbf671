"""A sweep of bad and unusual input to the command line, as a new user would try it: every case ends in one
line naming what is wrong and a non-zero exit, never in a traceback and never in exit 0."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from memfree.cli import cli

G = ["generate", "--steps", "1", "--quiet"]          # cheap generation arguments
CASES = [  # (arguments, exit code, text the one-line error must hold); {sd}, {tmp} ... are filled in below
    (["generate"], 2, "no prompts given"),
    (["generate", ""], 2, "empty prompt"),
    (["generate", "a", "--steps", "0"], 2, "--steps"),
    (["generate", "a", "--steps", "-1"], 2, "--steps"),
    (["generate", "a", "--steps", "many"], 2, "--steps"),
    (["generate", "a", "--seed", "-1"], 2, "--seed"),
    (["generate", "a", "--seed", str(2**70)], 2, "--seed"),
    (["generate", "a", "--guidance", "strong"], 2, "--guidance"),
    (["generate", "a", "--mitigation", "bogus"], 2, "unknown mitigation 'bogus'"),
    (["generate", "a", "--mitigation", "wen", "--opt", "target"], 2, "KEY=VALUE"),
    (["generate", "a", "--mitigation", "wen", "--opt", "target=high"], 2, "type float"),
    (["generate", "a", "--mitigation", "wen", "--opt", "bogus=1"], 2, "target_scale"),
    (["generate", "a", "--mitigation", "amg", "--opt", "always_on=maybe"], 2, "always_on"),
    (["generate", "a", "--mitigation", "none", "--opt", "k=1"], 2, "no options"),
    (["generate", "a", "--model", "{sd}", "--scheduler", "plms", *G[1:]], 1, "unknown scheduler 'plms'"),
    (["generate", "a", "--model", "{tmp}/missing", *G[1:]], 1, "does not exist"),
    (["generate", "a", "--model", "{files}/plain.txt", *G[1:]], 1, "not a directory"),
    (["generate", "a", "--model", "{files}/empty", *G[1:]], 1, "no model_index.json"),
    (["generate", "a", "--model", "{models}/badjson", *G[1:]], 1, "not valid JSON"),
    (["generate", "a", "--model", "{models}/list", *G[1:]], 1, "must hold a JSON object"),
    (["generate", "a", "--model", "{models}/nounet", *G[1:]], 1, "lacks the unet/"),
    (["generate", "a", "--model", "{models}/pickled", *G[1:]], 1, "pickled"),
    (["generate", "a", "--model", "{models}/notok", *G[1:]], 1, "could not load"),
    (["generate", "a", "--model", "{models}/settingslist", *G[1:]], 1, "JSON object"),
    (["generate", "a", "--model", "{models}/swapped", *G[1:]], 1, "do not belong"),
    (["generate", "a", "--model", "{sd}", "--out", "{files}/plain.txt", *G[1:]], 2, "is a file"),
    (["generate", "--prompts", "{tmp}/missing.txt", "--model", "{sd}", *G[1:]], 1, "does not exist"),
    (["generate", "--prompts", "{files}", "--model", "{sd}", *G[1:]], 1, "is not a file"),
    (["generate", "--prompts", "{files}/blank.txt", "--model", "{sd}", *G[1:]], 1, "holds no prompts"),
    (["generate", "--prompts", "{files}/broken.jsonl", "--model", "{sd}", *G[1:]], 1, "broken.jsonl, line 2"),
    (["generate", "--prompts", "{files}/noprompt.jsonl", "--model", "{sd}", *G[1:]], 1, "line 1: expected an object"),
    (["generate", "--prompts", "{files}/number.jsonl", "--model", "{sd}", *G[1:]], 1, "must be a string"),
    (["generate", "--prompts", "{files}/array.jsonl", "--model", "{sd}", *G[1:]], 1, "line 1"),
    (["generate", "--prompts", "{files}/latin1.txt", "--model", "{sd}", *G[1:]], 1, "latin1.txt is not UTF-8"),
    (["detect", "--prompts", "{files}/nocol.csv", "--model", "{sd}"], 1, "no column"),
    (["detect", "--prompts", "{files}/two.txt", "--column", "text", "--model", "{sd}"], 1, "--column"),
    (["generate", "a\x01cat", "--model", "{sd}", *G[1:]], 1, "control character"),
    (["generate", "--prompts", "{files}/nul.txt", "--model", "{sd}", *G[1:]], 1, "control character"),
    (["generate", "a", "--model", "{sd}", "--guidance", "nan", *G[1:]], 1, "finite"),
    (["generate", "a", "--model", "{sd}", "--guidance", "inf", *G[1:]], 1, "finite"),
    (["generate", "a", "--model", "{sd}", "--mitigation", "wen", "--opt", "target=nan", *G[1:]], 1, "finite"),
    (["generate", "a", "--model", "{sd}", "--mitigation", "wen", "--opt", "noises=0", *G[1:]], 1, "noises"),
    (["generate", "a", "--model", "{sd}", "--mitigation", "wen", "--opt", "max_iters=-1", *G[1:]], 1, "max_iters"),
    (["generate", "a", "--model", "{sd}", "--mitigation", "wen", *G[1:]], 1, "wen needs a target"),
    (["generate", "a", "--model", "{sd}", "--mitigation", "amg", *G[1:]], 1, "ships none"),
    (["generate", "a", "--model", "{sd}", "--index", "{tmp}/noindex", *G[1:]], 1, "no meta.json"),
    (["generate", "a", "--model", "{sd}", "--index", "{files}/plain.txt", *G[1:]], 1, "plain.txt"),
    (["generate", "a", "--model", "{sd}", "--index", "{indexes}/badmeta", *G[1:]], 1, "badmeta"),
    (["generate", "a", "--model", "{sd}", "--index", "{indexes}/truncated", *G[1:]], 1, "truncated"),
    (["generate", "a", "--model", "{sd}", "--index", "{indexes}/nocount", *G[1:]], 1, "nocount is broken"),
    (["detect", "a", "--model", "{sd}", "--steps", "0"], 2, "--steps"),
    (["detect", "a", "--model", "{sd}", "--generations", "0"], 2, "--generations"),
    (["detect", "a", "--model", "{sd}", "--steps", "999"], 1, "exceeds"),
    (["detect", "--model", "{sd}"], 2, "no prompts given"),
    (["explain", "", "--model", "{sd}"], 1, "empty prompt"),
    (["explain", "a cat", "--model", "{sd}", "--method", "saliency"], 2, "saliency"),
    (["explain", "a cat", "--model", "{sd}", "--steps", "0"], 2, "--steps"),
    (["calibrate", "--prompts", "{files}/two.txt", "--model", "{sd}", "--fpr", "1.5"], 1, "fpr"),
    (["calibrate", "--prompts", "{files}/two.txt", "--model", "{sd}", "--fpr", "0"], 1, "needs at least 100"),
    (["calibrate", "--model", "{sd}"], 2, "no prompts given"),
    (["index", "build", "--images", "{images}/ok", "--out", "{tmp}/ix0", "--batch-size", "0"], 2, "--batch-size"),
    (["index", "build", "--images", "{tmp}/missing", "--out", "{tmp}/ix1"], 1, "does not exist"),
    (["index", "build", "--images", "{files}/empty", "--out", "{tmp}/ix2"], 1, "holds no images"),
    (["index", "build", "--images", "{images}/notimage", "--out", "{tmp}/ix3"], 1, "fake.png"),
    (["index", "build", "--images", "{images}/truncated", "--out", "{tmp}/ix4"], 1, "cut.png"),
    (["index", "build", "--images", "{images}/mixed", "--out", "{tmp}/ix5", "--embedder", "pixel"], 1, "sizes"),
    (["index", "build", "--images", "{images}/ok", "--captions", "{tmp}/nocaps.jsonl", "--out", "{tmp}/ix6"], 1, "does not exist"),
    (["index", "build", "--images", "{images}/ok", "--captions", "{files}/caps.yaml", "--out", "{tmp}/ix7"], 1, ".txt, .jsonl or .csv"),
    (["index", "build", "--images", "{images}/ok", "--captions", "{files}/unknown.jsonl", "--out", "{tmp}/ix8"], 1, "zzz.png"),
    (["index", "build", "--images", "{images}/ok", "--embedder", "bogus", "--out", "{tmp}/ix9"], 1, "unknown embedder"),
    (["index", "build", "--images", "{images}/ok", "--embedder", "sscd:{tmp}/none.pt", "--out", "{tmp}/ix10"], 1, "does not exist"),
    (["index", "build", "--images", "{images}/ok", "--factory", "hnsw", "--out", "{tmp}/ix11"], 2, "--factory"),
    (["frobnicate"], 2, "No such command"),
]


def _image(path, size=8, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_sd_path):
    tmp = tmp_path_factory.mktemp("bad")
    files, models, images, indexes = (tmp / n for n in ("files", "models", "images", "indexes"))
    for d in (files, models, images, indexes, files / "empty"):
        d.mkdir()
    (files / "plain.txt").write_text("not a model\n")
    (files / "blank.txt").write_text("\n \n")
    (files / "two.txt").write_text("a cat\na dog\n")
    (files / "nul.txt").write_text("a cat\x00\n")
    (files / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (files / "noprompt.jsonl").write_text('{"text": "a"}\n')
    (files / "number.jsonl").write_text('{"prompt": 3}\n')
    (files / "array.jsonl").write_text('["a cat"]\n')
    (files / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (files / "nocol.csv").write_text("a,b\n1,2\n")
    (files / "caps.yaml").write_text("a: b\n")
    (files / "unknown.jsonl").write_text(json.dumps({"file": "zzz.png", "caption": "ghost"}) + "\n")

    def model(name, change):
        path = models / name
        shutil.copytree(tiny_sd_path, path)
        change(path)
    model("badjson", lambda p: (p / "model_index.json").write_text("{not json"))
    model("list", lambda p: (p / "model_index.json").write_text("[]"))
    model("nounet", lambda p: shutil.rmtree(p / "unet"))
    model("pickled", lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").rename(
        p / "unet" / "diffusion_pytorch_model.bin"))
    model("notok", lambda p: [f.unlink() for f in (p / "tokenizer").iterdir()])
    model("settingslist", lambda p: (p / "memfree.json").write_text("[]"))
    model("swapped", lambda p: shutil.copy(p / "text_encoder" / "model.safetensors",
                                           p / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in ("ok", "notimage", "truncated", "mixed"):
        (images / name).mkdir()
        for i in range(3):
            _image(images / name / f"{i}.png", seed=i)
    (images / "notimage" / "fake.png").write_text("this is text")
    (images / "truncated" / "cut.png").write_bytes((images / "ok" / "0.png").read_bytes()[:40])
    _image(images / "mixed" / "big.png", size=16)
    ok = CliRunner().invoke(cli, ["index", "build", "--images", str(images / "ok"), "--out", str(indexes / "good"),
                                  "--quiet"])
    assert ok.exit_code == 0, ok.output
    shutil.copytree(indexes / "good", indexes / "badmeta")
    (indexes / "badmeta" / "meta.json").write_text("{")
    shutil.copytree(indexes / "good", indexes / "nocount")
    meta = json.loads((indexes / "nocount" / "meta.json").read_text())
    del meta["count"]
    (indexes / "nocount" / "meta.json").write_text(json.dumps(meta))
    shutil.copytree(indexes / "good", indexes / "truncated")
    data = (indexes / "truncated" / "index.faiss").read_bytes()
    (indexes / "truncated" / "index.faiss").write_bytes(data[: len(data) // 2])
    return {"sd": str(tiny_sd_path), "tmp": str(tmp), "files": str(files), "models": str(models),
            "images": str(images), "indexes": str(indexes)}


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("args, code, text", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_gets_one_clear_line(places, args, code, text):
    r = CliRunner().invoke(cli, [a.format(**places) for a in args])
    assert r.exit_code == code, r.output
    assert text in r.output, r.output
    assert "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error:")     # the cause, on the last line
