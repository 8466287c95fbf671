"""Mitigation at inference and at training time.

* ``wen`` (Wen et al., ICLR 2024): before sampling, optimise the conditional prompt embedding at x_T
  and the first timestep until the detection score ‖ε_c − ε_u‖₂ falls under a target, then sample
  from the same x_T. Selective: an image whose first-step score is under the detection threshold
  (the detector passes it) keeps its embedding and comes out bit-identical to ``none``, whatever the
  target; a target under the threshold only pushes flagged prompts further down.
* Somepalli et al. (NeurIPS 2023) baselines, applied to every prompt: random token addition
  (``rta``), random number addition (``rna``), Gaussian noise on the text embedding (``gni``) and
  caption word repetition (``cwr``).
* ``amg``, ``amg-strong`` and their ablations: Anti-Memorization Guidance (:mod:`memfree.guidance`),
  which needs a training-set index (:mod:`memfree.index`); the bundled testbed ships one.
* :func:`keep_mask` filters high-score samples out of a training loss (training-time mitigation).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from memfree.guidance import AMG, AMG_METHODS, config_for
from memfree.model import Model, ModelError
from memfree.sampling import _alpha_bar, _to_eps, initial_noise, sample

METHODS = ("none", "wen", "rta", "rna", "gni", "cwr") + AMG_METHODS


@dataclass
class MitigationReport:
    """What happened to one image."""

    prompt: str
    seed: int
    method: str
    applied: bool                 # the mitigation changed this image's prompt or embedding
    score_before: float           # first-step ‖ε_c − ε_u‖₂ with the original prompt
    score_after: float            # first-step score of the generation actually sampled
    used_prompt: str | None = None
    iterations: int = 0           # wen: optimiser steps taken
    final_loss: float | None = None
    nearest_id: int | None = None  # nearest training image, when an index is given
    nearest_distance: float | None = None
    nl2: float | None = None
    memorized: bool | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    images: torch.Tensor              # (N, 3, H, W) in [0, 1]
    reports: list[MitigationReport]
    seconds: float
    piece_seconds: float = 0.0        # of which inside the sampling loop's pieces (AMG's checks and terms)


def _first_step_input(model: Model, x_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet input at x_T, the sampler's first timestep and ᾱ there."""
    sched = model.scheduler
    sched.set_timesteps(model.num_inference_steps, device=model.device)
    t = sched.timesteps[0]
    x = sched.scale_model_input(x_T.to(model.device, model.dtype) * sched.init_noise_sigma, t)
    return x, t, _alpha_bar(model, t)


