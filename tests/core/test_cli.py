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
