"""The testbed data set holds what the issue plants, and nothing leaks between its parts."""
import csv
from collections import Counter, defaultdict
from importlib import resources

import numpy as np

from memfree.testbed.data import build_dataset, load_dataset


def test_sizes_and_planted_groups(testbed_data):
    _, images, m = testbed_data
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    train = m["train"]
    ordinary = [t for t in train if t["kind"] == "ordinary"]
    assert len(ordinary) >= 2000
    assert len({t["image"] for t in ordinary}) == len(ordinary)  # every ordinary image trained once

    verbatim = defaultdict(list)
    for t in train:
        if t["kind"] == "verbatim":
            verbatim[t["image"]].append(t["caption"])
    assert len(verbatim) >= 20
    assert all(len(c) >= 50 and len(set(c)) == 1 for c in verbatim.values())
    with resources.files("memfree.data").joinpath("nemo_memorized_laion_prompts.csv").open() as f:
        vm = {r["Caption"] for r in csv.DictReader(f, delimiter=";") if r["type"] == "VM"}
    assert all(c[0] in vm for c in verbatim.values())

    image_dup = defaultdict(list)
    for t in train:
        if t["kind"] == "image_dup":
            image_dup[t["image"]].append(t["caption"])
    assert len(image_dup) >= 10 and all(len(set(c)) >= 50 for c in image_dup.values())

    caption_dup = defaultdict(list)
    for t in train:
        if t["kind"] == "caption_dup":
            caption_dup[t["caption"]].append(t["image"])
    assert len(caption_dup) >= 10 and all(len(set(ids)) >= 50 for ids in caption_dup.values())
    for ids in caption_dup.values():  # images of a template group differ in detail
        flat = images[ids].reshape(len(ids), -1)
        assert len({row.tobytes() for row in flat}) == len(ids)


def test_eval_sets_are_what_they_claim(testbed_data):
    _, _, m = testbed_data
    counts = Counter(t["caption"] for t in m["train"])
    ev = m["eval"]
    assert {"verbatim", "paraphrase", "image_dup", "caption_dup", "heldout", "seen_once"} <= set(ev)
    assert all(counts[e["prompt"]] == 0 for e in ev["heldout"])        # novel compositions
    assert all(counts[e["prompt"]] == 1 for e in ev["seen_once"])      # seen exactly once
    assert all(counts[e["prompt"]] == 0 for e in ev["paraphrase"])     # rewrites are not training captions
    assert all(e["prompt"] != e["source_prompt"] for e in ev["paraphrase"])
    assert all(counts[e["prompt"]] >= 50 for e in ev["verbatim"] + ev["caption_dup"])
    held = {tuple(sorted(h.items())) for h in m["heldout_compositions"]}
    trained = {tuple(sorted(u["attrs"].items())) for u in m["unique"] if u["kind"] == "ordinary"}
    assert held and not (held & trained)


def test_deterministic_by_seed(testbed_data, tmp_path):
    _, images, m = testbed_data
    build_dataset(tmp_path / "again", seed=0)
    images2, m2 = load_dataset(tmp_path / "again")
    assert np.array_equal(images, images2) and m == m2
