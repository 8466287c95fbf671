"""Anti-Memorization Guidance on tiny real-layout models: the gate rises, each term does what it says, the
cadence saves checks. (On the bundled testbed: tests/testbed/test_amg.py.)"""
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

import memfree
from memfree.guidance import AMG, AMGConfig, config_for
from memfree.index import PixelEmbedder, TorchScriptEmbedder, build_index
from memfree.sampling import sample
from memfree.similarity import nearest


def test_gate_rises_toward_t0_and_variants_change_what_they_name():
    cfg = config_for("amg", "l2")
    assert cfg.gate(1000) == pytest.approx(cfg.lam_lo) and cfg.gate(0) == pytest.approx(cfg.lam_hi)
    ts = [1000, 750, 500, 250, 0]
    assert all(cfg.gate(a) < cfg.gate(b) for a, b in zip(ts, ts[1:]))
    const = config_for("amg-const", "l2")
    assert const.gate(1000) == const.gate(0) == cfg.lam_hi
    assert config_for("amg-no-sim", "l2").terms == ("spe", "dup")
    full = config_for("amg-all-terms", "l2")  # the paper's three terms, otherwise the preset
    assert full.terms == ("spe", "dup", "sim") and dataclasses.replace(full, terms=cfg.terms) == cfg
    assert config_for("amg-screen", "l2", threshold=0.9).screen == 0.9
    assert config_for("amg", "l2", c3=5.0, terms=["sim"]).c3 == 5.0
    with pytest.raises(ValueError, match="threshold"):
        config_for("amg-screen", "l2")
    with pytest.raises(ValueError, match="unknown AMG method"):
        config_for("amg-bogus", "l2")
    with pytest.raises(ValueError, match="unknown AMG parameter"):
        config_for("amg", "l2", c4=1.0)
    assert config_for("amg", "l2").grid == 1 and config_for("amg", "cosine").grid == 0
    assert config_for("amg", "l2", grid=0).grid == 0
    with pytest.raises(ValueError, match="grid"):
        config_for("amg", "l2", grid=-1)


def _plant(model, prompt: str, tmp_path, embedder, seeds=(0,)):
    """A training set that holds the model's own generations of ``prompt``, among random images."""
    own = sample(model, [prompt] * len(seeds), list(seeds), progress=False).images
    g = torch.Generator().manual_seed(1)
    noise = torch.rand((60, *own.shape[1:]), generator=g)
    images = (torch.cat([own, noise]).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    captions = [prompt] * len(seeds) + [f"random picture {i}" for i in range(60)]
    index = build_index(images, tmp_path / "index", embedder, captions=captions, progress=False)
    return own, index


def test_all_three_terms_fire_through_the_vae_of_a_latent_model(tiny_sd_path, tmp_path):
    model = memfree.load(tiny_sd_path)
    model = model.with_settings(num_inference_steps=6, guidance_scale=7.5)
    prompt = "a red house by a lake"
    own, index = _plant(model, prompt, tmp_path, PixelEmbedder())
    piece = AMG(index, AMGConfig(c1=1.0, c2=1.0, c3=50.0, always_on=True, check_every=1))
    out = sample(model, [prompt], 0, pieces=[piece], progress=False)
    fired = piece.summary(0)["fired_steps"]
    assert fired["spe"] == fired["dup"] == fired["sim"] == list(range(6))
    sig_none, _ = nearest(index, own)
    sig_amg, _ = nearest(index, out.images)
    assert sig_none.item() == pytest.approx(1.0, abs=0.01)           # `none` reproduces its planted image
    assert sig_amg.item() < sig_none.item() - 0.05                  # AMG moved away from it
    # a gate that never opens changes nothing, bit for bit
    quiet = AMG(index, AMGConfig(lam_lo=5.0, lam_hi=5.0, check_every=1))
    assert torch.equal(sample(model, [prompt], 0, pieces=[quiet], progress=False).images, own)


def test_an_empty_prompt_gets_the_dissimilarity_term_only(tiny_sd_path, tmp_path):
    model = memfree.load(tiny_sd_path)
    model = model.with_settings(num_inference_steps=3, guidance_scale=7.5)
    own, index = _plant(model, "", tmp_path, PixelEmbedder())
    piece = AMG(index, AMGConfig(c3=50.0, always_on=True, check_every=1))
    sample(model, [""], 0, pieces=[piece], progress=False)
    fired = piece.summary(0)["fired_steps"]
    assert fired == {"spe": [], "dup": [], "sim": [0, 1, 2]}


def test_cosine_index_from_a_torchscript_embedder(tiny_sd_path, tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 4 * 4, 16)

        def forward(self, x):
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))

    torch.manual_seed(0)
    path = tmp_path / "embed.pt"
    with warnings.catch_warnings():   # torch warns that TorchScript is deprecated
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Net()), str(path))
    model = memfree.load(tiny_sd_path)
    model = model.with_settings(num_inference_steps=4, guidance_scale=7.5)
    own, index = _plant(model, "a castle", tmp_path, TorchScriptEmbedder(path, size=16))
    assert index.embedder.metric == "cosine"
    cfg = config_for("amg", "cosine", c3=5.0, always_on=True, check_every=1)
    piece = AMG(index, cfg)
    out = sample(model, ["a castle"], 0, pieces=[piece], progress=False)
    assert piece.summary(0)["fired_steps"]["sim"] == list(range(4))
    assert nearest(index, out.images)[0].item() < nearest(index, own)[0].item()




