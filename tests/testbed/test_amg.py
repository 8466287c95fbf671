"""Anti-Memorization Guidance on the bundled testbed: σ agrees with nL2, a step against ∇σ lowers it, AMG
stops copies without touching ordinary prompts, and the screen and cadence save checks."""
import pytest
import torch

import memfree
import json

from click.testing import CliRunner

from memfree.cli import cli
from memfree.guidance import AMG, AMGConfig, config_for
from memfree.mitigate import default_index, generate
from memfree.sampling import sample
from memfree.similarity import nearest, similarity_to
from memfree_testbed import load_testbed


@pytest.fixture(scope="module")
def testbed():
    model = memfree.load("testbed")
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


def test_amg_on_the_testbed_stops_copies_and_leaves_ordinary_prompts_alone(testbed):
    model, tb, index = testbed
    verbatim = [e["prompt"] for e in tb.eval_sets["verbatim"][:6]]
    heldout = [e["prompt"] for e in tb.eval_sets["heldout"][:3]]
    prompts = verbatim + heldout
    base = generate(model, prompts, "none", seed=0, progress=False)
    amg = generate(model, prompts, "amg", seed=0, index=index, progress=False)
    near_base, near_amg = tb.index.search(base.images), tb.index.search(amg.images)
    copies = near_base.memorized[:6]
    assert int(copies.sum()) >= 3                                   # the testbed copies these captions
    assert not near_amg.memorized.any()                             # AMG copies none of them
    for i, (r, copied) in enumerate(zip(amg.reports[:6], copies.tolist())):
        if copied:
            assert r.applied and r.extra["amg"]["fired_steps"]["sim"]
            assert near_amg.nl2[i] > near_base.nl2[i]
    for i in range(6, 9):                                            # ordinary prompts: untouched
        assert not amg.reports[i].applied
        assert torch.equal(amg.images[i], base.images[i])
        # the cadence: checked every 4th step only, unless σ came near the gate
        log = amg.reports[i].extra["amg"]
        assert log["checked_steps"] >= 13


def test_screen_and_cadence_count_checks(testbed):
    model, tb, index = testbed
    prompts = [e["prompt"] for e in tb.eval_sets["heldout"][:2]]
    model = model.with_settings(num_inference_steps=12)
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
    with pytest.raises(ValueError, match="watch_every"):
        config_for("amg", watch_every=0)


def test_cli_generate_amg_reports_terms_and_refuses_a_model_without_index(tiny_sd_path, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["generate", "a castle", "--model", str(tiny_sd_path), "--mitigation", "amg",
                              "--out", str(tmp_path / "o"), "--steps", "2", "--quiet"])
    assert res.exit_code != 0 and "index" in res.output
    fired = {}
    for method in ("amg", "amg-all-terms"):
        res = runner.invoke(cli, ["generate", "a red square", "--mitigation", method, "--opt", "lam_lo=0", "--opt", "lam_hi=0",
                                  "--steps", "4", "--out", str(tmp_path / "o"), "--json", "--quiet"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)["images"][0]
        assert report["applied"]
        fired[method] = {t for t, steps in report["extra"]["amg"]["fired_steps"].items() if steps}
    assert fired == {"amg": {"sim"}, "amg-all-terms": {"spe", "dup", "sim"}}   # the pixel preset: dissimilarity only
    res = runner.invoke(cli, ["generate", "a red square", "--mitigation", "amg", "--opt", "lam_lo",
                              "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(cli, ["generate", "a red square", "--mitigation", "amg", "--opt", "c3=lots",
                              "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2 and "c3 takes a value of type float" in res.output


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
