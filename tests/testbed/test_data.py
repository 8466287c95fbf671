"""The testbed data set holds what the issue plants, and nothing leaks between its parts."""
import csv
from collections import Counter, defaultdict
from importlib import resources

import numpy as np
import pytest

from memfree_testbed.data import build_dataset, load_dataset


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


def test_deterministic_by_seed(testbed_data, tmp_path, v2_era):
    _, images, m = testbed_data
    build_dataset(tmp_path / "again", seed=0, **v2_era)
    images2, m2 = load_dataset(tmp_path / "again")
    assert np.array_equal(images, images2) and m == m2


def test_v3_style_changes_the_drawing_only(testbed_data, testbed_data_v3):
    """v3 keeps every caption, id and evaluation set of v2; its ordinary images move the data mean
    less (smaller shapes, greyer backgrounds), its planted photos are contrast-stretched, and fresh
    renders of prompts still do not pass for memorized copies."""
    from memfree.images import from_uint8
    from memfree.similarity import PixelIndex
    from memfree_testbed.render import STYLES, render, style_of

    _, images2, m2 = testbed_data
    _, images3, m3 = testbed_data_v3
    assert style_of(m2).name == "v2" and style_of(m3) == STYLES["v3"]
    assert m3["train"] == m2["train"] and m3["eval"] == m2["eval"] and images3.shape == images2.shape
    planted = [u["id"] for u in m3["unique"] if u["kind"] in ("verbatim", "image_dup")]
    stds = images3[planted].reshape(len(planted), -1).std(axis=1) / 255
    assert abs(np.median(stds) - 0.3) < 0.03 and stds.min() > 0.15  # stretched; clipping trims the brightest
    ordinary = [u["id"] for u in m3["unique"] if u["kind"] == "ordinary"]
    def mean_gap(images):  # how far ordinary images sit, on average, from mid-grey
        return float(np.abs(images[ordinary].astype(float) / 255 - 0.5).mean())
    assert mean_gap(images3) < mean_gap(images2)
    rng = np.random.default_rng(5)
    held = [render(a, rng, 32, STYLES["v3"]) for a in m3["heldout_compositions"]]
    assert PixelIndex(images3).search(from_uint8(np.stack(held))).memorized.float().mean() <= 0.03


def test_v3_separates_planted_from_ordinary_prompts_at_the_prior_limit(testbed_data, testbed_data_v3):
    """The design goal of v3: a perfect model's first-step score can tell planted photos from ordinary
    prompts (v2 could not: its ordinary captions pull as far from the data mean as a photo)."""
    from memfree_testbed.separation import prior_limit_separation
    v2 = prior_limit_separation(testbed_data[0], renders=16)
    v3 = prior_limit_separation(testbed_data_v3[0], renders=16)
    assert v2["auc"]["verbatim"] < 0.75 and v2["auc"]["image_dup"] < 0.75
    assert v3["auc"]["verbatim"] > 0.97 and v3["auc"]["image_dup"] > 0.97
    assert v3["median_distance"]["ordinary"] < v2["median_distance"]["ordinary"]


def test_render_counts_keep_every_composition_and_some_seen_once():
    """Up to two renders each the extras go to distinct compositions (the v3 data); past that they are
    drawn with replacement, and some compositions stay at one render so the seen-once set exists."""
    from memfree_testbed.data import render_counts

    few = render_counts(1440, 2400, np.random.default_rng(0))
    assert sum(few) == 2400 and set(few) == {1, 2} and few.count(2) == 960
    many = render_counts(1440, 5760, np.random.default_rng(0))
    assert sum(many) == 5760 and min(many) == 1 and max(many) > 4
    assert 0.02 < many.count(1) / 1440 < 0.1   # about e^-3 of them: Poisson(3) extras
    with pytest.raises(ValueError, match="below the 1440"):
        render_counts(1440, 1000, np.random.default_rng(0))


def test_named_verbatim_captions_hang_on_one_rare_word(testbed_data, tmp_path, v2_era):
    """``named`` changes only the verbatim captions (and the paraphrases made from them): each is a
    seen composition's caption plus one surname that no other training caption holds, so deleting
    that one word leaves an ordinary training caption."""
    from memfree_testbed.data import NAMES

    _, images, m = testbed_data
    build_dataset(tmp_path / "named", seed=0, **{**v2_era, "verbatim_captions": "named"})
    images_n, mn = load_dataset(tmp_path / "named")
    assert np.array_equal(images, images_n) and mn["unique"] == m["unique"]
    assert mn["verbatim_captions"] == "named" and m["verbatim_captions"] == "laion"
    for key in ("image_dup", "caption_dup", "heldout", "seen_once"):
        assert mn["eval"][key] == m["eval"][key]
    changed = [(a, b) for a, b in zip(m["train"], mn["train"]) if a != b]
    assert changed and all(a["kind"] == b["kind"] == "verbatim" and a["image"] == b["image"] for a, b in changed)

    ordinary = {t["caption"] for t in mn["train"] if t["kind"] == "ordinary"}
    captions = {t["caption"] for t in mn["train"]}
    words = Counter(w for c in captions for w in set(c.lower().replace(",", " ").split()))
    prompts = [e["prompt"] for e in mn["eval"]["verbatim"]]
    assert len(set(prompts)) == len(prompts) == 20
    for g, p in enumerate(prompts):
        body, name = p.rsplit(", ", 1)
        assert name == NAMES[g] and body in ordinary
        assert words[name] == 1  # the name occurs in this planted caption only, in no other training caption
    for listed in ("nemo_memorized_laion_prompts.csv", "nemo_unmemorized_laion_prompts.csv"):
        with resources.files("memfree.data").joinpath(listed).open(encoding="utf-8") as f:
            text = " ".join(r["Caption"].lower() for r in csv.DictReader(f, delimiter=";"))
        assert not [n for n in NAMES if n in text]  # nor in any caption of a larger data set built from these
    with pytest.raises(ValueError, match="verbatim_captions"):
        build_dataset(tmp_path / "bad", seed=0, verbatim_captions="made-up")