def test_an_index_tuned_for_its_embedder_sets_the_gate_and_the_copy_threshold(tiny_sd_path, tmp_path):
    """An embedder other than SSCD scores unrelated images on its own scale: its index's tuning.json replaces
    the cosine preset's gate (per preset, before ablations and user overrides) and the copy verdict's threshold."""
    from memfree.guidance import config_for_index
    from memfree.index import TrainingIndex
    from memfree.mitigate import build_mitigation, generate
    from memfree.similarity import index_copy_threshold, nearest_training, write_index_tuning
    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=4, guidance_scale=7.5)
    own, index = _plant(model, "a castle", tmp_path, PixelEmbedder(size=8))
    assert index_copy_threshold(index) == pytest.approx(0.3) and config_for_index("amg", index) == config_for("amg", "l2")
    write_index_tuning(index.path, copy_threshold=0.95, amg={"amg": {"lam_lo": 0.97, "lam_hi": 0.99},
                                                             "amg-strong": {"c3": 7.0}})
    write_index_tuning(index.path, note="kept")            # merges, never drops what was recorded
    index = TrainingIndex.load(index.path)
    assert index_copy_threshold(index) == 0.95
    assert nearest_training(index, own)[0]["memorized"] is (nearest(index, own)[0].item() > 0.95)
    cfg = config_for_index("amg", index)
    assert (cfg.lam_lo, cfg.lam_hi, cfg.c3) == (0.97, 0.99, config_for("amg", "l2").c3)
    assert config_for_index("amg-no-sim", index).lam_lo == 0.97 and config_for_index("amg-no-sim", index).terms == ("spe", "dup")
    assert config_for_index("amg-const", index).gate(1000) == 0.99
    assert config_for_index("amg-strong", index).c3 == 7.0 and config_for_index("amg", index, lam_lo=0.1).lam_lo == 0.1
    high = generate(model, ["a castle"], build_mitigation("amg", index=index), seed=0, progress=False)
    low = generate(model, ["a castle"], build_mitigation("amg", index=index, lam_lo=0.0, lam_hi=0.0), seed=0,
                   progress=False)
    assert not high.reports[0].extra["amg"]["fired_steps"]["sim"]          # the tuned gate is out of reach
    assert low.reports[0].extra["amg"]["fired_steps"]["sim"]
    with pytest.raises(ValueError, match="unknown AMG parameter"):
        config_for("amg", "l2", tuned={"amg": {"c9": 1.0}})


def test_a_smoothed_dissimilarity_step_is_constant_over_each_cell(tiny_sd_path, tmp_path):
    """``smooth=n``: the ∇σ step is averaged over n×n cells (no fine-grained escape from a learned embedder)."""
    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=2, guidance_scale=7.5)
    own, index = _plant(model, "a red house", tmp_path, PixelEmbedder())
    changes = []

    def before(s):
        changes.append(s.eps.clone())

    def after(s):
        changes.append(s.eps - changes.pop())

    for smooth in (0, 1):
        piece = AMG(index, AMGConfig(terms=("sim",), c3=50.0, always_on=True, check_every=1, smooth=smooth))
        sample(model, ["a red house"], 0, pieces=[before, piece, after], progress=False)
    plain, smoothed = changes[0], changes[2]                        # the first step of each run
    flat = smoothed.flatten(2)
    assert flat.abs().max() > 0 and torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-6)
    assert not torch.allclose(plain.flatten(2), plain.flatten(2)[..., :1].expand_as(plain.flatten(2)), atol=1e-6)
    with pytest.raises(ValueError, match="smooth"):
        config_for("amg", "l2", smooth=-1)


