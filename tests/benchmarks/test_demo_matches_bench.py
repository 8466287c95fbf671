"""The demo's summary figures are the benchmark's: the same prompts and seeds give the same memorization rates
without and with AMG, and the same held-out alignment."""
import pytest

import memfree
from memfree.mitigate import default_index
from memfree_bench.mitigate import evaluate_method
from memfree_testbed import load_testbed
from memfree_testbed.demo import MITIGATION, SECTIONS, run_demo


def test_demo_summary_equals_bench_mitigate_on_the_same_prompts(tmp_path):
    model = memfree.load("testbed").with_settings(num_inference_steps=10)
    sizes = {name: 2 for name, _, _ in SECTIONS}
    res = run_demo(model, tmp_path, progress=False, sizes=sizes)
    tb, index = load_testbed(model), default_index(model)
    for name, n in sizes.items():
        without = evaluate_method(model, tb, "none", name, [0], limit=n)
        with_ = evaluate_method(model, tb, MITIGATION, name, [0], limit=n, index=index)
        got = res["sets"][name]
        assert got["memorized_without"] == without["memorization_rate"]
        assert got["memorized_with"] == with_["memorization_rate"]
        if name == "heldout":
            assert got["alignment_without"] == pytest.approx(without["alignment"], abs=1e-12)
            assert got["alignment_with"] == pytest.approx(with_["alignment"], abs=1e-12)
