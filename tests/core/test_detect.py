"""Detection: scores equal an independent straightforward computation; calibration and prompt files."""
import json
import shutil

import numpy as np
import pytest
import torch

import memfree
from memfree.detect import calibrate, detect, score_prompts, threshold_at_fpr
from memfree.prompts import read_prompt_file


def _reference_scores(model, prompt, seeds, steps):
    """‖ε_c − ε_u‖₂ per image along the CFG trajectory, written out plainly with the stock scheduler API."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(model.settings.num_inference_steps)
    ids = model.tokenizer([prompt, ""], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        emb = model.text_encoder(ids).last_hidden_state
    out = []
    for s in seeds:
        x = torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s))[None]
        row = []
        for t in sched.timesteps[:steps]:
            with torch.no_grad():
                e_c = model.unet(x, t, emb[:1]).sample
                e_u = model.unet(x, t, emb[1:]).sample
            row.append(float((e_c - e_u).flatten().norm()))
            x = sched.step(e_u + model.settings.guidance_scale * (e_c - e_u), t, x).prev_sample
        out.append(row)
    return np.array(out)


def test_scores_match_an_independent_loop(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    model = model.with_settings(num_inference_steps=5)
    got = score_prompts(model, ["a photo of a cat", "a dog on a sofa"], steps=3, generations=2, seed=10,
                        progress=False)
    assert got.shape == (2, 2, 3)
    for i, p in enumerate(["a photo of a cat", "a dog on a sofa"]):
        ref = _reference_scores(model, p, [10, 11], 3)
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-5)


def test_detect_uses_the_calibrated_threshold(tiny_sd_path, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_sd_path, path)
    model = memfree.load(path)
    first = detect(model, ["a cat"], progress=False)[0]
    assert first.threshold is None and first.memorized is None and len(first.per_step) == 1
    negatives = [f"a photo of object number {i}" for i in range(20)]
    entry = calibrate(model, negatives, fpr=0.1, progress=False)
    stored = json.loads((path / "memfree.json").read_text())["detection"]
    assert stored["threshold"] == pytest.approx(entry["threshold"])
    reloaded = memfree.load(path)
    res = detect(reloaded, negatives, progress=False)
    assert sum(r.memorized for r in res) <= 2              # at most 10% of the calibration set flagged
    assert all(r.memorized == (r.score > entry["threshold"]) for r in res)


def test_threshold_at_fpr():
    neg = np.arange(100, dtype=float)  # 0..99
    assert threshold_at_fpr(neg, 0.01) == pytest.approx(98.0, rel=2e-4)    # only 99 lies above: FPR 1%
    assert threshold_at_fpr(neg, 0.0) == pytest.approx(99.0, rel=2e-4)
    assert threshold_at_fpr(neg, 0.1) == pytest.approx(89.0, rel=2e-4)
    # The negative the threshold rests on stays under it when its score moves in the sixth digit
    # (float32 on another CPU), and the next one up stays over it.
    thr = threshold_at_fpr(neg, 0.01)
    assert 98.0 * (1 + 1e-5) < thr < 99.0


def test_truncation_warning_and_bad_input(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    with pytest.warns(UserWarning, match="truncated"):
        res = detect(model, [" ".join(["word"] * 100)], progress=False)
    assert res[0].truncated
    with pytest.raises(ValueError, match="no prompts"):
        detect(model, [], progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        detect(model, ["  "], progress=False)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert read_prompt_file(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("idx;Caption\n0;a cat\n1;a dog\n")
    assert read_prompt_file(tmp_path / "p.csv") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="no column 'text2'"):
        read_prompt_file(tmp_path / "p.csv", column="text2")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    assert read_prompt_file(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.txt")