def _record_decodes(model) -> list[bool]:
    """Wrap ``model.decode`` so that each call appends its ``clamp`` argument to the returned list."""
    calls, real = [], model.decode
    model.decode = lambda x, clamp=True: calls.append(clamp) or real(x, clamp)
    return calls


def test_amg_over_a_latent_index_steers_away_without_decoding(tiny_sd_path, tmp_path):
    from memfree.mitigate import build_mitigation, generate
    from memfree.similarity import LatentIndex
    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=6, guidance_scale=7.5)
    prompt = "a red house by a lake"
    own = sample(model, [prompt], 0, progress=False).images
    noise = torch.rand((60, *own.shape[1:]), generator=torch.Generator().manual_seed(1))
    index = LatentIndex.from_images(model.vae, torch.cat([own, noise]), [prompt] + [f"random {i}" for i in range(60)],
                                    grid=4).save(tmp_path / "latent")
    index = LatentIndex.load(index)
    assert len(index) == 61 and index.embedder.dim == 4 * 4 * model.vae.config.latent_channels
    assert index.captions[0] == prompt
    decodes = _record_decodes(model)
    piece = AMG(index, AMGConfig(c3=50.0, always_on=True, check_every=1, terms=("sim",)))
    out = sample(model, [prompt], 0, pieces=[piece], progress=False)
    assert decodes == [True]                         # only the final image: the checks and the step stay in latent space
    assert piece.summary(0)["fired_steps"]["sim"] == list(range(6))
    with torch.no_grad():
        def latent_sigma(images):
            z = model.vae.encode(images * 2 - 1).latent_dist.mean * model.vae.config.scaling_factor
            return nearest(index, z)[0].item()
    assert latent_sigma(out.images) < latent_sigma(own) - 0.05
    # the mitigation takes a loaded latent index as it takes a TrainingIndex
    m = build_mitigation("amg", index=index, lam_lo=5.0, lam_hi=5.0)
    assert torch.equal(generate(model, [prompt], m, seed=0, progress=False).images, own)


def test_amg_over_two_indexes_runs_one_piece_per_index_with_its_own_gate(tiny_sd_path, tmp_path):
    from memfree.mitigate import build_mitigation, generate
    from memfree.similarity import LatentIndex, write_index_tuning
    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=4, guidance_scale=7.5)
    prompt = "a red house by a lake"
    own, pixels = _plant(model, prompt, tmp_path, PixelEmbedder())
    noise = torch.rand((20, *own.shape[1:]), generator=torch.Generator().manual_seed(3))
    latent = LatentIndex.from_images(model.vae, torch.cat([own, noise]), [prompt] + ["x"] * 20, grid=4)
    latent.save(tmp_path / "latent")
    write_index_tuning(tmp_path / "latent", amg={"amg": {"lam_lo": 5.0, "lam_hi": 5.0}})   # this gate never opens
    m = build_mitigation("amg", index=[pixels, LatentIndex.load(tmp_path / "latent")], check_every=1)
    g = generate(model, [prompt], m, seed=0, progress=False)
    amg = g.reports[0].extra["amg"]
    assert len(amg["per_index"]) == 2
    assert amg["per_index"][0]["fired_steps"]["sim"]            # the planted pixels: AMG fires ...
    assert not any(amg["per_index"][1]["fired_steps"].values())  # ... the latent index's own gate stays shut
    assert amg["fired_steps"] == amg["per_index"][0]["fired_steps"] and g.reports[0].applied
    assert amg["checked_steps"] == 8
    assert not torch.equal(g.images, own)
    import os
    listed = build_mitigation("amg", index=f"{tmp_path / 'index'}{os.pathsep}{tmp_path / 'latent'}")
    assert listed.index == [str(tmp_path / "index"), str(tmp_path / "latent")]   # the CLI's DIR1:DIR2


