"""Wen et al.'s inference-time mitigation (ICLR 2024; docs/spec.md §3): before sampling, optimise the conditional
prompt embedding at x_T and the first timestep until the detection score ‖ε_c − ε_u‖₂ falls under a target,
then sample from the same x_T.

Selective: an image whose first-step score is under the calibrated threshold (the detector passes it) keeps its
embedding and comes out bit-identical to ``none``, whatever the target. The target defaults to 0.8 × the
threshold rather than the threshold itself (the reference setting, ``target_scale=1.0``): docs/methods.md has
the measured trade-off between copies removed and alignment lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from memfree.detect import first_step_scores, first_step_uncond_eps
from memfree.mitigate.base import Mitigation, Request
from memfree.model import Model
from memfree.sampling import initial_noise


def optimise_embeddings(model: Model, embeds: torch.Tensor, x_T: torch.Tensor, target: float,
                        lr: float = 0.05, max_iters: int = 10, leash: float | None = None,
                        extra_noise: torch.Tensor | None = None,
                        uncond_eps: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], list[float]]:
    """Wen et al.'s inference-time mitigation for a batch: AdamW on every position but the start token.

    Each image stops on its own as soon as its score is under ``target``. ``leash`` (α in the paper's
    optional form α·L + (1−α)·mean‖e − e⁰‖) keeps the embedding near the original when given.
    ``extra_noise`` (B, n−1, C, H, W) adds starting noises that image's embedding must also pass: its
    score is then the root mean square over the n noises, as in the reference code's batch of n
    images that share one embedding. ``uncond_eps`` is ε_u at ``x_T`` when the caller already has it
    (``first_step_scores`` returns it); it is not used with ``extra_noise``, whose noises need their
    own. Returns the new embeddings, iterations taken and the last score.
    """
    for p in model.unet.parameters():
        p.requires_grad_(False)
    original = embeds.detach().float()
    tail = original[:, 1:].clone().requires_grad_(True)
    opt = torch.optim.AdamW([tail], lr=lr)
    active = torch.ones(len(embeds), dtype=torch.bool)
    iters = [0] * len(embeds)
    last = torch.zeros(len(embeds))
    n = 1
    if extra_noise is not None:
        n = 1 + extra_noise.shape[1]
        x_T = torch.cat([x_T[:, None], extra_noise], dim=1).flatten(0, 1)
        uncond_eps = None
    eps_u = uncond_eps if uncond_eps is not None else first_step_uncond_eps(model, x_T)
    for it in range(max_iters + 1):
        full = torch.cat([original[:, :1], tail], dim=1)
        per_noise, _ = first_step_scores(model, full.repeat_interleave(n, dim=0), x_T, grad=True, uncond_eps=eps_u)
        score = per_noise.view(len(embeds), n).pow(2).mean(dim=1).sqrt()
        last = torch.where(active, score.detach().cpu(), last)
        active &= score.detach().cpu() >= target
        if not active.any() or it == max_iters:
            break
        loss_each = score
        if leash is not None:
            loss_each = leash * score + (1 - leash) * (tail - original[:, 1:]).norm(dim=-1).mean(dim=1)
        opt.zero_grad(set_to_none=True)
        (loss_each * active.to(loss_each.device)).sum().backward()
        frozen = tail.detach().clone()
        opt.step()
        with torch.no_grad():  # images that reached the target keep the embedding they reached it with
            tail[~active] = frozen[~active]
        for i in torch.nonzero(active).flatten().tolist():
            iters[i] += 1
    result = torch.cat([original[:, :1], tail.detach()], dim=1)
    return result, iters, last.tolist()


def _derived_seed(seed: int, k: int) -> int:
    """A seed for the k-th extra noise of the image with ``seed``: a hash of both, so extra noises do not
    repeat the neighbouring images' x_T (seed + 1, seed + 2, ...)."""
    return int(np.random.SeedSequence([seed, 104729, k]).generate_state(1, np.uint64)[0] >> 1)



@dataclass
class Wen(Mitigation):
    """Prompt-embedding optimisation. ``target`` is an absolute score; without it the target is ``target_scale``
    × the model's calibrated threshold. Only images at or over both the threshold and the target are changed;
    with ``noises`` > 1 each embedding must pass that many starting noises (its own x_T and ones drawn from
    its seed)."""

    name: ClassVar[str] = "wen"
    needs_score_before: ClassVar[bool] = True
    target: float | None = None
    target_scale: float = 0.8
    lr: float = 0.05
    max_iters: int = 10
    leash: float | None = None
    noises: int = 1

    def __post_init__(self) -> None:
        if self.noises < 1:
            raise ValueError(f"noises must be at least 1, got {self.noises}")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be at least 0, got {self.max_iters}")
        for key in ("target", "target_scale", "lr"):
            value = getattr(self, key)
            if value is not None and not np.isfinite(value):
                raise ValueError(f"wen's {key} must be a finite number, got {value}")

    def prepare(self, request: Request) -> None:
        model, threshold = request.model, request.model.settings.threshold
        target = self.target
        if target is None:
            if threshold is None:
                raise ValueError("wen needs a target: calibrate the model (memfree calibrate) or pass target=")
            target = self.target_scale * threshold
        # Flag by the detector's verdict, optimise down to the target.
        gate = target if threshold is None else max(target, threshold)
        before, size = request.score_before, request.batch_size
        flagged = [i for i in range(len(request.prompts)) if before[i] >= gate]
        for lo in range(0, len(flagged), size):
            ids = flagged[lo:lo + size]
            extra_noise = None
            if self.noises > 1:
                extra_noise = torch.stack([initial_noise(model, [_derived_seed(request.seeds[i], k)
                                                                for k in range(1, self.noises)]) for i in ids])
            new, it, last = optimise_embeddings(model, request.embeds[ids], request.x_T[ids], target, self.lr,
                                                self.max_iters, self.leash, extra_noise,
                                                uncond_eps=request.uncond_eps[ids])
            request.embeds[ids] = new
            for j, i in enumerate(ids):
                request.applied[i], request.iterations[i], request.final_loss[i] = True, it[j], last[j]
