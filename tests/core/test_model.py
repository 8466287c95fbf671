"""Loading a real-layout Stable Diffusion directory and sampling from it through memfree's one path."""
import json
import shutil

import pytest
import torch

import memfree
from memfree.model import ModelError
from memfree.sampling import initial_noise, sample


def test_load_tiny_sd_with_vae(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    assert model.vae is not None
    assert model.latent_shape == (4, 8, 8)
    assert type(model.scheduler).__name__ == "DDIMScheduler"  # PNDM on disk, DDIM by default
    assert model.scheduler.config.steps_offset == 1            # the trained schedule is kept
    out = sample(model, ["a photo of a cat", "a dog"], seeds=[1, 2], num_inference_steps=3, progress=False)
    assert out.images.shape == (2, 3, 16, 16)                   # decoded through the VAE (factor 2)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.scores.shape == (2, 3) and torch.all(out.scores > 0)


def test_same_seed_same_image_bit_for_bit(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    a = sample(model, ["a cat", "a cat"], seeds=[7, 8], num_inference_steps=3, progress=False)
    b = sample(model, ["a cat", "a cat"], seeds=[7, 8], num_inference_steps=3, progress=False)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images[0], a.images[1])
    # An image depends on its own seed only, not on its neighbours in the request.
    c = sample(model, ["a cat"], seeds=[8], num_inference_steps=3, progress=False)
    assert torch.allclose(c.images[0], a.images[1], atol=1e-5)


def test_explicit_latents_match_seeds(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    x_T = initial_noise(model, [3])
    a = sample(model, ["a cat"], latents=x_T, num_inference_steps=2, progress=False)
    b = sample(model, ["a cat"], seeds=[3], num_inference_steps=2, progress=False)
    assert torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="latents must have shape"):
        sample(model, ["a cat"], latents=torch.zeros(1, 3, 8, 8), progress=False)


def test_pieces_observe_and_adjust(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    seen = []

    def observer(s):
        seen.append((s.step, s.eps_u.shape, float((s.eps - (s.eps_u + s.guidance_scale * (s.eps_c - s.eps_u))).abs().max())))
        assert torch.allclose(s.score, (s.eps_c - s.eps_u).flatten(1).norm(dim=1))

    sample(model, ["a cat"], seeds=[0], num_inference_steps=4, pieces=[observer], progress=False)
    assert [k for k, _, _ in seen] == [0, 1, 2, 3] and all(err == 0 for _, _, err in seen)

    def unguided(s):  # replacing ε̂ with ε_u must equal sampling at guidance 0
        s.eps = s.eps_u

    a = sample(model, ["a cat"], seeds=[0], num_inference_steps=4, pieces=[unguided], progress=False)
    b = sample(model, ["a cat"], seeds=[0], num_inference_steps=4, guidance_scale=0.0, progress=False)
    assert torch.allclose(a.images, b.images, atol=1e-6)


def test_time_inside_pieces_is_reported(tiny_sd_path):
    import time
    model = memfree.load(tiny_sd_path)
    plain = sample(model, ["a cat"], seeds=[0], num_inference_steps=3, progress=False)
    slow = sample(model, ["a cat"], seeds=[0], num_inference_steps=3, progress=False,
                  pieces=[lambda s: time.sleep(0.02)])
    assert plain.piece_seconds == 0.0
    assert 0.06 <= slow.piece_seconds < 0.06 + 0.5  # three steps of 20 ms, plus scheduling slack


def test_v_prediction_is_converted_to_epsilon(tiny_sd_v_path):
    model = memfree.load(tiny_sd_v_path)
    assert model.scheduler.config.prediction_type == "v_prediction"
    got = {}

    def grab(s):
        if s.step == 0:
            got.update(x=s.x_t.clone(), eps_c=s.eps_c.clone(), a=s.alpha_bar, t=s.t, cond=s.cond)

    sample(model, ["a cat"], seeds=[0], num_inference_steps=2, pieces=[grab], progress=False)
    v = model.unet(got["x"], got["t"], got["cond"]).sample
    a = got["a"]
    assert torch.allclose(got["eps_c"], a.sqrt() * v + (1 - a).sqrt() * got["x"], atol=1e-5)


def test_scheduler_choice_and_unknown_scheduler(tiny_sd_path):
    model = memfree.load(tiny_sd_path, scheduler="euler")
    out = sample(model, ["a cat"], seeds=[0], num_inference_steps=3, progress=False)
    assert torch.isfinite(out.images).all()
    with pytest.raises(ModelError, match="unknown scheduler 'plms'"):
        memfree.load(tiny_sd_path, scheduler="plms")


def test_bad_model_directories(tmp_path, tiny_sd_path):
    with pytest.raises(ModelError, match="does not exist"):
        memfree.load(tmp_path / "nope")
    with pytest.raises(ModelError, match="no model_index.json"):
        memfree.load(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        memfree.load(broken)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelError, match="lacks the text_encoder/"):
        memfree.load(broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sd_path, pickled)
    w = next((pickled / "unet").glob("*.safetensors"))
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(ModelError, match="does not load pickled weights"):
        memfree.load(pickled)


def test_empty_prompt_list_is_an_error(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    with pytest.raises(ValueError, match="no prompts"):
        sample(model, [], progress=False)
