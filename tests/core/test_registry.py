"""Mitigations are objects registered by name: a new one is a file and a registry line, and it then works in
`generate` and on the command line like the built-in ones."""
import json

import pytest
import torch
from click.testing import CliRunner

import memfree
from memfree.cli import cli
from memfree.mitigate import METHODS, build_mitigation, generate, method_options, register_mitigation
from memfree.sampling import sample

from toy_mitigation import Toy


@pytest.fixture
def toy_registered():
    register_mitigation("toy", Toy)
    yield
    METHODS.pop("toy")


def test_a_toy_method_is_one_file_and_one_registry_line(toy_registered, tiny_sd_path, tmp_path):
    model = memfree.load(tiny_sd_path).with_settings(num_inference_steps=3)
    g = generate(model, ["a cat", "a dog"], "toy", seed=4, strength=0.25, progress=False)
    ref = sample(model, ["a cat", "a dog"], [4, 5], guidance_scale=0.25 * model.settings.guidance_scale,
                 progress=False)
    assert torch.allclose(g.images, ref.images, atol=1e-5)      # its piece ran at every step
    assert [r.method for r in g.reports] == ["toy", "toy"] and all(r.applied for r in g.reports)
    assert g.reports[0].extra == {"toy": {"strength": 0.25}}
    assert method_options("toy") == {"strength": ("float", 0.5)}
    r = CliRunner().invoke(cli, ["generate", "a cat", "--model", str(tiny_sd_path), "--mitigation", "toy",
                                 "--opt", "strength=0.25", "--steps", "3", "--seed", "4", "--out",
                                 str(tmp_path / "o"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["images"][0]
    assert row["method"] == "toy" and row["extra"] == {"toy": {"strength": 0.25}}
    r = CliRunner().invoke(cli, ["mitigations"])
    assert "toy" in r.output and "strength=0.5" in r.output


def test_unknown_methods_and_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown mitigation 'toy'"):
        build_mitigation("toy")
    with pytest.raises(ValueError, match="wen has no option strength"):
        build_mitigation("wen", strength=1.0)
    with pytest.raises(ValueError, match="amg has no option c4"):
        build_mitigation("amg", c4=1.0)
    assert build_mitigation("wen", target_scale=1.0).target_scale == 1.0
    with pytest.raises(ValueError, match="finite"):
        build_mitigation("wen", target=float("nan"))
