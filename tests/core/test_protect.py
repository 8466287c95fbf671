"""memfree.protect on the user's own diffusers pipelines: tiny randomly initialised SD 1.x (PNDM, ε), SD 2.x (v),
SDXL and SD3 pipelines saved in safetensors and opened with ``from_pretrained``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

import memfree
from memfree.detect import first_step_scores
from memfree.index import PixelEmbedder, build_index
from memfree.protect import Guard, protect

PROMPT = "a red circle on a blue background"
KW = dict(height=32, width=32, output_type="np")


def _open(path, family):
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(path, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=["sd", "sd_v", "sdxl", "sd3"])
def family_pipe(request):
    path = request.getfixturevalue({"sd": "tiny_sd_path", "sd_v": "tiny_sd_v_path", "sdxl": "tiny_sdxl_path",
                                    "sd3": "tiny_sd3_path"}[request.param])
    return request.param, _open(path, "sd3" if request.param == "sd3" else "sd")


def _gen(pipe, seed=0, steps=4, **kw):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                num_images_per_prompt=2, **KW, **kw)


def test_detection_only_is_bit_identical_and_remove_restores(family_pipe):
    family, pipe = family_pipe
    klass, denoiser = type(pipe), (pipe.transformer if family == "sd3" else pipe.unet)
    before = _gen(pipe).images
    guard = protect(pipe, threshold=0.5)
    out = _gen(pipe)
    assert np.array_equal(out.images, before)
    assert len(out.memorization) == 2
    for r in out.memorization:
        assert r.score > 0 and r.flagged == (r.score > 0.5) and not r.mitigated
        assert len(r.scores) >= 4 and all(s > 0 for s in r.scores)
    assert out.memorization[0].score != out.memorization[1].score   # each image its own x_T
    guard.remove()
    assert type(pipe) is klass
    assert not denoiser._forward_hooks and not denoiser._forward_pre_hooks
    again = _gen(pipe)
    assert not hasattr(again, "memorization") and np.array_equal(again.images, before)


def test_callbacks_and_negative_prompts_still_work(tiny_sd_path):
    pipe = _open(tiny_sd_path, "sd")
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(int(t))
        return kwargs

    plain = _gen(pipe, negative_prompt="blurry").images
    with protect(pipe):
        out = _gen(pipe, negative_prompt="blurry", callback_on_step_end=callback)
    assert np.array_equal(out.images, plain) and seen == [int(t) for t in pipe.scheduler.timesteps]


@pytest.mark.parametrize("path_fixture", ["tiny_sd_path", "tiny_sd_v_path"])
@pytest.mark.parametrize("scheduler", ["pndm-4", "ddim-50"])
def test_detection_score_equals_memfree_loop(request, path_fixture, scheduler):
    """The free score (DDIM, 50 steps: the first step is the detection input) and the extra pass (PNDM, 4 steps)
    both equal memfree's own first-step score on the same x_T."""
    path = request.getfixturevalue(path_fixture)
    model = memfree.load(path)
    pipe = _open(path, "sd")
    steps = 4
    if scheduler == "ddim-50":
        pipe.scheduler, steps = DDIMScheduler.from_config(pipe.scheduler.config), 50
    x_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    with protect(pipe) as guard:
        out = pipe([PROMPT, "a cat"], num_inference_steps=steps, latents=x_T.clone(), **KW)
    assert guard.removed is False or True
    ours, _ = first_step_scores(model, model.encode([PROMPT, "a cat"]), x_T)
    got = torch.tensor([r.score for r in out.memorization])
    assert out.memorization[0].score_source == ("free" if scheduler == "ddim-50" else "extra pass")
    assert torch.allclose(got, ours.float(), rtol=2e-5, atol=0)


