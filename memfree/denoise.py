"""The denoising arithmetic every part of memfree shares: ε/v conversion, ᾱ_t, x̂0, and one guided UNet pass.

Everything memfree computes lives in ε-space; a v-prediction model's output is converted on the way in and
back on the way out, so detection, explanation and guidance never need to know which kind a model is.
"""
from __future__ import annotations

import torch


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


def first_step_input(model, x_T: torch.Tensor, num_inference_steps: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet input at x_T for the sampler's first timestep, that timestep, and ᾱ there.

    Uses a scheduler of its own, so it never changes the state of one another caller is sampling with.
    """
    sched = model.new_scheduler()
    sched.set_timesteps(num_inference_steps or model.settings.num_inference_steps, device=model.device)
    t = sched.timesteps[0]
    x = sched.scale_model_input(x_T.to(model.device, model.dtype) * sched.init_noise_sigma, t)
    return x, t, alpha_bar(sched, t, model.device)
