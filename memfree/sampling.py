"""One sampling loop with classifier-free guidance and pluggable per-step pieces.

At every step the loop computes ε_u and ε_c in one batched UNet call, forms the guided ε̂ and hands
a :class:`StepState` to each piece in turn. A piece observes the state (detection, logging) or
replaces ``state.eps`` (anti-memorization guidance). Everything is in ε-space; for v-prediction
models the loop converts on the way in and out, so pieces never need to know.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

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

    @property
    def x0(self) -> torch.Tensor:
        """x̂0 implied by the current guided ε̂."""
        return (self.x_t - (1 - self.alpha_bar).sqrt() * self.eps) / self.alpha_bar.sqrt()

    @property
    def score(self) -> torch.Tensor:
        """Wen et al.'s per-image detection statistic ‖ε_c − ε_u‖₂ over the whole of x_t."""
        return (self.eps_c - self.eps_u).flatten(1).norm(dim=1)


Piece = Callable[[StepState], None]


@dataclass
class SampleOutput:
    images: torch.Tensor                      # (N, 3, H, W) in [0, 1]
    x0: torch.Tensor                          # final sample in model space (latents or pixels)
    scores: torch.Tensor                      # (N, steps) ‖ε_c − ε_u‖₂ per image and step
    timesteps: list[int] = field(default_factory=list)
    piece_seconds: float = 0.0                # wall time spent inside the pieces (what guidance costs)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, 3, H, W) or (3, H, W), to uint8 arrays in (…, H, W, 3) order for PIL."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def from_uint8_signed(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to float (N, 3, H, W) in [-1, 1], the range a pixel-space UNet sees."""
    return from_uint8(images).mul(2).sub(1)


def initial_noise(model: Model, seeds: Sequence[int]) -> torch.Tensor:
    """Unscaled Gaussian x_T, one independent CPU generator per seed so an image depends on its seed only."""
    shape = model.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _to_eps(model: Model, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    kind = model.scheduler.config.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x
    raise ValueError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")


def _from_eps(model: Model, eps: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if model.scheduler.config.prediction_type == "epsilon":
        return eps
    return (eps - (1 - a).sqrt() * x) / a.sqrt()


def _alpha_bar(model: Model, t: torch.Tensor) -> torch.Tensor:
    return model.scheduler.alphas_cumprod.to(model.device, torch.float32)[int(t)]


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
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    n = len(prompts)
    seeds = [seeds + i for i in range(n)] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    steps = num_inference_steps or model.num_inference_steps
    scale = model.guidance_scale if guidance_scale is None else guidance_scale
    x_T = initial_noise(model, seeds) if latents is None else latents.float().cpu()
    if x_T.shape != (n, *model.latent_shape):
        raise ValueError(f"latents must have shape {(n, *model.latent_shape)}, got {tuple(x_T.shape)}")

    sched = model.scheduler
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
            with torch.no_grad():
                out = model.unet(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond])).sample
            a = _alpha_bar(model, t)
            out_u, out_c = out.float().chunk(2)
            eps_u = _to_eps(model, out_u, x_in.float(), a)
            eps_c = _to_eps(model, out_c, x_in.float(), a)
            state = StepState(step=k, t=t, x_t=x_in.float(), eps_u=eps_u, eps_c=eps_c,
                              eps=eps_u + scale * (eps_c - eps_u), alpha_bar=a, cond=cond, uncond=uncond,
                              guidance_scale=scale, indices=idx, model=model)
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
            model_out = _from_eps(model, state.eps, x_in.float(), a).to(model.dtype)
            x = sched.step(model_out, t, x, generator=step_generator).prev_sample
            bar.update(b)
        if last_x0 is not None:
            finals.append(last_x0.cpu())
        else:
            with torch.no_grad():
                images.append(model.decode(x).cpu())
            finals.append(x.float().cpu())
        scores.append(torch.stack(batch_scores, dim=1).cpu())
    bar.close()
    return SampleOutput(images=torch.cat(images) if images else torch.empty(0), x0=torch.cat(finals), scores=torch.cat(scores),
                        timesteps=[int(t) for t in sched.timesteps], piece_seconds=piece_seconds)
