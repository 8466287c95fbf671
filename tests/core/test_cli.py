"""The command line: clear one-line errors for bad input, and working commands on a real-layout model."""
import json
from pathlib import Path

import pytest

from click.testing import CliRunner

from memfree.cli import cli


def test_bad_input_gives_clear_errors(tmp_path, tiny_sd_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", "--model", str(tiny_sd_path)])
    assert r.exit_code == 2 and "no prompts given" in r.output
    r = runner.invoke(cli, ["generate", "a cat", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["generate", "a cat", "--model", str(tiny_sd_path), "--scheduler", "plms"])
    assert r.exit_code == 1 and "unknown scheduler 'plms'" in r.output
    (tmp_path / "empty.txt").write_text("\n")
    r = runner.invoke(cli, ["detect", "--prompts", str(tmp_path / "empty.txt"), "--model", str(tiny_sd_path)])
    assert r.exit_code == 1 and "holds no prompts" in r.output
    (tmp_path / "p.csv").write_text("a,b\n1,2\n")
    r = runner.invoke(cli, ["detect", "--prompts", str(tmp_path / "p.csv"), "--column", "prompt",
                            "--model", str(tiny_sd_path)])
    assert r.exit_code == 1 and "no column 'prompt'" in r.output


def test_generate_and_detect_json(tmp_path, tiny_sd_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", "a cat", "a dog", "--model", str(tiny_sd_path), "--steps", "2",
                            "--out", str(tmp_path / "out"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["images"]
    assert [x["seed"] for x in rows] == [0, 1] and all(Path(x["image"]).exists() for x in rows)
    assert all(json.loads(Path(x["image"]).with_suffix(".json").read_text())["seed"] == x["seed"] for x in rows)
    again = runner.invoke(cli, ["generate", "a cat", "--seed", "7", "--model", str(tiny_sd_path), "--steps", "2",
                                "--out", str(tmp_path / "out"), "--json", "--quiet"])
    assert again.exit_code == 0 and len(list((tmp_path / "out").glob("*.png"))) == 3   # a second run adds, never replaces
    r = runner.invoke(cli, ["detect", "a cat", "--model", str(tiny_sd_path), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    det = json.loads(r.output)[0]
    assert det["prompt"] == "a cat" and det["score"] > 0 and len(det["per_step"]) == 1


def test_explain_json_matches_the_api_for_both_methods(tiny_sd_path):
    import memfree
    from memfree.explain import explain
    model = memfree.load(tiny_sd_path)
    runner = CliRunner()
    for method in ("occlusion", "gradient"):
        r = runner.invoke(cli, ["explain", "a dog on the grass", "--model", str(tiny_sd_path), "--method", method,
                                "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        ref = explain(model, "a dog on the grass", method=method)
        assert out["method"] == method and [w["word"] for w in out["words"]] == ["a", "dog", "on", "the", "grass"]
        assert [w["significance"] for w in out["words"]] == [pytest.approx(v, rel=1e-5, abs=1e-7) for v in ref.significance]
        assert out["top_words"] == [ref.words[i] for i in ref.top_words(2)]
    r = runner.invoke(cli, ["explain", "a dog", "--model", str(tiny_sd_path), "--method", "saliency"])
    assert r.exit_code == 2 and "saliency" in r.output


def test_generate_passes_wens_target_and_iteration_cap(tmp_path, tiny_sd_path):
    runner = CliRunner()
    args = ["generate", "a cat", "a dog", "--model", str(tiny_sd_path), "--steps", "2", "--mitigation", "wen",
            "--opt", "target=1e-6", "--out", str(tmp_path / "out"), "--json", "--quiet"]
    r = runner.invoke(cli, args + ["--opt", "max_iters=2"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["images"]
    assert [x["applied"] for x in rows] == [True, True] and [x["iterations"] for x in rows] == [2, 2]
    r = runner.invoke(cli, args + ["--opt", "max_iters=-1"])
    assert r.exit_code == 1 and "max_iters must be at least 0" in r.output
    r = runner.invoke(cli, args + ["--opt", "max_iter=2"])
    assert r.exit_code == 2 and "max_iters" in r.output


def test_generate_on_sdxl_and_sd3_folders_runs_their_own_pipeline_under_protect(tmp_path, tiny_sdxl_path, tiny_sd3_path):
    import numpy as np
    import torch
    from PIL import Image
    from memfree.index import PixelEmbedder, build_index
    from memfree.pipelines import open_pipeline
    from memfree.protect import protect
    prompt = "a red circle on a blue background"
    runner = CliRunner()
    for path in (tiny_sdxl_path, tiny_sd3_path):
        r = runner.invoke(cli, ["generate", "--model", str(path), prompt, "--steps", "2", "--seed", "3",
                                "--out", str(tmp_path / "plain"), "--json", "--quiet"])
        assert r.exit_code == 0, r.output
        row = json.loads(r.output)["images"][0]
        pipe = open_pipeline(path)
        with protect(pipe):
            ref = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
        assert row["score"] == pytest.approx(ref.memorization[0].score, rel=1e-6)
        assert np.array_equal(np.asarray(Image.open(row["image"])), np.asarray(ref.images[0]))   # as the user's call
        assert row["mitigated"] is False and row["seed"] == 3
    # AMG against an index that holds the plain image: it steers away, and says so
    copy = np.asarray(Image.open(row["image"]))[None]
    noise = (np.random.default_rng(1).uniform(size=(30, *copy.shape[1:])) * 255).astype(np.uint8)
    build_index(np.concatenate([copy, noise]), tmp_path / "index", PixelEmbedder(),
                captions=[prompt] + ["noise"] * 30, progress=False)
    r = runner.invoke(cli, ["generate", "--model", str(tiny_sd3_path), prompt, "--steps", "2", "--seed", "3",
                            "--mitigation", "amg", "--index", str(tmp_path / "index"), "--opt", "c3=2000",
                            "--opt", "always_on=true", "--opt", "check_every=1", "--opt", "grid=0",
                            "--out", str(tmp_path / "amg"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    amg = json.loads(r.output)["images"][0]
    assert amg["mitigated"] and amg["amg"]["fired_steps"]["sim"] and amg["similarity"] < 0.95
    r = runner.invoke(cli, ["generate", "--model", str(tiny_sdxl_path), prompt, "--mitigation", "rta",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "none, wen, amg, amg-strong" in r.output
    r = runner.invoke(cli, ["generate", "--model", str(tiny_sdxl_path), prompt, "--mitigation", "amg",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--index" in r.output


def test_calibrate_an_sdxl_folder_and_protect_finds_its_threshold(tmp_path, tiny_sdxl_path):
    import shutil
    from memfree.detect import min_negatives
    from memfree.pipelines import open_pipeline, pipeline_detect
    from memfree.protect import protect
    folder = shutil.copytree(tiny_sdxl_path, tmp_path / "sdxl")
    prompts = [f"an ordinary picture number {i} of a {c} thing" for i, c in
               zip(range(min_negatives(0.01)), ["red", "blue", "green", "small", "large"] * 100)]
    (tmp_path / "ordinary.txt").write_text("\n".join(prompts))
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(folder), "--prompts", str(tmp_path / "ordinary.txt"),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    entry = json.loads(r.output)
    scores = sorted(d.score for d in pipeline_detect(open_pipeline(folder), prompts))
    assert scores[-2] <= entry["threshold"] <= scores[-1]           # 1% of 100 ordinary prompts above it
    assert Path(entry["saved_to"]).is_file()
    with protect(open_pipeline(folder)) as guard:
        assert guard.threshold == pytest.approx(entry["threshold"])
    r = CliRunner().invoke(cli, ["calibrate", "--model", str(folder), "--prompts", str(tmp_path / "ordinary.txt"),
                                 "--steps", "2"])
    assert r.exit_code == 2


def test_explain_an_sd3_folder_by_occlusion_on_its_own_pipeline(tiny_sd3_path):
    from memfree.pipelines import open_pipeline, pipeline_detect
    prompt = "a red circle on a blue background"
    r = CliRunner().invoke(cli, ["explain", "--model", str(tiny_sd3_path), prompt, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert [w["word"] for w in res["words"]] == prompt.split() and res["method"] == "occlusion"
    pipe = open_pipeline(tiny_sd3_path)
    full, without_circle = (d.score for d in pipeline_detect(pipe, [prompt, "a red on a blue background"]))
    assert res["score"] == pytest.approx(full, rel=1e-6)
    assert res["words"][2]["significance"] == pytest.approx(full - without_circle, rel=1e-5, abs=1e-7)
    r = CliRunner().invoke(cli, ["explain", "--model", str(tiny_sd3_path), prompt, "--method", "gradient"])
    assert r.exit_code == 2


def test_index_latent_screen_encodes_a_folder_with_the_models_vae(tmp_path, tiny_sd_path):
    import numpy as np
    import torch
    from PIL import Image
    import memfree
    from memfree.similarity import LatentScreen
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    r = CliRunner().invoke(cli, ["index", "latent-screen", "--model", str(tiny_sd_path), "--images", str(folder),
                                 "--out", str(tmp_path / "screen.safetensors"), "--size", "32", "--grid", "2",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    screen = LatentScreen.load(tmp_path / "screen.safetensors")
    vae = memfree.load(tiny_sd_path).vae
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i}.png"))) for i in range(5)])
    direct = LatentScreen.from_images(vae, x.permute(0, 3, 1, 2).float() / 255, grid=2)
    assert len(screen) == 5 and torch.allclose(screen.vectors, direct.vectors, atol=1e-4)
    assert screen.similarity(direct.vectors.reshape(5, -1, 2, 2)).min() > 0.99   # each image is its own nearest
    # into an index's folder, with its bar in tuning.json: where AMG looks for a default screen
    from memfree.index import PixelEmbedder, build_index
    from memfree.similarity import SCREEN_FILE, index_latent_screen, index_tuning
    index = build_index(x.numpy(), tmp_path / "index", PixelEmbedder(8), progress=False)
    base = ["index", "latent-screen", "--model", str(tiny_sd_path), "--images", str(folder), "--size", "32",
            "--grid", "2", "--quiet"]
    r = CliRunner().invoke(cli, base + ["--index", str(index.path), "--bar", "0.25"])
    assert r.exit_code == 0, r.output
    assert (index.path / SCREEN_FILE).is_file() and not list(index.path.glob("*.tmp"))
    assert torch.equal(index_latent_screen(index).vectors, screen.vectors) and index_tuning(index)["latent_bar"] == 0.25
    for wrong in ([], ["--out", "a.safetensors", "--index", str(index.path)], ["--out", "a.safetensors", "--bar", "0.2"],
                  ["--index", str(tmp_path / "imgs")]):
        r = CliRunner().invoke(cli, base + wrong)
        assert r.exit_code == 2, (wrong, r.output)
