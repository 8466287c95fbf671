import pytest
import torch

import memfree
from memfree.explain import explain, without_words


def test_token_significance_merges_into_words(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    res = explain(model, "Living in the Light with Ann Graham-Lotz")
    assert res.words == ["Living", "in", "the", "Light", "with", "Ann", "Graham-Lotz"]
    assert len(res.tokens) == 10                         # graham, -, lo, tz: four tokens, one word
    assert all(s > 0 for s in res.significance)
    assert sum(res.significance) == pytest.approx(sum(res.token_significance), rel=1e-6)
    assert res.significance[-1] == pytest.approx(sum(res.token_significance[-4:]), rel=1e-6)


def test_significance_is_the_gradient_norm(tiny_sd_path):
    """Compare with a direct autograd computation at the first step."""
    model = memfree.load(tiny_sd_path)
    prompt = "a photo of a cat"
    res = explain(model, prompt)
    ids = model.tokenize([prompt, ""])
    emb = model.text_encoder(ids).last_hidden_state.detach()
    x = torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(0))[None]
    model.scheduler.set_timesteps(model.num_inference_steps)
    t = model.scheduler.timesteps[0]
    e = emb[:1].clone().requires_grad_(True)
    with torch.no_grad():
        eps_u = model.unet(x, t, emb[1:]).sample
    loss = (model.unet(x, t, e).sample - eps_u).flatten().norm()
    (g,) = torch.autograd.grad(loss, e)
    ref = g[0].norm(dim=1)[1:6]
    torch.testing.assert_close(torch.tensor(res.token_significance), ref, rtol=1e-4, atol=1e-6)


def test_without_words():
    assert without_words("a b c d", [1, 3]) == "a c"
