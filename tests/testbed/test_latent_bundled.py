"""The bundled latent testbed: a plain diffusers Stable Diffusion folder, opened by name through memfree, whose
ground truth is drawn again from its recipe, and on which memfree.protect equals memfree's own loop."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import memfree
from memfree.guidance import AMG, config_for_index
from memfree.mitigate import default_index
from memfree.protect import protect
from memfree.sampling import initial_noise, sample
from memfree_testbed.bundle import latent_model_dir, load_testbed


@pytest.fixture(scope="module")
def latent():
    model = memfree.load("testbed-latent").with_settings(num_inference_steps=20)
    return model, load_testbed(model)


def test_it_is_a_plain_stable_diffusion_folder():
    pipe = StableDiffusionPipeline.from_pretrained(latent_model_dir())
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small red circle at the left on a gray background", num_inference_steps=10, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and 0.05 < out.std() and np.isfinite(out).all()


def test_opened_by_name_with_its_ground_truth_and_copy_detector(latent):
    model, tb = latent
    assert model.name == "testbed-latent" and model.vae is not None and model.latent_shape == (4, 16, 16)
    assert tb.images.shape == (5990, 64, 64, 3)                 # drawn again from the recipe, digest checked
    assert tb.copy_index is not None and tb.copy_index.embedder.metric == "cosine"
    assert len(tb.copy_index) == len(tb.images) and 0.3 < tb.copy_threshold < 0.9


def test_protect_equals_memfree_own_amg_on_planted_captions(latent):
    """The user's path (plain pipeline + memfree.protect) and memfree's loop give the same AMG generations."""
    model, tb = latent
    prompts = [e["prompt"] for e in tb.eval_sets["verbatim"][:2]]
    index = default_index(model)
    x_T = initial_noise(model, [0, 1])
    piece = AMG(index, config_for_index("amg", index))      # the gate tuned for the bundled copy detector
    ours = sample(model, prompts, latents=x_T, pieces=[piece], progress=False).images
    pipe = StableDiffusionPipeline.from_pretrained(model.path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = model.new_scheduler()
    with protect(pipe, "amg", index=index):
        out = pipe(prompts, num_inference_steps=20, guidance_scale=model.settings.guidance_scale, latents=x_T.clone(),
                   output_type="pt")
    assert [r.amg["fired_steps"] for r in out.memorization] == [piece.summary(i)["fired_steps"] for i in range(2)]
    assert any(piece.summary(i)["fired_steps"]["sim"] for i in range(2))   # the gate opened: AMG acted
    assert (out.images.float() - ours).abs().max() < 2e-3


def test_the_demo_page_judges_by_the_copy_detector_at_64_pixels(latent, tmp_path):
    """`memfree demo --model testbed-latent`: the same page, each generation judged by the bundled copy detector,
    and on the verbatim captions shown AMG leaves no copy where the model without memfree makes them."""
    from memfree_testbed.demo import SECTIONS, run_demo
    model, tb = latent
    sizes = {name: 0 for name, _, _ in SECTIONS} | {"verbatim": 4, "heldout": 2}
    res = run_demo(model, tmp_path, progress=False, sizes=sizes)
    page = (tmp_path / "index.html").read_text()
    assert f"cosine above {tb.copy_threshold:.3f}" in page and "cosine 0." in page and "nL2 " not in page
    assert page.count("<tr class='row'>") == 6
    assert res["sets"]["verbatim"]["memorized_without"] >= 0.5 and res["sets"]["verbatim"]["memorized_with"] == 0.0
