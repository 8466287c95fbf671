"""Detection of memorized prompts (Wen et al., ICLR 2024): the magnitude of the text-conditional part
of the noise prediction, ‖ε_c − ε_u‖₂ per image, averaged over chosen steps and generations.

The cheap form (first step, one generation) costs one CFG UNet call per prompt, which generation
computes anyway. A threshold calibrated on ordinary prompts at a chosen false-positive rate is stored
with the model (:mod:`memfree.settings`) so ``memorized`` has a meaning out of the box.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from memfree.denoise import branch_eps, detection_input, detection_timestep, guided_eps
from memfree.model import Model
from memfree.prompts import warn_truncated
from memfree.sampling import NumericalError, check_prompts, initial_noise, sample
from memfree.settings import save_settings_entry


@dataclass
class Detection:
    prompt: str
    score: float                 # mean per-image ‖ε_c − ε_u‖₂ over the chosen steps and generations
    per_step: list[float]        # mean over generations, one value per step used
    threshold: float | None      # the model's calibrated threshold (None when uncalibrated)
    memorized: bool | None       # score > threshold
    truncated: bool = False      # the prompt was longer than the tokenizer allows

    def to_dict(self) -> dict:
        return asdict(self)


def first_step_uncond_eps(model: Model, x_T: torch.Tensor) -> torch.Tensor:
    """ε_u at the detection input: the half of the detection score that no embedding changes."""
    x, t, a = detection_input(model, x_T)
    with torch.no_grad():
        return branch_eps(model, x, t, model.encode([""]).expand(len(x), -1, -1), a)


def first_step_scores(model: Model, embeds: torch.Tensor, x_T: torch.Tensor, grad: bool = False,
                      uncond_eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image detection score ‖ε_c − ε_u‖₂ at x_T and the detection timestep, for given conditional
    embeddings (differentiable with ``grad``); also returns ε_u for reuse."""
    if uncond_eps is None:
        uncond_eps = first_step_uncond_eps(model, x_T)
    x, t, a = detection_input(model, x_T)
    with torch.set_grad_enabled(grad):
        eps_c = branch_eps(model, x, t, embeds, a)
    return (eps_c - uncond_eps).flatten(1).norm(dim=1), uncond_eps


def detection_scores(model: Model, prompts: Sequence[str], generations: int = 1, seed: int = 0,
                     batch_size: int = 32) -> np.ndarray:
    """The first-step detection score of each prompt and generation, (prompts, generations), at the detection
    input: the same numbers whatever sampler and step count the model is set to."""
    expanded = [p for p in prompts for _ in range(generations)]
    check_prompts(expanded)
    seeds = [seed + g for _ in prompts for g in range(generations)]
    out = []
    for lo in range(0, len(expanded), batch_size):
        x, t, a = detection_input(model, initial_noise(model, seeds[lo:lo + batch_size]))
        cond = model.encode(expanded[lo:lo + batch_size])
        eps_u, eps_c = guided_eps(model, x, t, model.encode([""]).expand(len(x), -1, -1), cond, a)
        out.append((eps_c - eps_u).flatten(1).norm(dim=1).cpu())
    scores = torch.cat(out)
    if not torch.isfinite(scores).all():
        raise NumericalError("the model produced NaN or infinite detection scores: its weights are broken")
    return scores.numpy().reshape(len(prompts), generations)