def test_two_indexes_share_one_decode_per_check_until_one_acts(tiny_sd_path, tmp_path):
    from memfree.mitigate import build_mitigation, generate
    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=4, guidance_scale=7.5)
    prompt = "a red house by a lake"
    own, pixels = _plant(model, prompt, tmp_path, PixelEmbedder())
    small = build_index((own.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy(), tmp_path / "small",
                        PixelEmbedder(8), captions=[prompt], progress=False)
    decodes = _record_decodes(model)

    def run(**kw):
        decodes.clear()
        g = generate(model, [prompt], build_mitigation("amg", index=[pixels, small], check_every=1, **kw),
                     seed=0, progress=False)
        return g, len(decodes)

    quiet, n_quiet = run(lam_lo=5.0, lam_hi=5.0)      # no piece acts: one decode per step serves both, + the image
    assert quiet.reports[0].extra["amg"]["checked_steps"] == 8 and n_quiet == 4 + 1
    assert torch.equal(quiet.images, own)
    acting, n_acting = run(always_on=True)            # the first piece acts: the second decodes its own x̂0
    assert n_acting == 4 * (2 + 2) + 1 and acting.reports[0].applied   # per step: a check and a step each


def test_amg_by_default_steers_by_every_index_the_model_folder_ships(tiny_sd_path, tmp_path):
    """``index/`` and any ``index-*/`` beside it: AMG without an index argument runs one piece for each."""
    import shutil
    from memfree.mitigate import default_indexes, generate
    from memfree.similarity import write_index_tuning
    folder = Path(shutil.copytree(tiny_sd_path, tmp_path / "model"))
    model = memfree.load(folder).with_settings(num_inference_steps=4, guidance_scale=7.5)
    prompt = "a red house by a lake"
    own, _ = _plant(model, prompt, tmp_path, PixelEmbedder())
    shutil.copytree(tmp_path / "index", folder / "index")
    shutil.copytree(tmp_path / "index", folder / "index-shut")
    write_index_tuning(folder / "index-shut", amg={"amg": {"lam_lo": 5.0, "lam_hi": 5.0}})   # its gate never opens
    (folder / "index-empty").mkdir()                                                        # no meta.json: not an index
    assert [Path(ix.path).name for ix in default_indexes(model)] == ["index", "index-shut"]
    g = generate(model, [prompt], "amg", seed=0, progress=False, check_every=1)
    amg = g.reports[0].extra["amg"]
    assert len(amg["per_index"]) == 2 and amg["per_index"][0]["fired_steps"]["sim"]
    assert not any(amg["per_index"][1]["fired_steps"].values()) and not torch.equal(g.images, own)



def test_latent_screen_and_latent_index_distances_match_the_direct_difference():
    """The |a|²+|b|²−2ab shortcut gives the σ and neighbours the direct ℓ2 gives: the index's float64 within
    1e-5; the screen's float32 within 1e-5 but for near-exact copies (cancellation: under 1e-3 at σ ≈ 1, far over
    any bar)."""
    from memfree.similarity import LatentIndex, LatentScreen, normalised_l2, similarity_from_nl2
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(300, 4, 8, 8, generator=g) * 2 + 0.5
    x0 = torch.cat([latents[:3] + 1e-3 * torch.randn(3, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)])
    screen = LatentScreen(latents, grid=4)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x0, 4).flatten(1)
    direct = torch.cdist(pooled, screen.vectors, compute_mode="donot_use_mm_for_euclid_dist")
    near, ids = direct.topk(screen.k, dim=1, largest=False)
    expected = similarity_from_nl2(normalised_l2(near))
    assert torch.allclose(screen.similarity(x0)[3:], expected[3:], atol=1e-5)
    assert torch.allclose(screen.similarity(x0)[:3], expected[:3], atol=1e-3)
    assert screen.similarity(x0)[:3].min() > 0.99 and screen.similarity(x0)[3:].max() < 0.5
    index = LatentIndex(latents, [f"c{i}" for i in range(300)], grid=4)
    d, found = index.search(pooled, 5)
    assert torch.equal(found, ids[:, :5]) and torch.allclose(d, near[:, :5], atol=1e-5)


def test_a_check_decodes_in_bf16_only_where_asked_or_native(tiny_sd_path, monkeypatch):
    """The check's decode: fp32 is the model's own decode, bf16 is close to it in float32, and "auto" is bf16
    exactly when the CPU has native bf16. The gradient's decode is never affected."""
    import memfree.guidance as guidance
    model = memfree.load(tiny_sd_path)
    x0 = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.decode(x0, clamp=False)
        assert torch.equal(guidance.check_decode(model, x0, "fp32"), full)
        low = guidance.check_decode(model, x0, "bf16")
        assert low.dtype == torch.float32 and low.shape == full.shape
        assert 0 < (low - full).abs().max() < 0.05
        for native, expected in ((False, full), (True, low)):
            monkeypatch.setattr(guidance, "_native_bf16", lambda: native)
            assert torch.equal(guidance.check_decode(model, x0, "auto"), expected)
    with pytest.raises(ValueError, match="check_precision"):
        config_for("amg", "l2", check_precision="fp16")
