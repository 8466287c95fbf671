"""Mitigation at inference time, one small object per method, and at training time (:func:`keep_mask`).

``generate`` is the same three steps for every method: the method prepares the request (prompts, embeddings),
the one sampling loop runs with the method's pieces, and every image gets a report. A method is registered
under its name in ``METHODS``; adding one is a new file and one line there (or :func:`register_mitigation`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch

from memfree.denoise import schedule_gives_detection_score
from memfree.detect import first_step_scores
from memfree.guidance import AMG_METHODS
from memfree.mitigate.amg import AMGMitigation, default_index, default_indexes
from memfree.mitigate.base import Mitigation, Request
from memfree.mitigate.baselines import CWR, GNI, RNA, RTA
from memfree.mitigate.training import keep_mask, training_scores
from memfree.mitigate.wen import Wen
from memfree.model import Model
from memfree.prompts import warn_truncated
from memfree.sampling import initial_noise, sample

METHODS: dict[str, Callable[..., Mitigation]] = {
    "none": Mitigation,
    "wen": Wen,
    "rta": RTA,
    "rna": RNA,
    "gni": GNI,
    "cwr": CWR,
    **{name: partial(AMGMitigation, name) for name in AMG_METHODS},
}


def register_mitigation(name: str, factory: Callable[..., Mitigation]) -> None:
    """Make ``generate(..., name)`` and ``--mitigation name`` build ``factory(**options)``."""
    METHODS[name] = factory


def method_options(name: str) -> dict[str, tuple[str, Any]]:
    """A method's options: name -> (type as written, default)."""
    factory = METHODS[name]
    if isinstance(factory, partial):
        return factory.func.options(*factory.args)
    return factory.options()


def build_mitigation(name: str, **options: Any) -> Mitigation:
    """The method registered as ``name``, built from typed options; unknown names and options are refused."""
    if name not in METHODS:
        raise ValueError(f"unknown mitigation {name!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(method_options(name)))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(method_options(name)) or 'none'}")
    return METHODS[name](**options)


@dataclass
class MitigationReport:
    """What happened to one image."""

    prompt: str
    seed: int
    method: str
    applied: bool                 # the mitigation changed this image's prompt, embedding or guidance
    score_before: float           # detection score ‖ε_c − ε_u‖₂ of the original prompt
    score_after: float            # detection score of the prompt or embedding actually sampled
    used_prompt: str | None = None
    iterations: int = 0           # wen: optimiser steps taken
    final_loss: float | None = None
    truncated: bool = False       # the prompt was longer than the tokenizer allows and was cut
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    images: torch.Tensor              # (N, 3, H, W) in [0, 1]
    reports: list[MitigationReport]
    seconds: float
    piece_seconds: float = 0.0        # of which inside the sampling loop's pieces (AMG's checks and terms)


def _detection_scores(model: Model, request: Request, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The detection score of each image's current embedding, and ε_u at the detection input, batch by batch."""
    parts = [first_step_scores(model, request.embeds[lo:lo + batch_size], request.x_T[lo:lo + batch_size])
             for lo in range(0, len(request.prompts), batch_size)]
    return torch.cat([score.cpu() for score, _ in parts]), torch.cat([u for _, u in parts])


def generate(model: Model, prompts: Sequence[str], mitigation: str | Mitigation = "none", seed: int = 0, *,
             batch_size: int = 16, progress: bool = True, **options: Any) -> Generation:
    """Generate one image per prompt (image i from seed + i) under a mitigation, with a report per image.

    ``mitigation`` is a registered name built with ``options`` (see ``memfree mitigations``), or a
    :class:`Mitigation` object.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    method = build_mitigation(mitigation, **options) if isinstance(mitigation, str) else mitigation
    if options and not isinstance(mitigation, str):
        raise ValueError("options go to a mitigation given by name; this one is already built")
    name = mitigation if isinstance(mitigation, str) else method.name
    prompts = list(prompts)
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("no prompts given" if not prompts else "empty prompt given")
    t0 = time.perf_counter()
    truncated = warn_truncated(model, prompts)
    seeds = [seed + i for i in range(len(prompts))]
    request = Request(model=model, prompts=prompts, seeds=seeds, x_T=initial_noise(model, seeds),
                      embeds=model.encode(prompts).float(), batch_size=batch_size)
    # The original prompt's detection score. Methods that sample with the original embedding get it free from
    # the sampling loop's first step when that step is the detection input; otherwise it costs one UNet pass
    # (whose ε_u wen reuses), so that the calibrated threshold means the same under every sampler.
    free = schedule_gives_detection_score(model)
    if method.needs_score_before or not free:
        request.score_before, request.uncond_eps = _detection_scores(model, request, batch_size)
    method.prepare(request)
    out = sample(model, prompts, seeds, latents=request.x_T, prompt_embeds=request.embeds, batch_size=batch_size,
                 progress=progress, pieces=method.pieces(request))
    method.finish(request, out)
    before = request.score_before if request.score_before is not None else out.scores[:, 0]
    after = out.scores[:, 0]
    if not free:   # the detection score of what was sampled, comparable with the threshold
        after = _detection_scores(model, request, batch_size)[0] if method.needs_score_before else before
    reports = [MitigationReport(prompt=p, seed=seeds[i], method=name, applied=request.applied[i],
                                score_before=float(before[i]), score_after=float(after[i]),
                                used_prompt=request.used_prompts[i] if request.used_prompts[i] != p else None,
                                iterations=request.iterations[i], final_loss=request.final_loss[i],
                                truncated=truncated[i], extra=request.extra[i])
               for i, p in enumerate(prompts)]
    return Generation(images=out.images, reports=reports, seconds=time.perf_counter() - t0,
                      piece_seconds=out.piece_seconds)


__all__ = ["METHODS", "Generation", "Mitigation", "MitigationReport", "Request", "build_mitigation", "default_index",
           "default_indexes", "generate", "keep_mask", "method_options", "register_mitigation", "training_scores"]
