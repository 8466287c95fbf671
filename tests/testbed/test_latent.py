"""The latent testbed's parts: the autoencoder and copy embedder train resumably, the UNet trains on latents and
exports a folder plain diffusers opens, and a compact ground truth draws its ordinary images again exactly."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import memfree
from memfree.index import TorchScriptEmbedder
from memfree_testbed.bundle import attach_ground_truth, ground_truth_images
from memfree_testbed.data import build_dataset, load_dataset
from memfree_testbed.embedder import augment, contrastive_loss, train_embedder
from memfree_testbed.train import train
from memfree_testbed.vae import train_vae

SMALL = dict(style="v3", verbatim_captions="named", n_ordinary=1440, repeats=4, n_eval=10)


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    path = tmp_path_factory.mktemp("data64")
    build_dataset(path, seed=0, size=64, **SMALL)
    return path


@pytest.fixture(scope="module")
def vae_dir(data64, tmp_path_factory):
    return train_vae(data64, tmp_path_factory.mktemp("vae"), steps=3, batch_size=2, quiet=True)


def test_vae_resumes_bit_for_bit_and_sets_a_scaling_factor(data64, vae_dir, tmp_path):
    assert train_vae(data64, tmp_path, steps=3, batch_size=2, stop_after=1, quiet=True) is None
    resumed = train_vae(data64, tmp_path, steps=3, batch_size=2, quiet=True)
    a = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(resumed)
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor != 1.0
    from memfree.images import from_uint8_signed
    from memfree_testbed.vae import encode_images
    images, _ = load_dataset(data64)
    z = encode_images(vae, from_uint8_signed(images[:256]))
    assert z.shape[1:] == (4, 16, 16)                               # 4× down-sampling, 4 channels


def test_latent_unet_exports_a_plain_stable_diffusion_folder(data64, vae_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    model_dir = train(data64, tmp_path, steps=2, batch_size=2, quiet=True, vae_dir=vae_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)      # no memfree code, no dtype argument
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small red circle at the left on a gray background", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    model = memfree.load(model_dir)
    assert model.vae is not None and model.latent_shape == (4, 16, 16)
    assert model.scheduler.config.clip_sample is False              # latents are not clipped to [-1, 1]
    assert model.settings.info["kind"] == "testbed-latent"


def test_copy_embedder_trains_resumes_and_loads_as_torchscript(data64, tmp_path):
    kw = dict(steps=3, batch_size=8, quiet=True)
    straight = train_embedder(data64, tmp_path / "a", **kw)
    assert train_embedder(data64, tmp_path / "b", stop_after=1, **kw) is None
    resumed = train_embedder(data64, tmp_path / "b", **kw)
    emb_a, emb_b = TorchScriptEmbedder(straight, size=64), TorchScriptEmbedder(resumed, size=64)
    images, _ = load_dataset(data64)
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255
    va, vb = emb_a(x), emb_b(x)
    assert torch.equal(va, vb) and emb_a.metric == "cosine"
    assert torch.allclose(va.norm(dim=1), torch.ones(4), atol=1e-5)


def test_augmentations_keep_a_copy_closer_than_another_image():
    """The contrastive loss is lower when the two views are of the same images than when shuffled."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 64, 64, generator=g)
    a, b = augment(x, g), augment(x, g)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1 and not torch.equal(a, b)
    flat = lambda v: torch.nn.functional.normalize(v.flatten(1), dim=1)  # noqa: E731
    matched = contrastive_loss(flat(a), flat(b))
    shuffled = contrastive_loss(flat(a), flat(b[torch.randperm(16, generator=g)]))
    assert matched < shuffled


def test_compact_ground_truth_draws_the_same_images(tmp_path, monkeypatch):
    data = tmp_path / "data"
    build_dataset(data, seed=3, size=16, **SMALL)
    images, _ = load_dataset(data)
    root = attach_ground_truth(tmp_path / "model", data, compact=True)
    assert not (root / "images.npz").exists() and (root / "recipe.json").exists()
    assert np.array_equal(ground_truth_images(root), images)            # drawn again into the cache, digest checked
    assert np.array_equal(ground_truth_images(root), images)            # and read from the cache