def test_sd3_score_is_velocity_difference(tiny_sd3_path):
    pipe = _open(tiny_sd3_path, "sd3")
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with protect(pipe):
        out = pipe(PROMPT, num_inference_steps=3, latents=x_T.clone(), **KW)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=True)
    pipe.scheduler.set_timesteps(3)
    t = pipe.scheduler.timesteps[:1]
    with torch.no_grad():
        v = pipe.transformer(hidden_states=torch.cat([x_T, x_T]), timestep=t.expand(2),
                             encoder_hidden_states=torch.cat([neg, embeds]),
                             pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False)[0]
    expected = float((v[1] - v[0]).flatten().norm())
    assert out.memorization[0].score == pytest.approx(expected, rel=2e-5)


def _plant(tmp_path, copies: np.ndarray) -> object:
    """A pixel index holding ``copies`` (what the model makes for PROMPT) among 60 random images."""
    noise = np.random.default_rng(1).uniform(size=(60, *copies.shape[1:]))
    images = (np.concatenate([copies, noise]) * 255).round().astype(np.uint8)
    captions = [PROMPT] * len(copies) + [f"random picture {i}" for i in range(60)]
    return build_index(images, tmp_path / "index", PixelEmbedder(), captions=captions, progress=False)


STRONG = dict(c1=1.0, c2=1.0, c3=50.0, terms=("spe", "dup", "sim"), grid=0, always_on=True, check_every=1)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_amg_moves_a_copy_away_and_leaves_clean_prompts_alone(request, tmp_path, family):
    path = request.getfixturevalue({"sd": "tiny_sd_path", "sdxl": "tiny_sdxl_path", "sd3": "tiny_sd3_path"}[family])
    pipe = _open(path, family)
    copy = _gen(pipe, steps=6).images                     # what the model makes for this prompt: put it in the index
    index = _plant(tmp_path, copy)
    with protect(pipe, index=index) as g:           # detection only, with the nearest training image reported
        plain = _gen(pipe, steps=6)
    with protect(pipe, "amg", index=index, **{**STRONG, "c3": 2000.0}) as guard:   # a random VAE needs a big step
        out = _gen(pipe, steps=6)
    for before, after in zip(plain.memorization, out.memorization):
        assert before.similarity == pytest.approx(1.0, abs=0.01)     # unprotected: the planted image itself
        assert after.mitigated and after.amg["fired_steps"]["sim"]
        assert after.similarity < before.similarity - 0.05          # AMG moved away from it
    # a gate that never opens: bit-identical, nothing reported as mitigated
    with protect(pipe, "amg", index=index, lam_lo=5.0, lam_hi=5.0):
        clean = _gen(pipe, steps=6)
    assert np.array_equal(clean.images, copy)
    assert not any(r.mitigated for r in clean.memorization)
    assert guard.removed and g.removed


def test_amg_through_protect_equals_memfree_own_loop(tiny_sd_path, tmp_path):
    """Same model, x_T, scheduler and AMG settings: the pipeline under protect and memfree's loop agree."""
    from memfree.guidance import AMG, config_for
    from memfree.sampling import sample

    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=6)
    pipe = _open(tiny_sd_path, "sd")
    pipe.scheduler = model.new_scheduler()
    x_T = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(5))
    own = sample(model, [PROMPT], latents=x_T, progress=False).images
    index = _plant(tmp_path, own.permute(0, 2, 3, 1).numpy())
    exact = STRONG | {"check_precision": "fp32"}   # bf16 checks round the two paths' tiny differences apart
    piece = AMG(index, config_for("amg", "l2", **exact))
    ours = sample(model, [PROMPT], latents=x_T, pieces=[piece], progress=False).images
    with protect(pipe, "amg", index=index, **exact):
        out = pipe(PROMPT, num_inference_steps=6, guidance_scale=model.settings.guidance_scale, latents=x_T.clone(),
                   output_type="pt", **{k: v for k, v in KW.items() if k != "output_type"})
    assert out.memorization[0].amg["fired_steps"] == piece.summary(0)["fired_steps"]
    assert (out.images.float() - ours).abs().max() < 1e-3


