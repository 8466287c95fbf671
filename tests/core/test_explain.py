import numpy as np
import pytest
import torch

import memfree
from memfree.detect import score_prompts
from memfree.explain import explain, without_words


def test_token_significance_merges_into_words(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    res = explain(model, "Living in the Light with Ann Graham-Lotz", method="gradient")
    assert res.words == ["Living", "in", "the", "Light", "with", "Ann", "Graham-Lotz"]
    assert len(res.tokens) == 10                         # graham, -, lo, tz: four tokens, one word
    assert all(s > 0 for s in res.significance)
    assert sum(res.significance) == pytest.approx(sum(res.token_significance), rel=1e-6)
    assert res.significance[-1] == pytest.approx(sum(res.token_significance[-4:]), rel=1e-6)


def test_significance_is_the_gradient_norm(tiny_sd_path):
    """Compare with a direct autograd computation at the first step."""
    model = memfree.load(tiny_sd_path)
    prompt = "a photo of a cat"
    res = explain(model, prompt, method="gradient")
    ids = model.tokenize([prompt, ""])
    emb = model.text_encoder(ids).last_hidden_state.detach()
    x = torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(0))[None]
    model.scheduler.set_timesteps(model.settings.num_inference_steps)
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


def test_occlusion_is_the_score_drop_and_picks_the_second_word_greedily(tiny_sd_path):
    """Significance of a word is score(prompt) − score(prompt without it); the second leading word is
    the one whose deletion, after the first, leaves the lowest score."""
    model = memfree.load(tiny_sd_path)
    prompt = "a dog on the grass at noon"
    res = explain(model, prompt, generations=2, seed=3)
    assert res.method == "occlusion" and len(res.significance) == 7
    words = prompt.split()
    s = score_prompts(model, [prompt] + [without_words(prompt, [i]) for i in range(7)], generations=2, seed=3,
                      progress=False).mean((1, 2))
    assert res.score == pytest.approx(s[0], rel=1e-5)
    assert res.significance == pytest.approx([s[0] - v for v in s[1:]], rel=1e-4, abs=1e-6)
    first = int(np.argmax(s[0] - s[1:]))
    others = [i for i in range(7) if i != first]
    pair = score_prompts(model, [without_words(prompt, [first, i]) for i in others], generations=2, seed=3,
                         progress=False).mean((1, 2))
    assert res.top_words(2) == [first, others[int(np.argmin(pair))]]
    assert sum(res.token_significance) == pytest.approx(sum(res.significance), rel=1e-5, abs=1e-6)
    assert res.to_dict()["top_words"] == [words[i] for i in res.top_words(2)]


def test_unknown_method_is_refused(tiny_sd_path):
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain(memfree.load(tiny_sd_path), "a cat", method="saliency")