def score_prompts(model: Model, prompts: Sequence[str], steps: int = 1, generations: int = 1, seed: int = 0,
                  batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Per-image, per-step scores, shape (prompts, generations, steps). One step is the detection score
    (:func:`detection_scores`, whatever the sampler); more steps follow the model's own CFG trajectory.

    Generation g of every prompt starts from seed + g, so scores are reproducible and comparable.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if any(not p.strip() for p in prompts):
        raise ValueError("empty prompt given")
    if steps < 1 or generations < 1:
        raise ValueError("steps and generations must be at least 1")
    total = model.settings.num_inference_steps
    if steps > total:
        raise ValueError(f"steps={steps} exceeds the sampler's {total} steps")
    return trajectory_scores(model, prompts, steps, generations, seed, batch_size, progress)


def trajectory_scores(model: Model, prompts: Sequence[str], steps: int = 1, generations: int = 1, seed: int = 0,
                      batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """:func:`score_prompts` without its checks on the input, for callers that build prompts
    themselves (an explainer's deletions may leave the empty prompt, whose score is 0)."""
    prompts = list(prompts)
    if steps == 1:
        return detection_scores(model, prompts, generations, seed, batch_size)[:, :, None]
    expanded = [p for p in prompts for _ in range(generations)]
    seeds = [seed + g for _ in prompts for g in range(generations)]
    out = sample(model, expanded, seeds, batch_size=batch_size,
                 progress=progress, max_steps=steps)
    return out.scores.numpy().reshape(len(prompts), generations, -1)


def detect(model: Model, prompts: Sequence[str], steps: int = 1, generations: int = 1, seed: int = 0,
           batch_size: int = 32, progress: bool = True) -> list[Detection]:
    """Score prompts for memorization; ``memorized`` uses the model's calibrated threshold."""
    prompts = list(prompts)
    truncated = warn_truncated(model, prompts) if prompts else []
    scores = score_prompts(model, prompts, steps, generations, seed, batch_size, progress)
    thr = model.settings.threshold
    return [Detection(prompt=p, score=float(s.mean()), per_step=[float(v) for v in s.mean(0)], threshold=thr,
                      memorized=None if thr is None else bool(s.mean() > thr), truncated=tr)
            for p, s, tr in zip(prompts, scores, truncated)]


def threshold_at_fpr(negative_scores: Sequence[float], fpr: float) -> float:
    """The smallest threshold whose false-positive rate (score > threshold) on negatives is at most ``fpr``,
    raised by 0.01% of itself: the negative it rests on must stay under it on another CPU, whose float32
    sums differ from the calibrating one's in the sixth digit."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    if not len(s):
        raise ValueError("no negative scores to calibrate on")
    allowed = int(np.floor(fpr * len(s) + 1e-9))  # that many negatives may lie above the threshold
    edge = float(s[allowed]) if allowed < len(s) else float(s[-1])
    return edge + 1e-4 * max(abs(edge), 1e-6)


def min_negatives(fpr: float) -> int:
    """The fewest ordinary prompts a threshold at ``fpr`` can rest on: 20, and enough that at least one
    prompt may lie over it (100 for fpr 0, where the threshold is simply the largest score seen)."""
    return max(20, math.ceil(1 / fpr - 1e-9) if fpr > 0 else 100)


def calibrate(model: Model, prompts: Sequence[str], fpr: float = 0.01, steps: int = 1, generations: int = 1,
              seed: int = 0, progress: bool = True, save: bool = True, min_prompts: int | None = None) -> dict:
    """A detection threshold from ordinary (non-memorized) prompts at false-positive rate ``fpr``.

    With ``save`` it is stored with the model (:func:`memfree.settings.save_settings_entry` says where; the
    returned entry's ``saved_to`` names the file); ``model`` itself is not changed: use
    ``model.with_settings(detection=entry)`` or load the model again.
    """
    if not 0 <= fpr < 1:
        raise ValueError("fpr must be in [0, 1)")
    needed = min_negatives(fpr) if min_prompts is None else min_prompts
    if len(prompts) < needed:
        raise ValueError(f"calibrating at fpr {fpr} needs at least {needed} ordinary prompts, got {len(prompts)}")
    t0 = time.perf_counter()
    scores = score_prompts(model, prompts, steps, generations, seed, progress=progress).mean(axis=(1, 2))
    entry = {"threshold": threshold_at_fpr(scores, fpr), "fpr": fpr, "steps": steps, "generations": generations,
             "timestep": detection_timestep(model) if steps == 1 else None,
             "calibration_prompts": len(scores), "negative_score_mean": float(scores.mean()),
             "negative_score_max": float(scores.max()), "seconds": round(time.perf_counter() - t0, 2)}
    if save and model.path is not None:
        path = save_settings_entry(Path(model.path), "detection", entry, opened_by_name=model.name is not None)
        return {**entry, "saved_to": str(path), "replaced": model.settings.threshold}
    return entry
