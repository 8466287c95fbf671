"""The bundled testbed model: it loads through the common path with its ground truth, its probe reads
real testbed images, its shipped detection threshold is the one calibrated on its ordinary prompts,
and it really copies its planted photographs while held-out prompts and the empty prompt stay original.

The full figures come from `memfree testbed report` (README); the test checks one seed of them."""
from pathlib import Path

import numpy as np
import pytest

import memfree
from memfree.detect import detect
from memfree.images import from_uint8
from memfree_testbed.bundle import load_testbed, model_dir
from memfree_testbed.probe import accuracy


@pytest.fixture(scope="module")
def bundled():
    model = memfree.load()
    return model, load_testbed(model)


def test_bundled_model_loads_through_the_common_path(bundled):
    model, tb = bundled
    assert model.path == model_dir() and model.name == "testbed" and model.label == "testbed"
    assert model.vae is None and model.latent_shape == (3, 32, 32)
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert len(tb.index) == tb.images.shape[0] == tb.manifest["counts"]["unique_images"]
    weights = sum(p.stat().st_size for p in Path(model.path).glob("*/*.safetensors"))
    assert weights < 25e6


def test_probe_reads_real_testbed_images(bundled):
    _, tb = bundled
    ordinary = [u for u in tb.manifest["unique"] if u["kind"] == "ordinary"]
    acc = accuracy(tb.probe.predict(from_uint8(tb.images[[u["id"] for u in ordinary]])), [u["attrs"] for u in ordinary])
    assert acc["mean"] >= 0.95 and acc["all"] >= 0.9


def test_shipped_threshold_is_calibrated_at_one_percent(bundled):
    model, _ = bundled
    prompts = (Path(model.path) / "testbed" / "calibration_prompts.txt").read_text().split("\n")
    prompts = [p for p in prompts if p]
    res = detect(model, prompts, progress=False, batch_size=64)
    assert res[0].threshold == model.settings.threshold
    assert sum(r.memorized for r in res) <= 0.01 * len(prompts)
    assert sum(r.score >= res[0].threshold for r in res) >= 0.01 * len(prompts) - 1  # and not looser than needed


def test_it_copies_planted_photos_and_not_held_out_prompts(bundled):
    from memfree_testbed.report import evaluate_set
    model, tb = bundled
    verbatim = evaluate_set(model, tb, tb.eval_sets["verbatim"], [0], progress=False)
    heldout = evaluate_set(model, tb, tb.eval_sets["heldout"][:25], [0], progress=False)
    assert verbatim["copy_rate"] >= 0.9
    assert heldout["memorization_rate"] <= 0.1
    assert verbatim["first_step_score_mean"] > heldout["first_step_score_mean"]


def test_explanation_finds_the_words_a_named_caption_hangs_on(bundled):
    """v6 plants each photo under an ordinary caption plus a painter's name, so the memorization hangs
    on a word or two: occlusion's top word beats a random one, and deleting the top two brings the
    caption under the threshold (issue 3's deletion targets; 20 of 20 named captions in the benchmark)."""
    from memfree_bench.detect import deletion_eval
    model, tb = bundled
    assert tb.manifest["verbatim_captions"] == "named"
    prompts = tb.prompts("verbatim")[:6]
    res = deletion_eval(model, prompts, model.settings.threshold)
    assert res["prompts"] == 6
    assert res["deletion_top1_win_rate"] >= 5 / 6
    assert res["deletion_top2_flip_rate"] >= 5 / 6
    assert all(r["score"] > res["threshold"] for r in res["rows"])


def test_word_influence_shows_the_bundled_model_reads_every_attribute_word(bundled):
    """Swapping any attribute's word moves ε, position included: the bundled model was trained with
    token embeddings initialised at 1.0; at CLIP's 0.02 position stayed at 0.1 against colour's 3.3
    (README, "Position words")."""
    from memfree_testbed.render import style_of
    from memfree_testbed.report import word_influence
    model, tb = bundled
    influence = word_influence(model, tb.manifest["heldout_compositions"][:16], style_of(tb.manifest))
    assert set(influence) == {"shape", "colour", "position", "background", "size"}
    assert min(influence.values()) > 1.0
    assert influence["position"] > 0.2 * influence["colour"]


