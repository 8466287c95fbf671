"""The mitigation benchmark: its Fréchet distance, its rows on the bundled testbed, and resuming."""
import json

import numpy as np
import pytest
import torch

import memfree
from memfree_bench.mitigate import format_table, frechet_distance, run_bench
from memfree.similarity import similarity_from_nl2


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-3)   # only the mean moved
    wide = a * 2.0                                                       # Σ_b = 4Σ_a: tr(Σa+4Σa−2·2Σa) = tr Σa
    assert frechet_distance(a, wide) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-3)


def test_similarity_is_one_for_a_copy_and_point_three_at_the_threshold():
    import torch
    assert similarity_from_nl2(torch.tensor([0.0, 1.4, 2.0])).tolist() == pytest.approx([1.0, 0.3, 0.0])


def test_rows_on_the_bundled_testbed_and_resume(tmp_path):
    model = memfree.load()
    model = model.with_settings(num_inference_steps=2)           # a smoke-sized run: the figures are not the point
    out = tmp_path / "m.json"
    res = run_bench(model, out, methods=("none", "rna"), sets=("caption_dup", "heldout"), seeds=(0,),
                    plot=tmp_path / "m.png", progress=False)
    rows = res["rows"]
    assert {(r["method"], r["prompt_set"]) for r in rows} == {("none", "caption_dup"), ("rna", "caption_dup"),
                                                            ("none", "heldout"), ("rna", "heldout")}
    keys = {"method", "prompt_set", "memorization_rate", "top5_similarity", "top1_similarity", "alignment",
            "frechet", "seconds_per_image", "overhead_ratio"}
    for r in rows:
        assert keys <= set(r)
        assert 0.0 <= r["memorization_rate"] <= 1.0 and r["top1_similarity"] >= r["top5_similarity"]
        assert r["generations"] == r["prompts"] and r["seconds_per_image"] > 0
        if r["method"] == "none":
            assert r["overhead_ratio"] == 1.0 and r["applied_rate"] == 0.0
        else:
            assert r["applied_rate"] == 1.0
    held = next(r for r in rows if r["prompt_set"] == "heldout" and r["method"] == "none")
    assert 0.0 <= held["alignment"] <= 1.0
    assert (tmp_path / "m.png").stat().st_size > 0 and "| rna | heldout |" in format_table(rows)

    # A second run with the same file and settings computes nothing new and keeps the rows.
    before = json.loads(out.read_text())
    again = run_bench(model, out, methods=("none", "rna"), sets=("caption_dup", "heldout"), seeds=(0,),
                      progress=False)
    assert again["rows"] == before["rows"]
    # An interrupted run (a row missing) resumes with just that row.
    before["rows"] = before["rows"][:-1]
    out.write_text(json.dumps(before))
    resumed = run_bench(model, out, methods=("none", "rna"), sets=("caption_dup", "heldout"), seeds=(0,),
                        progress=False)
    assert len(resumed["rows"]) == 4 and resumed["rows"][:3] == before["rows"]


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        run_bench(memfree.load(), tmp_path / "x.json", methods=("magic",), progress=False)


def test_filter_bench_counts_keep_rates_per_kind():
    from memfree_bench.filter import filter_rates
    model = memfree.load("testbed")
    res = filter_rates(model, thresholds=(0.0, 1.0, 3.0, 1e9), samples=96, batch_size=48)
    rows = {r["kind"]: r for r in res["rows"]}
    assert "ordinary" in rows and "verbatim" in rows
    assert sum(r["n"] for r in rows.values()) == 96
    for r in rows.values():
        keep = [r["keep_rate"][str(t)] for t in (0.0, 1.0, 3.0, 1e9)]
        assert keep[0] == 0.0 and keep[-1] == 1.0 and keep == sorted(keep)
        assert r["percentiles"]["10"] <= r["percentiles"]["50"] <= r["percentiles"]["90"]


def test_overhead_bench_interleaves_and_takes_ratios_to_none(tiny_sd_path):
    from memfree_bench.overhead import measure_overhead
    model = memfree.load(tiny_sd_path)
    model = model.with_settings(num_inference_steps=2)
    res = measure_overhead(model, ["a cat", "a dog", "a fox"], ["rna", "none"], repeats=2, chunk=2, progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["none", "rna"] and res["repeats"] == 2 and res["chunk"] == 2
    assert rows["none"]["ratios"] == [1.0, 1.0] and rows["none"]["overhead_ratio"] == 1.0
    assert len(rows["rna"]["ratios"]) == 2 and all(r > 0 for r in rows["rna"]["ratios"])
    assert rows["none"]["piece_share"] == 0.0 and rows["rna"]["piece_share"] == 0.0  # neither has a piece
    with pytest.raises(ValueError):
        measure_overhead(model, [], ["rna"], progress=False)


def test_a_chunk_with_its_offset_seed_makes_the_same_images_as_the_whole_request(tiny_sd_path):
    from memfree.mitigate import generate
    model = memfree.load(tiny_sd_path)
    model = model.with_settings(num_inference_steps=2)
    prompts = ["a cat", "a dog", "a fox"]
    whole = generate(model, prompts, "none", seed=5, progress=False).images
    tail = generate(model, prompts[1:], "none", seed=6, progress=False).images
    assert torch.allclose(whole[1:], tail, atol=1e-5)


def test_on_a_testbed_with_a_copy_detector_rows_carry_its_verdict(tmp_path):
    """On the latent testbed each row also says what share its copy detector calls a copy, and the table shows it."""
    from memfree_testbed.bundle import load_testbed
    model = memfree.load("testbed-latent").with_settings(num_inference_steps=10)
    res = run_bench(model, tmp_path / "l.json", methods=("none",), sets=("caption_dup",), seeds=(0,), limit=4,
                    progress=False)
    row = res["rows"][0]
    tb = load_testbed(model)
    prompts = [e["prompt"] for e in tb.eval_sets["caption_dup"][:4]]
    images = memfree.mitigate.generate(model, prompts, "none", seed=0, progress=False).images
    cos, _ = tb.copy_index.search(tb.copy_index.embedder(images), 1)
    assert row["memorization_rate_cosine"] == pytest.approx(float((cos[:, 0] > tb.copy_threshold).float().mean()))
    assert row["top1_cosine"] == pytest.approx(float(cos[:, 0].max()), abs=1e-6)
    assert "copies (detector)" in format_table(res["rows"]) and "copies (detector)" not in format_table(
        [{k: v for k, v in row.items() if k != "memorization_rate_cosine"}])
