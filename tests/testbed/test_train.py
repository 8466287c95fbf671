"""Training resumes exactly where it stopped, exports a loadable model, and honours the sample filter."""
import json

import torch
from safetensors.torch import load_file

import memfree
from memfree.sampling import sample
from memfree_testbed.train import export_checkpoint, make_unet, train


def _weights(model_dir):
    return load_file(str(next((model_dir / "unet").glob("*.safetensors"))))


def test_interrupted_run_resumes_bit_for_bit(testbed_data, tmp_path):
    data, _, _ = testbed_data
    kw = dict(steps=4, batch_size=4, checkpoint_every=100, quiet=True)
    straight = train(data, tmp_path / "a", **kw)
    assert train(data, tmp_path / "b", stop_after=2, **kw) is None   # stopped early, checkpointed
    resumed = train(data, tmp_path / "b", guidance_scale=3.5, **kw)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint of the finished run exports the very weights the run exported.
    c = _weights(export_checkpoint(tmp_path / "b"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "b" / "model-step4" / "memfree.json").exists()

    model = memfree.load(resumed)                                     # pixel-space, no VAE
    assert model.vae is None and model.latent_shape == (3, 32, 32)
    assert model.settings.guidance_scale == 3.5 and memfree.load(straight).settings.guidance_scale == 2.0
    out = sample(model, ["a small red circle at the left on a gray background"], seeds=[0],
                 num_inference_steps=2, progress=False)
    assert out.images.shape == (1, 3, 32, 32)


def test_filter_that_keeps_nothing_leaves_weights_untouched(testbed_data, tmp_path):
    data, _, _ = testbed_data
    kw = dict(steps=3, batch_size=4, log_every=3, quiet=True)
    calls = []

    def keep_none(unet, x_t, t, cond, uncond, eps_cond):
        calls.append(len(x_t))
        assert eps_cond.shape == x_t.shape and not eps_cond.requires_grad
        return torch.zeros(len(x_t), dtype=torch.bool)

    filtered = train(data, tmp_path / "f", keep_mask_fn=keep_none, **kw)
    assert calls == [4, 4, 4]
    log = json.loads((tmp_path / "f" / "train_state.json").read_text())["log"]
    kinds = {t["kind"] for t in json.loads((data / "manifest.json").read_text())["train"]}
    assert log[-1]["kept"] and set(log[-1]["kept"]) <= kinds and set(log[-1]["kept"].values()) == {0.0}
    torch.manual_seed(0)  # train() seeds the same way before building the UNet
    init = {k: v.to(torch.float16) for k, v in make_unet(32).state_dict().items()}
    got = _weights(filtered)
    # No optimiser step ran; an Adam step would move every weight by about the learning rate (6e-4).
    assert all(torch.allclose(got[k].float(), init[k].float(), atol=1e-4, rtol=1e-3) for k in init)
