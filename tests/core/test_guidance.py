"""Anti-Memorization Guidance: σ agrees with nL2, the gate rises, each term does what it says, the
cadence and the screen save checks, and on the bundled testbed AMG stops copies without touching
ordinary prompts."""
import dataclasses
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

import memfree
from memfree.cli import cli
from memfree.guidance import AMG, AMGConfig, config_for, nearest, similarity_to
from memfree.index import PixelEmbedder, TorchScriptEmbedder, TrainingIndex, build_index
from memfree.mitigate import default_index, generate
from memfree.sampling import sample
from memfree.testbed.bundle import load_testbed


@pytest.fixture(scope="module")
def testbed():
    model = memfree.load(memfree.model.bundled_model_path())
    return model, load_testbed(model), default_index(model)


def test_sigma_is_one_minus_half_nl2_and_one_for_a_training_image(testbed):
    _, tb, index = testbed
    g = torch.Generator().manual_seed(0)
    train = torch.from_numpy(tb.images[[3, 100, 2000]]).permute(0, 3, 1, 2).float() / 255
    noisy = (train + 0.15 * torch.randn(train.shape, generator=g)).clamp(0, 1)
    images = torch.cat([train, noisy])
    sig, ids = nearest(index, images)
    nn = tb.index.search(images)
    assert torch.allclose(sig, 1 - nn.nl2 / 2, atol=1e-4)
    assert torch.equal(ids[:, 0], nn.ids)
    assert torch.allclose(sig[:3], torch.ones(3), atol=1e-4)
    assert torch.allclose(similarity_to(index, images, ids), sig, atol=1e-4)


def test_a_step_against_the_gradient_lowers_similarity(testbed):
    _, tb, index = testbed
    x = (torch.from_numpy(tb.images[[7, 8]]).permute(0, 3, 1, 2).float() / 255 * 0.9 + 0.05).requires_grad_(True)
    _, ids = nearest(index, x.detach())
    sig = similarity_to(index, x, ids)
    grad, = torch.autograd.grad(sig.sum(), x)
    after = similarity_to(index, x.detach() - 20 * grad, ids)
    assert (after < sig.detach() - 0.01).all()


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


def test_amg_on_the_testbed_stops_copies_and_leaves_ordinary_prompts_alone(testbed):
    model, tb, index = testbed
    verbatim = [e["prompt"] for e in tb.eval_sets["verbatim"][:6]]
    heldout = [e["prompt"] for e in tb.eval_sets["heldout"][:3]]
    prompts = verbatim + heldout
    base = generate(model, prompts, "none", seed=0, index=tb.index, progress=False)
    amg = generate(model, prompts, "amg", seed=0, index=tb.index, train_index=index, progress=False)
    copies = [r.memorized for r in base.reports[:6]]
    assert sum(copies) >= 3                                         # the testbed copies these captions
    assert not any(r.memorized for r in amg.reports)                 # AMG copies none of them
    for r, b in zip(amg.reports[:6], base.reports[:6]):
        if b.memorized:
            assert r.applied and r.extra["amg"]["fired_steps"]["sim"]
            assert r.nl2 > b.nl2
    for i in range(6, 9):                                            # ordinary prompts: untouched
        assert not amg.reports[i].applied
        assert torch.equal(amg.images[i], base.images[i])
        # the cadence: checked every 4th step only, unless σ came near the gate
        log = amg.reports[i].extra["amg"]
        assert log["checked_steps"] >= 13


def test_screen_and_cadence_count_checks(testbed):
    model, tb, index = testbed
    prompts = [e["prompt"] for e in tb.eval_sets["heldout"][:2]]
    model.defaults["num_inference_steps"] = 12
    try:
        screened = AMG(index, AMGConfig(screen=float("inf")))
        out = sample(model, prompts, 0, pieces=[screened], progress=False)
        ref = sample(model, prompts, 0, progress=False)
        assert torch.equal(out.images, ref.images)
        assert all(screened.summary(i)["checked_steps"] == 0 and screened.summary(i)["screened_out"] for i in (0, 1))
        sparse = AMG(index, AMGConfig(check_every=4, watch=2.0, lam_lo=2.0, lam_hi=2.0))  # never watched or fired
        sample(model, prompts, 0, pieces=[sparse], progress=False)
        assert [sparse.summary(i)["checked_steps"] for i in (0, 1)] == [3, 3]   # steps 0, 4, 8
        dense = AMG(index, AMGConfig(check_every=1, lam_lo=2.0, lam_hi=2.0))
        sample(model, prompts, 0, pieces=[dense], progress=False)
        assert [dense.summary(i)["checked_steps"] for i in (0, 1)] == [12, 12]
    finally:
        model.defaults["num_inference_steps"] = 50


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
    model.defaults.update(num_inference_steps=6, guidance_scale=7.5)
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
    model.defaults.update(num_inference_steps=3, guidance_scale=7.5)
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
    model.defaults.update(num_inference_steps=4, guidance_scale=7.5)
    own, index = _plant(model, "a castle", tmp_path, TorchScriptEmbedder(path, size=16))
    assert index.embedder.metric == "cosine"
    cfg = config_for("amg", "cosine", c3=5.0, always_on=True, check_every=1)
    piece = AMG(index, cfg)
    out = sample(model, ["a castle"], 0, pieces=[piece], progress=False)
    assert piece.summary(0)["fired_steps"]["sim"] == list(range(4))
    assert nearest(index, out.images)[0].item() < nearest(index, own)[0].item()


def test_cli_generate_amg_reports_terms_and_refuses_a_model_without_index(tiny_sd_path, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["generate", "a castle", "--model", str(tiny_sd_path), "--mitigation", "amg",
                              "--out", str(tmp_path / "o"), "--steps", "2", "--quiet"])
    assert res.exit_code != 0 and "index" in res.output
    fired = {}
    for method in ("amg", "amg-all-terms"):
        res = runner.invoke(cli, ["generate", "a red square", "--mitigation", method, "--amg-lambda", "0,0",
                                  "--steps", "4", "--out", str(tmp_path / "o"), "--json", "--quiet"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)["images"][0]
        assert report["applied"]
        fired[method] = {t for t, steps in report["extra"]["amg"]["fired_steps"].items() if steps}
    assert fired == {"amg": {"sim"}, "amg-all-terms": {"spe", "dup", "sim"}}   # the pixel preset: dissimilarity only
    res = runner.invoke(cli, ["generate", "a red square", "--mitigation", "amg", "--amg-lambda", "1",
                              "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code != 0 and "LO,HI" in res.output


def test_grid_keeps_the_dissimilarity_step_free_of_colour_casts(testbed):
    """With ``grid=1`` the change AMG makes to ε̂ has zero mean in every channel (no global colour
    shift); without it the step does shift the channel means."""
    model, _, index = testbed
    prompt = testbed[1].eval_sets["verbatim"][0]["prompt"]

    def change(grid: int) -> torch.Tensor:
        seen = []
        record = lambda s: seen.append(s.eps.clone())
        piece = AMG(index, AMGConfig(terms=("sim",), always_on=True, check_every=1, grid=grid))
        sample(model, [prompt], 0, pieces=[record, piece, record], progress=False, max_steps=3)
        return torch.stack([seen[i + 1] - seen[i] for i in range(0, len(seen), 2)])  # (steps, B, C, H, W)

    flat, free = change(0), change(1)
    assert free.abs().amax() > 0
    assert free.mean(dim=(-2, -1)).abs().amax() < 1e-4 * free.abs().amax()
    assert flat.mean(dim=(-2, -1)).abs().amax() > 1e-2 * flat.abs().amax()