def _uncond_eps_at(model: Model, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        uncond = model.encode([""]).expand(len(x), -1, -1)
        return _to_eps(model, model.unet(x, t, uncond).sample.float(), x.float(), a)


def first_step_uncond_eps(model: Model, x_T: torch.Tensor) -> torch.Tensor:
    """ε_u at x_T and the first timestep: the half of the first-step score that no embedding changes."""
    return _uncond_eps_at(model, *_first_step_input(model, x_T))


def first_step_scores(model: Model, embeds: torch.Tensor, x_T: torch.Tensor, grad: bool = False,
                      uncond_eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ‖ε_c − ε_u‖₂ at x_T and the sampler's first timestep; also returns ε_u for reuse."""
    x, t, a = _first_step_input(model, x_T)
    if uncond_eps is None:
        uncond_eps = _uncond_eps_at(model, x, t, a)
    with torch.set_grad_enabled(grad):
        eps_c = _to_eps(model, model.unet(x, t, embeds.to(model.dtype)).sample.float(), x.float(), a)
    return (eps_c - uncond_eps).flatten(1).norm(dim=1), uncond_eps


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


_WORD = re.compile(r"^[a-z]{3,}</w>$")


def _vocabulary_words(model: Model) -> list[str]:
    vocab = model.tokenizer.get_vocab()
    return sorted(w[:-4] for w in vocab if _WORD.match(w))


def random_token_addition(prompt: str, rng: np.random.Generator, words: Sequence[str], k: int = 4) -> str:
    """RTA: insert ``k`` random vocabulary words at random positions."""
    out = prompt.split()
    for _ in range(k):
        out.insert(int(rng.integers(0, len(out) + 1)), str(words[int(rng.integers(len(words)))]))
    return " ".join(out)


def random_number_addition(prompt: str, rng: np.random.Generator, k: int = 4) -> str:
    """RNA: insert ``k`` random numbers (0 to 999,999) at random positions."""
    out = prompt.split()
    for _ in range(k):
        out.insert(int(rng.integers(0, len(out) + 1)), str(int(rng.integers(0, 1_000_000))))
    return " ".join(out)


def caption_word_repetition(prompt: str, rng: np.random.Generator, k: int = 2) -> str:
    """CWR: repeat ``k`` randomly chosen words of the caption in place."""
    out = prompt.split()
    for _ in range(k):
        i = int(rng.integers(0, len(out)))
        out.insert(i, out[i])
    return " ".join(out)


def gaussian_noise(embeds: torch.Tensor, rng: np.random.Generator, sigma: float = 0.1) -> torch.Tensor:
    """GNI on one prompt's embeddings (L, D): add N(0, (σ·rms)²) to every position but the start token;
    rms is the embedding's own RMS, so σ means the same for a width-64 testbed encoder and CLIP ViT-L."""
    noise = torch.from_numpy(rng.standard_normal(tuple(embeds.shape))).to(embeds.dtype)
    noise[0] = 0
    return embeds + sigma * embeds.float().pow(2).mean().sqrt().to(embeds.dtype) * noise


def generate(model: Model, prompts: Sequence[str], mitigation: str = "none", seed: int = 0, *,
             target: float | None = None, lr: float = 0.05, max_iters: int = 10, leash: float | None = None,
             noises: int = 1, k_words: int = 4, gni_sigma: float = 0.1, index=None, train_index=None,
             amg: dict | None = None, batch_size: int = 16, progress: bool = True) -> Generation:
    """Generate one image per prompt (image i from seed + i) with a mitigation, and report on each.

    ``target`` for ``wen`` defaults to the model's calibrated detection threshold; ``wen`` acts only
    on images at or over both the threshold and the target, and with ``noises`` > 1 optimises each
    embedding against that many starting noises (its own x_T and ones drawn from its seed). ``index`` (a
    :class:`memfree.similarity.PixelIndex`) adds each image's nearest training image and nL2.
    AMG methods search ``train_index`` (a :class:`memfree.index.TrainingIndex`; default: the one
    shipped with the model) and take :class:`memfree.guidance.AMGConfig` overrides from ``amg``.
    """
    if mitigation not in METHODS:
        raise ValueError(f"unknown mitigation {mitigation!r}; choose one of {', '.join(METHODS)}")
    if noises < 1:
        raise ValueError(f"noises must be at least 1, got {noises}")
    prompts = list(prompts)
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("no prompts given" if not prompts else "empty prompt given")
    t0 = time.perf_counter()
    seeds = [seed + i for i in range(len(prompts))]
    rngs = [np.random.default_rng([s, 7919]) for s in seeds]
    x_T = initial_noise(model, seeds)
    embeds = model.encode(prompts).float()
    # The original prompt's first-step score. Methods that sample with the original embedding get it
    # free from the sampling loop's first step; the others need one extra UNet pass for it.
    # wen reuses that pass's ε_u for the prompts it optimises.
    before = eps_u = None
    if mitigation != "none" and mitigation not in AMG_METHODS:
        parts = [first_step_scores(model, embeds[lo:lo + batch_size], x_T[lo:lo + batch_size])
                 for lo in range(0, len(prompts), batch_size)]
        before = torch.cat([score.cpu() for score, _ in parts])
        eps_u = torch.cat([u for _, u in parts])
    used, applied = list(prompts), [False] * len(prompts)
    iters, losses = [0] * len(prompts), [None] * len(prompts)
    extra: list[dict] = [{} for _ in prompts]

    if mitigation == "wen":
        threshold = (model.defaults.get("detection") or {}).get("threshold")
        if target is None:
            target = threshold
            if target is None:
                raise ValueError("wen needs a target: calibrate the model (memfree calibrate) or pass target=")
        # Flag by the detector's verdict, optimise down to the target.
        gate = target if threshold is None else max(target, threshold)
        flagged = [i for i in range(len(prompts)) if before[i] >= gate]
        for lo in range(0, len(flagged), batch_size):
            ids = flagged[lo:lo + batch_size]
            extra_noise = None
            if noises > 1:
                extra_noise = torch.stack([initial_noise(model, [_derived_seed(seeds[i], k) for k in range(1, noises)])
                                           for i in ids])
            new, it, last = optimise_embeddings(model, embeds[ids], x_T[ids], target, lr, max_iters, leash,
                                                extra_noise, uncond_eps=eps_u[ids])
            embeds[ids] = new
            for j, i in enumerate(ids):
                applied[i], iters[i], losses[i] = True, it[j], last[j]
    elif mitigation in ("rta", "rna", "cwr"):
        words = _vocabulary_words(model) if mitigation == "rta" else None
        for i, p in enumerate(prompts):
            used[i] = (random_token_addition(p, rngs[i], words, k_words) if mitigation == "rta" else
                       random_number_addition(p, rngs[i], k_words) if mitigation == "rna" else
                       caption_word_repetition(p, rngs[i], 2))
        embeds = model.encode(used).float()
        applied = [True] * len(prompts)
    elif mitigation == "gni":
        embeds = torch.stack([gaussian_noise(embeds[i], rngs[i], gni_sigma) for i in range(len(prompts))])
        applied = [True] * len(prompts)

    pieces = []
    if mitigation in AMG_METHODS:
        train_index = train_index if train_index is not None else default_index(model)
        threshold = (model.defaults.get("detection") or {}).get("threshold")
        pieces = [AMG(train_index, config_for(mitigation, train_index.embedder.metric, threshold, **(amg or {})))]
    out = sample(model, prompts, seeds, latents=x_T, prompt_embeds=embeds, batch_size=batch_size,
                 progress=progress, pieces=pieces)
    if pieces:
        for i in range(len(prompts)):
            summary = pieces[0].summary(i)
            applied[i] = any(summary["fired_steps"].values())
            extra[i]["amg"] = summary
    if before is None:
        before = out.scores[:, 0]
    reports = []
    for i, p in enumerate(prompts):
        reports.append(MitigationReport(
            prompt=p, seed=seeds[i], method=mitigation, applied=applied[i], score_before=float(before[i]),
            score_after=float(out.scores[i, 0]), used_prompt=used[i] if used[i] != p else None,
            iterations=iters[i], final_loss=losses[i], extra=extra[i]))
    if index is not None:
        nn = index.search(out.images)
        for i, r in enumerate(reports):
            r.nearest_id, r.nearest_distance = int(nn.ids[i]), float(nn.distance[i])
            r.nl2, r.memorized = float(nn.nl2[i]), bool(nn.memorized[i])
    return Generation(images=out.images, reports=reports, seconds=time.perf_counter() - t0,
                      piece_seconds=out.piece_seconds)


def default_index(model: Model):
    """The training-set index shipped with a model (``<model>/index`` or, for a testbed,
    ``<model>/testbed/index``); a clear error when there is none."""
    from memfree.index import TrainingIndex
    root = model.path
    for path in ([root / "index", root / "testbed" / "index"] if root is not None else []):
        if (path / "meta.json").exists():
            return TrainingIndex.load(path)
    raise ModelError(f"AMG needs a training-set index and {root} ships none: build one with "
                     "`memfree index build --images DIR --out DIR` and pass it with --index")


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
    """Training-time mitigation (Wen et al. §4): which samples of a batch to keep in the loss.

    For each sample at its own timestep, ‖ε(x_t, c) − ε(x_t, ∅)‖₂ is computed without gradient;
    samples at or above ``threshold`` are dropped. In a diffusers text-to-image fine-tuning loop,
    after ``model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample``::

        keep = keep_mask(unet, noisy_latents, timesteps, encoder_hidden_states, empty_states, tau,
                         eps_cond=model_pred)          # reuses the prediction: one extra no-grad call
        loss = (per_sample_loss * keep).sum() / keep.sum().clamp(min=1)   # skip the step if none kept

    Watch the kept share. Training the testbed from scratch on the v6 data with τ = 2.5 collapsed
    at step 1,200: a gradient spike that the unfiltered recipe recovers from sent every captioned
    sample's score over τ, so the filter dropped the very samples that would repair it
    (``reports/v6f25/``). Wen et al. apply it when fine-tuning a trained model.
    """
    return training_scores(unet, noisy, timesteps, cond, uncond, eps_cond) < threshold
