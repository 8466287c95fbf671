"""Detector metrics on score arrays (higher score: more likely memorized), as the detection papers report them."""
from __future__ import annotations

import numpy as np

from memfree.detect import threshold_at_fpr


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> float:
    """TPR at the largest-recall threshold whose FPR on the negatives stays at or below ``fpr``."""
    return float((np.asarray(pos) > threshold_at_fpr(neg, fpr)).mean())


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve's (FPR, TPR) points, from (0, 0) to (1, 1)."""
    thr = np.unique(np.concatenate([pos, neg]))[::-1]
    fpr = np.array([0.0] + [(neg >= t).mean() for t in thr] + [1.0])
    tpr = np.array([0.0] + [(pos >= t).mean() for t in thr] + [1.0])
    return fpr, tpr
