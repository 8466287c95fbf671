"""Metrics and baseline detectors of the detection benchmark, on synthetic scores and the tiny SD model."""
import math

import numpy as np
import pytest
import torch

import memfree
from memfree.detect import score_prompts
from memfree_bench.detect import (attention_entropy_scores, carlini_scores, deletion_eval, norm_alignment_scores,
                                  roc_auc, tiled_l2, tpr_at_fpr)


def test_auc_and_tpr():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1], [1]) == 0.5
    neg = np.arange(100.0)
    assert tpr_at_fpr([98.5, 99.5, 50.0], neg) == pytest.approx(2 / 3)   # threshold 98: one negative above


def test_tiled_l2_takes_the_worst_tile():
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[0, :, :2, :2] = 1.0                      # one tile of 2x2 differs by 1 in 3 channels
    assert tiled_l2(a, b).item() == pytest.approx(math.sqrt(12))
    collapsed = torch.zeros(4, 3, 8, 8)        # four identical generations
    spread = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    s = carlini_scores(torch.cat([collapsed, spread]), generations=4)
    assert s[0] == 0.0 and s[1] < s[0]


def test_attention_entropy_and_norm_alignment_on_tiny_sd(tiny_sd_path):
    model = memfree.load(tiny_sd_path)
    prompts = ["a photo of a cat", "a dog"]
    ent = attention_entropy_scores(model, prompts)
    assert ent.shape == (2,) and np.all(-ent > 0) and np.all(-ent <= math.log(77) + 1e-4)
    # restoring the processors leaves sampling unchanged
    from memfree.sampling import sample
    a = sample(model, prompts, [0, 0], num_inference_steps=2, progress=False)
    attention_entropy_scores(model, prompts)
    b = sample(model, prompts, [0, 0], num_inference_steps=2, progress=False)
    assert torch.equal(a.images, b.images)
    na = norm_alignment_scores(model, prompts)
    assert na.shape == (2,) and np.all(na >= 0)


def test_deletion_compares_the_top_word_with_a_different_word(tiny_sd_path):
    """The random word is never the top word (that comparison would be a tie), and the rates count
    what the rows say."""
    model = memfree.load(tiny_sd_path)
    prompts = ["a photo of a cat", "red car", "a dog on the grass at noon", "two birds in a tree"]
    res = deletion_eval(model, prompts, threshold=1e9)
    assert res["prompts"] == 3                                   # "red car" is too short to lose two words
    for r in res["rows"]:
        assert r["random_word"] != r["top_words"][0] or r["prompt"].split().count(r["random_word"]) > 1
    assert res["deletion_top1_win_rate"] == sum(r["without_top1"] < r["without_random"] for r in res["rows"]) / 3
    assert res["deletion_top2_flip_rate"] == 1.0                 # everything is under an infinite threshold
    # deletions are scored on noise the explainer never saw: four draws from seed 1000
    r = res["rows"][0]
    held = score_prompts(model, [r["prompt"]], generations=4, seed=1000, progress=False).mean()
    assert r["score"] == pytest.approx(held, rel=1e-5)
    assert r["score"] != pytest.approx(score_prompts(model, [r["prompt"]], progress=False).mean(), rel=1e-3)
