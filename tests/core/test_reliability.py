"""Nothing lost, nothing silent: outputs never collide or half-write, weights that do not belong are refused,
NaN never reaches an output, and the detection score does not depend on the sampler."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import memfree
from memfree.cli import cli
from memfree.detect import detection_scores, detect
from memfree.images import save_png
from memfree.io import atomic_write
from memfree.mitigate import generate
from memfree.model import SCHEDULERS
from memfree.sampling import NumericalError, sample


def test_parallel_runs_into_one_folder_keep_every_image(tiny_sd_path, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "memfree.cli", "generate", "a cat", "a dog", "--model",
                              str(tiny_sd_path), "--steps", "1", "--seed", str(seed), "--out", str(out), "--quiet"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (11, 22, 33)]
    assert all(r.wait(timeout=300) == 0 for r in runs)
    assert len(list(out.glob("*.png"))) == 6 and len(list(out.glob("*.json"))) == 6
    assert not list(out.glob(".*tmp"))


def test_an_interrupted_write_leaves_the_old_file_or_nothing(tmp_path):
    target = tmp_path / "a.png"

    def half_then_interrupt(tmp):
        tmp.write_bytes(b"\x89PNG\r\n\x1a\n")   # a valid PNG header, then the user presses Ctrl-C
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_interrupt)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    save_png(torch.zeros(3, 4, 4), target)
    good = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_interrupt)
    assert target.read_bytes() == good and list(tmp_path.iterdir()) == [target]


def test_weights_that_do_not_belong_to_the_model_are_refused(tiny_sd_path, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_sd_path, swapped)
    shutil.copy(swapped / "text_encoder" / "model.safetensors",
                swapped / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(memfree.ModelError, match="do not belong to its config"):
        memfree.load(swapped)
    r = CliRunner().invoke(cli, ["detect", "a cat", "--model", str(swapped)])
    assert r.exit_code == 1 and "do not belong" in r.output and "Traceback" not in r.output


def test_nan_never_reaches_an_output(tiny_sd_path, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(tiny_sd_path, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, weights)
    model = memfree.load(broken).with_settings(num_inference_steps=2)
    with pytest.raises(NumericalError):
        sample(model, ["a cat"], [0], progress=False)
    with pytest.raises(NumericalError):
        detect(model, ["a cat"], progress=False)
    r = CliRunner().invoke(cli, ["generate", "a cat", "--model", str(broken), "--steps", "2", "--out",
                                 str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 1 and "NaN" in r.output and not list((tmp_path / "o").glob("*.png"))
    good = memfree.load(tiny_sd_path)
    for scale in ("nan", "inf"):
        r = CliRunner().invoke(cli, ["generate", "a cat", "--model", str(tiny_sd_path), "--guidance", scale,
                                     "--out", str(tmp_path / "o"), "--quiet"])
        assert r.exit_code == 1 and "finite" in r.output
    with pytest.raises(ValueError, match="finite"):
        generate(good, ["a cat"], "wen", target=float("nan"), progress=False)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_the_detection_score_does_not_depend_on_the_sampler(tiny_sd_path, scheduler):
    base = memfree.load(tiny_sd_path)
    ref = detection_scores(base, ["a cat", "a red house"], generations=2, seed=3)
    for steps in (1, 2, 20, 50):
        model = base.with_scheduler(scheduler).with_settings(num_inference_steps=steps)
        got = detection_scores(model, ["a cat", "a red house"], generations=2, seed=3)
        assert (got == ref).all()
        g = generate(model.with_settings(num_inference_steps=min(steps, 2)), ["a cat"], "none", seed=3,
                     progress=False)
        assert g.reports[0].score_before == pytest.approx(float(ref[0, 0]), rel=1e-5)
