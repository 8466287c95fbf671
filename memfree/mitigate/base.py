"""What every mitigation is: a small object with typed options that prepares a request (prompts, embeddings)
before sampling, adds pieces to the sampling loop, and reads the result afterwards."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from memfree.model import Model
from memfree.sampling import Piece, SampleOutput


@dataclass
class Request:
    """One generation request as the mitigation sees it: image i is ``prompts[i]`` from ``x_T[i]`` (seed ``seeds[i]``).

    A mitigation may replace ``embeds`` (the conditional text embeddings that will be sampled with) and
    ``used_prompts``, and records per image whether it acted (``applied``) and what it did (``extra``).
    """

    model: Model
    prompts: list[str]
    seeds: list[int]
    x_T: torch.Tensor
    embeds: torch.Tensor
    batch_size: int
    used_prompts: list[str] = field(default_factory=list)
    applied: list[bool] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    final_loss: list[float | None] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)
    score_before: torch.Tensor | None = None   # first-step score of the original prompt, when computed up front
    uncond_eps: torch.Tensor | None = None     # ε_u at x_T and the first step, from that same pass

    def __post_init__(self) -> None:
        n = len(self.prompts)
        self.used_prompts = self.used_prompts or list(self.prompts)
        self.applied = self.applied or [False] * n
        self.iterations = self.iterations or [0] * n
        self.final_loss = self.final_loss or [None] * n
        self.extra = self.extra or [{} for _ in range(n)]

    def rng(self, i: int) -> np.random.Generator:
        """Image i's own random stream, fixed by its seed (the same for every method that draws from it)."""
        return np.random.default_rng([self.seeds[i], 7919])


@dataclass
class Mitigation:
    """The ``none`` method, and the base of every other: its dataclass fields are its options."""

    name: ClassVar[str] = "none"
    needs_score_before: ClassVar[bool] = False   # prepare() reads the original prompt's first-step score

    def prepare(self, request: Request) -> None:
        """Change the request before sampling (embeddings, prompts)."""

    def pieces(self, request: Request) -> list[Piece]:
        """Pieces for the sampling loop (see :mod:`memfree.sampling`)."""
        return []

    def finish(self, request: Request, out: SampleOutput) -> None:
        """Read what the pieces did, after sampling."""

    @classmethod
    def options(cls) -> dict[str, tuple[str, Any]]:
        """Option name -> (type as written, default), for listings and for parsing ``--opt KEY=VALUE``."""
        return {f.name: (str(f.type), f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls)}