def test_wen_changes_only_flagged_images(tiny_sd_path):
    pipe = _open(tiny_sd_path, "sd")
    plain = _gen(pipe).images
    with protect(pipe, "wen", threshold=1e6):           # nothing is flagged: bit-identical
        out = _gen(pipe)
    assert np.array_equal(out.images, plain) and not any(r.mitigated for r in out.memorization)
    with protect(pipe):
        scores = [r.score for r in _gen(pipe).memorization]
    with protect(pipe, "wen", threshold=min(scores) * 0.5, max_iters=5):
        out = _gen(pipe)
    assert all(r.mitigated for r in out.memorization)
    assert not np.array_equal(out.images, plain)


def test_clear_errors(tiny_sd_path):
    pipe = _open(tiny_sd_path, "sd")
    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        protect(object())

    class FluxPipeline:
        pass

    with pytest.raises(TypeError, match="guidance-distilled"):
        protect(FluxPipeline())
    with pytest.raises(ValueError, match="index"):
        protect(pipe, "amg")
    with pytest.raises(ValueError, match="unknown option"):
        protect(pipe, "wen", threshold=1.0, c3=5)
    with pytest.raises(ValueError, match="unknown mitigation"):
        protect(pipe, "magic")
    with pytest.raises(ValueError, match="threshold"):
        protect(pipe, "wen")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not pipe.unet._forward_hooks
    assert isinstance(protect(pipe), Guard)


def test_lora_weights_and_their_scale_are_respected(tiny_sd_path):
    """A LoRA adapter on the user's UNet stays active, and memfree's extra detection pass uses the call's LoRA
    scale: the extra-pass score (PNDM, 4 steps) equals the free score (DDIM, 50 steps) at every scale."""
    from peft import LoraConfig
    pipe = _open(tiny_sd_path, "sd")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = pipe(PROMPT, num_inference_steps=4, latents=x_T.clone(), **KW).images

    def score(steps, scale, scheduler):
        pipe.scheduler = scheduler
        with protect(pipe):
            out = pipe(PROMPT, num_inference_steps=steps, latents=x_T.clone(), cross_attention_kwargs={"scale": scale},
                       **KW)
        return out.memorization[0]

    pndm = pipe.scheduler
    with protect(pipe):
        assert np.array_equal(pipe(PROMPT, num_inference_steps=4, latents=x_T.clone(), **KW).images, plain)
    ddim = DDIMScheduler.from_config(pndm.config)
    for scale in (0.0, 1.0):
        extra, free = score(4, scale, pndm), score(50, scale, ddim)
        assert (extra.score_source, free.score_source) == ("extra pass", "free")
        assert extra.score == pytest.approx(free.score, rel=2e-5)
    assert score(50, 0.0, ddim).score != pytest.approx(score(50, 1.0, ddim).score, rel=1e-3)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_folders_on_the_command_line(request, family):
    """memfree.load refuses them with the way out; `memfree detect` scores them through protect, and its
    first-step-only run gives the score a full protected generation reports."""
    import json

    from click.testing import CliRunner

    from memfree.cli import cli
    from memfree.model import ModelError
    path = request.getfixturevalue(f"tiny_{family}_path")
    with pytest.raises(ModelError, match="memfree.protect"):
        memfree.load(path)
    res = CliRunner().invoke(cli, ["detect", "--model", str(path), "--generations", "2", "--json", PROMPT])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)[0]
    pipe = _open(path, family)
    with protect(pipe):
        full = pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                    output_type="latent")
    expected = sum(r.score for r in full.memorization) / 2
    assert got["score"] == pytest.approx(expected, rel=1e-5) and got["memorized"] is None


def test_the_threshold_comes_from_memfree_calibrate(tiny_sd_path, tmp_path):
    """Calibrating the user's folder with memfree gives the protected pipeline its threshold and verdicts."""
    import shutil

    from memfree.detect import calibrate
    path = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, path)
    entry = calibrate(memfree.load(path).with_settings(num_inference_steps=3), ["a cat", "a dog", "a tree", "a house"],
                      fpr=0.25, progress=False, min_prompts=4)
    pipe = _open(path, "sd")
    with protect(pipe) as guard:
        out = _gen(pipe)
    assert guard.threshold == entry["threshold"]
    assert [r.flagged for r in out.memorization] == [r.score > entry["threshold"] for r in out.memorization]
    with protect(pipe, threshold=123.0) as guard:
        assert guard.threshold == 123.0


