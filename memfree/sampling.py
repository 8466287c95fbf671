"""One sampling loop with classifier-free guidance and pluggable per-step pieces.

At every step the loop computes ε_u and ε_c in one batched UNet call, forms the guided ε̂ and hands
a :class:`StepState` to each piece in turn. A piece observes the state (detection, logging) or
replaces ``state.eps`` (anti-memorization guidance). Everything is in ε-space; for v-prediction
models the loop converts on the way in and out, so pieces never need to know.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from memfree.denoise import alpha_bar, from_eps, guided_eps, predict_x0
from memfree.model import Model


@dataclass
class StepState:
    """What a piece sees at one denoising step, for one batch of images."""

    step: int                  # 0 for the first (noisiest) step
    t: torch.Tensor            # scheduler timestep
    x_t: torch.Tensor          # the UNet's (scaled) input, (B, C, H, W)
    eps_u: torch.Tensor        # unconditional prediction
    eps_c: torch.Tensor        # conditional prediction
    eps: torch.Tensor          # guided prediction; pieces may replace it
    alpha_bar: torch.Tensor    # ᾱ_t (0-dim)
    cond: torch.Tensor         # prompt embeddings (B, L, D)
    uncond: torch.Tensor       # empty-prompt embeddings (B, L, D)
    guidance_scale: float
    indices: list[int]         # positions of this batch's images in the whole request
    model: Model
    shared: dict = field(default_factory=dict, repr=False)   # what one piece computed that the next may reuse

    @property
    def x0(self) -> torch.Tensor:
        """x̂0 implied by the current guided ε̂."""
        return predict_x0(self.x_t, self.eps, self.alpha_bar)

    @property
    def score(self) -> torch.Tensor:
        """Wen et al.'s per-image detection statistic ‖ε_c − ε_u‖₂ over the whole of x_t."""
        return (self.eps_c - self.eps_u).flatten(1).norm(dim=1)


Piece = Callable[[StepState], None]


class NumericalError(ValueError):
    """The model produced NaN or infinite values: broken weights or an absurd guidance scale."""


def check_prompts(prompts: Sequence[str]) -> None:
    """Refuse control characters (NUL among them): invisible, yet they change the tokens and the image."""
    for i, p in enumerate(prompts):
        bad = [c for c in p if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127]
        if bad:
            raise ValueError(f"prompt {i + 1} holds control character {bad[0]!r}; remove it")


@dataclass
class SampleOutput:
    images: torch.Tensor                      # (N, 3, H, W) in [0, 1]
    x0: torch.Tensor                          # final sample in model space (latents or pixels)
    scores: torch.Tensor                      # (N, steps) ‖ε_c − ε_u‖₂ per image and step
    timesteps: list[int] = field(default_factory=list)
    piece_seconds: float = 0.0                # wall time spent inside the pieces (what guidance costs)


def initial_noise(model: Model, seeds: Sequence[int]) -> torch.Tensor:
    """Unscaled Gaussian x_T, one independent CPU generator per seed so an image depends on its seed only."""
    shape = model.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sample(model: Model, prompts: Sequence[str], seeds: Sequence[int] | int = 0, *,
           num_inference_steps: int | None = None, guidance_scale: float | None = None,
           pieces: Sequence[Piece] = (), latents: torch.Tensor | None = None, batch_size: int = 16,
           prompt_embeds: torch.Tensor | None = None, progress: bool = True,
           step_generator: torch.Generator | None = None, max_steps: int | None = None) -> SampleOutput:
    """Generate one image per prompt with classifier-free guidance.

    ``seeds`` is one seed per prompt (or a base seed: image i gets base + i); ``latents`` overrides
    them with explicit unscaled x_T. ``prompt_embeds`` (N, L, D) replaces the text encoder's output.
    ``max_steps`` stops after that many steps without decoding (detection needs only the first few);
    ``images`` is then empty and ``x0`` holds the x̂0 of the last step taken.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string: sample(model, [prompt])")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    n = len(prompts)
    seeds = [seeds + i for i in range(n)] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    steps = model.settings.num_inference_steps if num_inference_steps is None else num_inference_steps
    if steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    scale = model.settings.guidance_scale if guidance_scale is None else guidance_scale
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale}")
    check_prompts(prompts)
    x_T = initial_noise(model, seeds) if latents is None else latents.float().cpu()
    if x_T.shape != (n, *model.latent_shape):
        raise ValueError(f"latents must have shape {(n, *model.latent_shape)}, got {tuple(x_T.shape)}")

    sched = model.new_scheduler()   # this run's own: concurrent runs never share scheduler state
    images, finals, scores = [], [], []
    piece_seconds = 0.0
    run_steps = steps if max_steps is None else min(steps, max_steps)
    bar = tqdm(total=n * run_steps, desc="sampling", unit="img·step", disable=not progress)
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(n, lo + batch_size)))
        b = len(idx)
        cond = (model.encode([prompts[i] for i in idx]) if prompt_embeds is None
                else prompt_embeds[idx].to(model.device, model.dtype))
        uncond = model.encode([""]).expand(b, -1, -1)
        sched.set_timesteps(steps, device=model.device)
        x = x_T[idx].to(model.device, model.dtype) * sched.init_noise_sigma
        batch_scores = []
        last_x0 = None
        for k, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            a = alpha_bar(sched, t, model.device)
            eps_u, eps_c = guided_eps(model, x_in, t, uncond, cond, a)
            state = StepState(step=k, t=t, x_t=x_in.float(), eps_u=eps_u, eps_c=eps_c,
                              eps=eps_u + scale * (eps_c - eps_u), alpha_bar=a, cond=cond, uncond=uncond,
                              guidance_scale=scale, indices=idx, model=model)
            if not (torch.isfinite(state.eps_u).all() and torch.isfinite(state.eps_c).all()):
                raise NumericalError(f"the model produced NaN or infinite noise predictions at step {k}: "
                                     "its weights are broken or do not belong to it")
            batch_scores.append(state.score)
            if pieces:
                t_piece = time.perf_counter()
                for piece in pieces:
                    piece(state)
                piece_seconds += time.perf_counter() - t_piece
            if max_steps is not None and k + 1 >= max_steps:
                last_x0 = state.x0
                bar.update(b)
                break
            model_out = from_eps(model.prediction_type, state.eps, x_in.float(), a).to(model.dtype)
            x = sched.step(model_out, t, x, generator=step_generator).prev_sample
            bar.update(b)
        if last_x0 is not None:
            finals.append(last_x0.cpu())
        else:
            with torch.no_grad():
                decoded = model.decode(x).cpu()
            if not torch.isfinite(x).all() or not torch.isfinite(decoded).all():
                raise NumericalError("sampling ended in NaN or infinite values: a piece or the model broke it")
            images.append(decoded)
            finals.append(x.float().cpu())
        scores.append(torch.stack(batch_scores, dim=1).cpu())
    bar.close()
    return SampleOutput(images=torch.cat(images) if images else torch.empty(0), x0=torch.cat(finals), scores=torch.cat(scores),
                        timesteps=[int(t) for t in sched.timesteps], piece_seconds=piece_seconds)
