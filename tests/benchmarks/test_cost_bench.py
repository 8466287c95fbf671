"""`memfree bench cost` on the tiny architecture: every method timed in one interleaved run, ratios to none."""
import json

import pytest
from click.testing import CliRunner

from memfree.cli import cli
from memfree_bench.cost import METHODS, checks_per_image, projected_ratios


def test_cost_bench_tiny(tmp_path):
    out = tmp_path / "cost.json"
    r = CliRunner().invoke(cli, ["bench", "cost", "--arch", "tiny", "--vectors", "2000", "--steps", "4",
                                 "--repeats", "1", "--cache", str(tmp_path / "cache"), "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    rows = {row["method"]: row for row in res["rows"]}
    assert set(rows) == set(METHODS)
    for row in rows.values():
        assert {"arch", "resolution", "steps", "device", "method", "seconds_per_image", "ratio",
                "peak_memory_mb"} <= set(row)
        assert row["arch"] == "tiny" and row["steps"] == 4 and row["seconds_per_image"] > 0 and row["peak_memory_mb"] > 0
    assert rows["none"]["ratio"] == 1.0
    assert rows["amg-fired"]["seconds_per_image"] > rows["amg-clean"]["seconds_per_image"]
    # the clean gate never fires and checks on the cadence only; the fired one checks every call after the first
    assert rows["amg-clean"]["mitigated"] is False and rows["amg-clean"]["checked_steps"] == 2   # PNDM: 5 calls
    assert rows["amg-fired"]["mitigated"] is True and rows["amg-fired"]["checked_steps"] == 5
    # behind both screens an ordinary prompt is never checked, only compared with the training latents
    assert rows["amg-screened"]["checked_steps"] == 0 and rows["amg-screened"]["mitigated"] is False
    assert rows["amg-screened"]["decoder_passes"] == rows["none"]["decoder_passes"]
    assert rows["wen"]["denoiser_calls"] > rows["none"]["denoiser_calls"] == rows["detect"]["denoiser_calls"]
    names = {c["component"] for c in res["components"]}
    assert {"denoiser_call_cfg", "vae_decode", "embed_fwd", "embed_fwd_bwd", "search_1"} <= names
    assert all(c["seconds"] > 0 for c in res["components"])
    assert res["architectures"]["tiny"]["index_vectors"] == 2000


def test_cost_bench_refuses_an_unknown_method(tmp_path):
    r = CliRunner().invoke(cli, ["bench", "cost", "--arch", "tiny", "--methods", "none,amg-magic"])
    assert r.exit_code == 2 and "amg-magic" in r.output


def test_projection_counts_checks():
    assert checks_per_image(50, 4) == 13 and checks_per_image(51, 4) == 13 and checks_per_image(50, 8) == 7
    p = projected_ratios(unet=0.03, decode=0.02, embed=0.005, search=0.001, image=1.5)
    assert p["detect"] == 1.0
    assert p["amg-clean"] == pytest.approx(1 + (13 * 0.026 + 0.006) / 1.5)
    assert p["amg-screen"] < p["amg-latent"] < p["amg-every-8"] < p["amg-clean"] < p["amg-every-1"]