def test_sdxl_euler_gets_the_free_score_at_the_detection_timestep(tiny_sdxl_path):
    """Euler scales x_T up by init_noise_sigma and the input back down: the first call's input is x_T, so at 50
    steps (first timestep = the detection timestep) the score is free, and equals the extra pass of a 4-step run."""
    pipe = _open(tiny_sdxl_path, "sdxl")
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    with protect(pipe):
        free = pipe(PROMPT, num_inference_steps=50, latents=x_T.clone(), output_type="latent").memorization[0]
        extra = pipe(PROMPT, num_inference_steps=4, latents=x_T.clone(), output_type="latent").memorization[0]
    assert (free.score_source, extra.score_source) == ("free", "extra pass")
    assert free.score == pytest.approx(extra.score, rel=2e-5)


def test_a_latent_screen_spares_clean_images_the_full_check_and_keeps_copies(tmp_path, tiny_sd_path):
    """AMG's cheap first stage: a copy's x̂0 is near its training latent, so it still gets the full check and is
    steered away as without the screen; an image far from every training latent skips decode, embed and search."""
    from memfree.similarity import LatentScreen
    pipe = _open(tiny_sd_path, "sd")
    kw = {k: v for k, v in KW.items() if k != "output_type"}
    latents = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0), num_images_per_prompt=2,
                   output_type="latent", **kw).images
    index = _plant(tmp_path, _gen(pipe, steps=6).images)
    screen = LatentScreen(torch.cat([latents, torch.randn(60, *latents.shape[1:]) * 3]), grid=4)
    screen.save(tmp_path / "screen.safetensors")
    options = {**STRONG, "always_on": False, "lam_lo": 0.0, "lam_hi": 0.0, "check_every": 1}
    with protect(pipe, "amg", index=index, **options):
        full = _gen(pipe, steps=6)
    with protect(pipe, "amg", index=index, latent_screen=tmp_path / "screen.safetensors", latent_bar=0.3, **options):
        screened = _gen(pipe, steps=6)
    for a, b in zip(full.memorization, screened.memorization):
        assert b.amg["latent_checked_steps"] >= 1 and b.amg["fired_steps"] == a.amg["fired_steps"]
    assert np.array_equal(full.images, screened.images)
    far = LatentScreen(torch.randn(60, *latents.shape[1:]) * 3 + 10, grid=4)     # nothing near: no full check
    with protect(pipe, "amg", index=index, latent_screen=far, latent_bar=0.3, **options):
        spared = _gen(pipe, steps=6)
    assert all(r.amg["checked_steps"] == 0 and r.amg["latent_checked_steps"] == len(r.scores) and not r.mitigated
               for r in spared.memorization)
    # both screens: either signal is enough for the full check
    with protect(pipe, "amg", index=index, latent_screen=far, latent_bar=0.3, screen=0.0, **options):
        flagged = _gen(pipe, steps=6)          # the score flags every image: checked although no latent is near
    assert all(r.amg["checked_steps"] == len(r.scores) and r.mitigated for r in flagged.memorization)
    with protect(pipe, "amg", index=index, latent_screen=screen, latent_bar=0.3, screen=1e9, **options):
        near = _gen(pipe, steps=6)             # the score flags none, the latents are near: still checked
    assert np.array_equal(near.images, full.images)
    assert all(r.amg["screened_out"] and r.amg["fired_steps"] == a.amg["fired_steps"]
               for a, r in zip(full.memorization, near.memorization))
    with protect(pipe, "amg", index=index, latent_screen=far, latent_bar=0.3, screen=1e9, **options):
        neither = _gen(pipe, steps=6)
    assert all(r.amg["checked_steps"] == 0 and not r.mitigated for r in neither.memorization)
    # a spot check: neither signal flags, yet every image gets one full check at that noise level; the copy it finds
    # stays under watch (checked at every later step) and is steered from there on
    steps_t = [float(t) for t in pipe.scheduler.timesteps]
    spot = steps_t[3] / pipe.scheduler.config.num_train_timesteps
    first = next(k for k, t in enumerate(steps_t) if t <= steps_t[3])      # the step the spot check falls on
    assert first >= 2
    with protect(pipe, "amg", index=index, latent_screen=far, latent_bar=0.3, screen=1e9, spot_check=spot, **options):
        spotted = _gen(pipe, steps=6)
    for r in spotted.memorization:
        after = list(range(first, len(r.scores)))
        assert r.amg["checked_steps"] == len(after) and r.amg["fired_steps"]["sim"] == after and r.mitigated
    assert not np.array_equal(spotted.images, neither.images)
    quiet = {**options, "lam_lo": 2.0, "lam_hi": 2.0, "watch": 2.0}   # σ ≤ 1: the spot check finds nothing to act on
    with protect(pipe, "amg", index=index, latent_screen=far, latent_bar=0.3, screen=1e9, spot_check=spot, **quiet):
        clean = _gen(pipe, steps=6)
    assert np.array_equal(clean.images, neither.images)
    assert all(r.amg["checked_steps"] == 1 and not r.mitigated for r in clean.memorization)
    # the watch cadence: an image under watch (σ > −1 from its first check on) that the score did not flag is checked
    # every watch_every-th step while the gate stays shut, and at every step after a check the gate fired at; one the
    # score flagged, at every step
    cadence = {**options, "check_every": 4, "watch": -1.0, "watch_every": 3, "latent_bar": -1e9}   # all pass it
    for screen_at, gate, every_third in ((1e9, 2.0, True), (0.0, 2.0, False), (1e9, -1.0, False)):
        with protect(pipe, "amg", index=index, latent_screen=far, screen=screen_at,
                     **{**cadence, "lam_lo": gate, "lam_hi": gate}):
            watched = _gen(pipe, steps=6)
        for r in watched.memorization:
            steps = len(r.scores)
            assert r.amg["checked_steps"] == (len(range(0, steps, 3)) if every_third else steps)
    # a spot floor: the spot check covers only the images scored at least spot_floor·screen at the first step
    scores = [r.scores[0] for r in spotted.memorization]
    assert max(scores) > min(scores)
    screen = 10 * max(scores)
    floor = (min(scores) + max(scores)) / 2 / screen
    with protect(pipe, "amg", index=index, latent_screen=far, latent_bar=0.3, screen=screen, spot_check=spot,
                 spot_floor=floor, **options):
        floored = _gen(pipe, steps=6)
    covered = [s >= floor * screen for s in scores]
    assert any(covered) and not all(covered)
    for i, (r, c) in enumerate(zip(floored.memorization, covered)):
        like = spotted if c else neither
        assert r.amg["checked_steps"] == like.memorization[i].amg["checked_steps"]
        assert r.amg["fired_steps"] == like.memorization[i].amg["fired_steps"]
        assert np.allclose(floored.images[i], like.images[i], atol=1e-5)   # batch-size rounding only


