"""Per-model settings are read through one function and never changed behind a caller's back: calibration
writes into a model folder memfree may change, else into a user sidecar it names; loading leaves logging alone."""
import json
import os
from types import SimpleNamespace
import shutil

import pytest

import memfree
from memfree.detect import calibrate
from memfree.settings import read_settings, sidecar_path


@pytest.fixture
def model_copy(tiny_sd_path, tmp_path):
    path = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, path)
    return path


def test_calibration_goes_into_a_writable_model_folder(model_copy):
    model = memfree.load(model_copy).with_settings(num_inference_steps=3)
    entry = calibrate(model, ["a cat", "a dog", "a tree", "a house"], fpr=0.25, progress=False,
                          min_prompts=4)
    assert entry["saved_to"] == str(model_copy / "memfree.json")
    assert json.loads((model_copy / "memfree.json").read_text())["detection"]["threshold"] == entry["threshold"]
    assert model.settings.threshold is None                       # the model object is not changed
    assert memfree.load(model_copy).settings.threshold == entry["threshold"]
    assert not sidecar_path(model_copy).exists()


def test_calibration_of_a_read_only_folder_goes_to_a_user_sidecar(model_copy, user_home, monkeypatch):
    before = {p: p.read_bytes() for p in model_copy.rglob("*") if p.is_file()}
    os.chmod(model_copy, 0o555)
    if os.access(model_copy, os.W_OK):   # root writes anywhere: let the folder look read-only as it would to a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(model_copy)) else real(p, mode))
    try:
        model = memfree.load(model_copy).with_settings(num_inference_steps=3)
        entry = calibrate(model, ["a cat", "a dog", "a tree", "a house"], fpr=0.25, progress=False,
                          min_prompts=4)
    finally:
        os.chmod(model_copy, 0o755)
    side = sidecar_path(model_copy)
    assert entry["saved_to"] == str(side) and side.is_relative_to(user_home)
    assert {p: p.read_bytes() for p in model_copy.rglob("*") if p.is_file()} == before
    assert read_settings(model_copy).threshold == entry["threshold"]


def test_a_model_opened_by_name_is_calibrated_in_the_sidecar(model_copy, user_home):
    memfree.register_model("my-sd", model_copy)
    try:
        model = memfree.load("my-sd").with_settings(num_inference_steps=3)
        assert model.name == "my-sd" and model.label == "my-sd"
        entry = calibrate(model, ["a cat", "a dog", "a tree", "a house"], fpr=0.25, progress=False, min_prompts=4)
        assert entry["saved_to"] == str(sidecar_path(model_copy)) and not (model_copy / "memfree.json").exists()
        assert memfree.load("my-sd").settings.threshold == entry["threshold"]
    finally:
        memfree.unregister_model("my-sd")
    assert "my-sd" not in memfree.named_models()


def test_the_default_among_several_named_models(model_copy, monkeypatch):
    """Several named models: none is guessed, unless exactly one is named the default by an installed package."""
    import memfree.model as mm
    real = mm.entry_points
    defaults: list = []
    monkeypatch.setattr(mm, "entry_points", lambda group: defaults if group == mm.DEFAULT_GROUP else real(group=group))
    memfree.register_model("my-sd", model_copy)
    memfree.register_model("my-other", model_copy)
    try:
        with pytest.raises(memfree.ModelError, match="no single named model"):
            memfree.load()
        defaults.append(SimpleNamespace(name="my-sd"))
        assert memfree.load().name == "my-sd"
        defaults.append(SimpleNamespace(name="my-other"))  # two defaults: again no guess
        with pytest.raises(memfree.ModelError, match="no single named model"):
            memfree.load()
    finally:
        memfree.unregister_model("my-sd"), memfree.unregister_model("my-other")


def test_loading_a_model_leaves_the_process_logging_as_it_was(tiny_sd_path):
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    dlog.set_verbosity_info(), tlog.set_verbosity_warning()
    dlog.enable_progress_bar(), tlog.enable_progress_bar()
    memfree.load(tiny_sd_path)
    assert dlog.get_verbosity() == dlog.INFO and tlog.get_verbosity() == tlog.WARNING
    assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()


def test_settings_are_frozen_and_copies_share_weights(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    fast = model.with_settings(num_inference_steps=2, guidance_scale=1.5)
    assert (model.settings.num_inference_steps, fast.settings.num_inference_steps) == (50, 2)
    assert fast.unet is model.unet
    with pytest.raises(Exception):
        model.settings.num_inference_steps = 3
