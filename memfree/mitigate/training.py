"""Training-time mitigation (Wen et al. §4; docs/spec.md §4): leave high-score samples out of a training loss."""
from __future__ import annotations

import torch


def training_scores(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor, eps_cond: torch.Tensor | None = None) -> torch.Tensor:
    """‖ε(x_t, c) − ε(x_t, ∅)‖₂ per training sample at its own timestep, without gradient;
    ``uncond`` may be a single (1, L, D) embedding. Pass the loss's own prediction as ``eps_cond``
    to reuse it: then only the unconditional half runs (a batch of B instead of 2B)."""
    with torch.no_grad():
        b = len(noisy)
        if eps_cond is not None:
            eps_uncond = unet(noisy, timesteps, uncond.expand(b, -1, -1)).sample.float()
            return (eps_cond.detach().float() - eps_uncond).flatten(1).norm(dim=1)
        out = unet(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                   torch.cat([cond, uncond.expand(b, -1, -1)])).sample.float()
        return (out[:b] - out[b:]).flatten(1).norm(dim=1)


def keep_mask(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
              threshold: float, eps_cond: torch.Tensor | None = None) -> torch.Tensor:
    """Which samples of a batch to keep in the loss.

    For each sample at its own timestep, ‖ε(x_t, c) − ε(x_t, ∅)‖₂ is computed without gradient;
    samples at or above ``threshold`` are dropped. In a diffusers text-to-image fine-tuning loop,
    after ``model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample``::

        keep = keep_mask(unet, noisy_latents, timesteps, encoder_hidden_states, empty_states, tau,
                         eps_cond=model_pred)          # reuses the prediction: one extra no-grad call
        loss = (per_sample_loss * keep).sum() / keep.sum().clamp(min=1)   # skip the step if none kept

    Watch the kept share: a filter that drops every captioned sample also drops what would repair the
    model (a measured collapse is in docs/results.md). Wen et al. apply it when fine-tuning a trained model.
    """
    return training_scores(unet, noisy, timesteps, cond, uncond, eps_cond) < threshold