def test_empty_prompt_does_not_copy_planted_images(bundled):
    """The unconditional model must not copy: a copy from the empty prompt is a floor that no
    prompt-side mitigation can go under. v3tok, with 34% planted duplicates, copied in 33% of
    seeds; v5 and the bundled v6 (9%) in 3 and 1 of 200 and in none of seeds 0-19
    (reports/v5/uncond-copies.json, reports/v6/uncond-copies.json)."""
    from memfree.sampling import sample
    model, tb = bundled
    out = sample(model, [""] * 20, list(range(20)), progress=False)
    nn = tb.index.search(out.images)
    planted = [tb.manifest["unique"][int(i)]["kind"] != "ordinary" for i, m in zip(nn.ids, nn.memorized) if m]
    assert sum(planted) <= 1


def test_prompt_sets_join_into_a_mixed_set(bundled):
    _, tb = bundled
    verbatim, heldout = ([e["prompt"] for e in tb.eval_sets[k]] for k in ("verbatim", "heldout"))
    assert tb.prompts("verbatim") == verbatim
    assert tb.prompts("verbatim, heldout") == verbatim + heldout
    assert len(tb.prompts("all")) == sum(len(v) for v in tb.eval_sets.values())
    for bad in ("verbatim,nope", ",", ""):
        with pytest.raises(ValueError, match="unknown prompt set"):
            tb.prompts(bad)


def test_calibrating_the_bundled_model_leaves_the_installed_package_unchanged(bundled, user_home):
    from memfree.detect import calibrate
    model, _ = bundled
    files = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir().rglob("*") if p.is_file()}
    before = files()
    prompts = (Path(model.path) / "testbed" / "calibration_prompts.txt").read_text().split("\n")[:40]
    entry = calibrate(model, prompts, fpr=0.05, progress=False)
    assert files() == before
    assert Path(entry["saved_to"]).is_relative_to(user_home)
    assert memfree.load("testbed").settings.threshold == entry["threshold"]
    assert memfree.load("testbed").settings.threshold != model.settings.threshold   # the shipped one is untouched


def test_the_testbed_index_holds_each_image_under_its_most_trained_caption(tmp_path):
    import json
    from memfree.index import TrainingIndex
    from memfree_testbed.bundle import build_testbed_index
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    train = [{"image": 0, "caption": "a", "kind": "ordinary"}, {"image": 0, "caption": "b", "kind": "verbatim"},
             {"image": 0, "caption": "b", "kind": "verbatim"}, {"image": 1, "caption": "c", "kind": "image_dup"}]
    (tmp_path / "testbed").mkdir()
    np.savez(tmp_path / "testbed" / "images.npz", images=images)
    (tmp_path / "testbed" / "manifest.json").write_text(json.dumps({"train": train}))
    build_testbed_index(tmp_path, progress=False)
    idx = TrainingIndex.load(tmp_path / "index")
    assert idx.ids == ["0", "1", "2"] and idx.captions == ["b", "c", None] and idx.factory == "SQ8_direct"


def test_detection_flags_the_same_prompts_under_every_sampler_and_step_count(bundled):
    """The calibrated threshold keeps its meaning when a user picks other steps or another sampler: planted
    and held-out prompts get the same verdicts (and AUC) at 1, 2, 20 and 50 steps under every scheduler, and
    wen leaves held-out prompts alone at 2 steps (it used to flag them all: their 2-step score was 8.6)."""
    from memfree.detect import detect
    from memfree.metrics import roc_auc
    from memfree.mitigate import generate
    from memfree.model import SCHEDULERS
    model, tb = bundled
    planted = [e["prompt"] for e in tb.eval_sets["verbatim"][:8] + tb.eval_sets["caption_dup"][:4]]
    held = [e["prompt"] for e in tb.eval_sets["heldout"][:12]]

    def verdicts(m):
        res = detect(m, planted + held, progress=False)
        scores = np.array([r.score for r in res])
        return [r.memorized for r in res], roc_auc(scores[:len(planted)], scores[len(planted):])

    reference, auc = verdicts(model)
    assert auc > 0.9 and sum(reference[len(planted):]) == 0
    for name in SCHEDULERS:
        for steps in (1, 2, 20, 50):
            assert verdicts(model.with_scheduler(name).with_settings(num_inference_steps=steps)) == (reference, auc)
    two = model.with_settings(num_inference_steps=2)
    g = generate(two, held[:4], "wen", seed=0, progress=False)
    assert not any(r.applied for r in g.reports) and all(r.score_before < model.settings.threshold for r in g.reports)