def test_a_screen_the_index_carries_is_on_by_default_with_a_threshold_and_can_be_turned_off(tmp_path, tiny_sd_path):
    """An index folder with latent-screen.safetensors: AMG screens with it and with the first-step score at the
    calibrated threshold, as if both were passed; without a threshold, or with latent_screen="off", it does not."""
    from memfree.guidance import SCREEN_DEFAULTS, SPOT_CHECK, screening
    from memfree.similarity import SCREEN_FILE, LatentScreen, write_index_tuning
    pipe = _open(tiny_sd_path, "sd")
    index = _plant(tmp_path, _gen(pipe, steps=6).images)
    far = LatentScreen(torch.randn(60, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 10, grid=4)
    far.save(Path(index.path) / SCREEN_FILE)
    assert screening([index], 1e9)[1] == {"screen": 1e9} | SCREEN_DEFAULTS   # the defaults, with nothing tuned
    write_index_tuning(index.path, latent_bar=0.25, spot_floor=0)   # the spot check covers every image
    options = {**STRONG, "always_on": False, "lam_lo": 0.0, "lam_hi": 0.0, "check_every": 1}
    with protect(pipe, "amg", index=index.path, threshold=1e9, **options) as guard:
        carried = _gen(pipe, steps=6)          # the score flags none and no latent is near: only the spot check,
        settings = guard._screening[1]         # which finds the copy late and steers it from there on
        assert settings["screen"] == 1e9 and settings["latent_bar"] == 0.25 and settings["spot_check"] == SPOT_CHECK
        assert settings["spot_floor"] == 0 and settings["watch_every"] == SCREEN_DEFAULTS["watch_every"]
    late = [k for k, t in enumerate(pipe.scheduler.timesteps) if t <= SPOT_CHECK * 1000]
    assert late and late[0] >= 2
    assert all(r.amg["screened_out"] and r.amg["fired_steps"]["sim"] == late and r.mitigated
               and r.amg["latent_checked_steps"] == len(r.scores) for r in carried.memorization)
    with protect(pipe, "amg", index=index.path, threshold=1e9, latent_screen=far, screen=1e9, latent_bar=0.25,
                 spot_check=SPOT_CHECK, spot_floor=0, watch_every=SCREEN_DEFAULTS["watch_every"], **options):
        explicit = _gen(pipe, steps=6)
    assert np.array_equal(carried.images, explicit.images)
    write_index_tuning(index.path, spot_check=0)   # the index's own value wins; 0: no spot check
    with protect(pipe, "amg", index=index.path, threshold=1e9, **options):
        unspotted = _gen(pipe, steps=6)
    assert all(r.amg["checked_steps"] == 0 and not r.mitigated for r in unspotted.memorization)
    with protect(pipe, "amg", index=index.path, threshold=0.0, **options):
        flagged = _gen(pipe, steps=6)          # every image flagged by its score: the full check at every step
    assert all(r.amg["checked_steps"] == len(r.scores) and r.mitigated for r in flagged.memorization)
    with protect(pipe, "amg", index=index.path, **options):
        unscreened = _gen(pipe, steps=6)       # no threshold: no default screen, every check is a full one
    with protect(pipe, "amg", index=index.path, threshold=1e9, latent_screen="off", **options):
        off = _gen(pipe, steps=6)
    for run in (unscreened, off):
        assert all(r.amg["latent_checked_steps"] == 0 and r.amg["checked_steps"] == len(r.scores) and r.mitigated
                   for r in run.memorization)
    assert np.array_equal(unscreened.images, off.images) and not np.array_equal(unscreened.images, carried.images)


def test_amg_through_protect_over_two_indexes_steers_by_each_and_reports_each(tiny_sd_path, tmp_path):
    from memfree.similarity import LatentIndex, write_index_tuning
    pipe = _open(tiny_sd_path, "sd")
    copy = _gen(pipe, steps=4).images
    pixels = _plant(tmp_path, copy)
    latent = LatentIndex.from_images(pipe.vae, torch.rand(8, 3, *copy.shape[1:3]), ["x"] * 8, grid=4)
    latent.save(tmp_path / "latent")
    write_index_tuning(tmp_path / "latent", amg={"amg": {"lam_lo": 5.0, "lam_hi": 5.0}})   # its gate stays shut
    with protect(pipe, "amg", index=[tmp_path / "latent", pixels], c3=2000.0, always_on=False, check_every=1) as guard:
        out = _gen(pipe, steps=4)
    assert guard.index is pixels                       # reports name the nearest item of the image index
    for r in out.memorization:
        latent_log, pixel_log = r.amg["per_index"]
        assert latent_log["checked_steps"] == pixel_log["checked_steps"] >= 4   # every UNet call (PNDM makes 5)
        assert not any(latent_log["fired_steps"].values()) and pixel_log["fired_steps"]["sim"]
        assert r.mitigated and r.amg["fired_steps"] == pixel_log["fired_steps"]
        assert r.similarity < 0.95
