"""The denoising arithmetic every part of memfree shares: ε/v conversion, ᾱ_t, x̂0, and one guided UNet pass.

Everything memfree computes lives in ε-space; a v-prediction model's output is converted on the way in and
back on the way out, so detection, explanation and guidance never need to know which kind a model is.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler

REFERENCE_STEPS = 50


def to_eps(prediction_type: str, out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The UNet's raw output as an ε prediction (ε as is; v converted with x_t and ᾱ_t)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x
    raise ValueError(f"prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")


def from_eps(prediction_type: str, eps: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """An ε prediction back in the model's own output kind, for the scheduler's step."""
    if prediction_type == "epsilon":
        return eps
    return (eps - (1 - alpha_bar).sqrt() * x) / alpha_bar.sqrt()


def alpha_bar(scheduler, t: torch.Tensor | int, device: torch.device | str = "cpu") -> torch.Tensor:
    """ᾱ_t of a scheduler's trained noise schedule, as a 0-dim float32 tensor."""
    return scheduler.alphas_cumprod.to(device, torch.float32)[int(t)]


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t: the clean sample an ε prediction implies."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def branch_eps(model, x_in: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε(x_t, e) for one batch of text embeddings: one UNet branch, float32, gradients as the caller allows."""
    out = model.unet(x_in.to(model.dtype), t, embeds.to(model.dtype)).sample.float()
    return to_eps(model.prediction_type, out, x_in.float(), alpha_bar)


def guided_eps(model, x_in: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor,
               alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ε_u and ε_c from one batched UNet call, as classifier-free guidance computes them."""
    with torch.no_grad():
        out = model.unet(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond])).sample
    out_u, out_c = out.float().chunk(2)
    kind = model.prediction_type
    return to_eps(kind, out_u, x_in.float(), alpha_bar), to_eps(kind, out_c, x_in.float(), alpha_bar)


def detection_timestep(model) -> int:
    """The timestep at which the detection score is taken, whatever schedule the user samples with: the one
    the model's threshold was calibrated at, else the first step of 50-step DDIM (Wen et al.'s setting)."""
    det = model.settings.detection or {}
    if det.get("timestep") is not None:
        return int(det["timestep"])
    reference = DDIMScheduler.from_config(model.scheduler.config)
    reference.set_timesteps(REFERENCE_STEPS)
    return int(reference.timesteps[0])


def detection_input(model, x_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet input for the detection score: unscaled x_T at :func:`detection_timestep`, and ᾱ there."""
    t = detection_timestep(model)
    return x_T.to(model.device, model.dtype), torch.tensor(t, device=model.device), alpha_bar(model.scheduler, t, model.device)


def schedule_gives_detection_score(model) -> bool:
    """Whether the sampling loop's first step is the detection input (then its score comes free); otherwise the
    detection score costs one extra UNet pass."""
    sched = model.new_scheduler()
    sched.set_timesteps(model.settings.num_inference_steps)
    t0, one = sched.timesteps[0], torch.ones(1)
    return int(t0) == detection_timestep(model) and torch.equal(sched.scale_model_input(one * sched.init_noise_sigma, t0), one)
