"""Somepalli et al.'s (NeurIPS 2023) inference-time baselines, applied to every prompt (docs/spec.md §6):
random token addition (``rta``), random number addition (``rna``), Gaussian noise on the text embedding
(``gni``) and caption word repetition (``cwr``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from memfree.mitigate.base import Mitigation, Request
from memfree.model import Model

_WORD = re.compile(r"^[a-z]{3,}</w>$")


def vocabulary_words(model: Model) -> list[str]:
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



class _PromptEdit(Mitigation):
    """A baseline that rewrites every prompt, then encodes the rewritten prompts."""

    needs_score_before: ClassVar[bool] = True

    def edit(self, prompt: str, rng: np.random.Generator, model: Model) -> str:
        raise NotImplementedError

    def prepare(self, request: Request) -> None:
        for i, p in enumerate(request.prompts):
            request.used_prompts[i] = self.edit(p, request.rng(i), request.model)
        request.embeds = request.model.encode(request.used_prompts).float()
        request.applied = [True] * len(request.prompts)


@dataclass
class RTA(_PromptEdit):
    """Random token addition: ``k`` random vocabulary words at random positions."""

    name: ClassVar[str] = "rta"
    k: int = 4

    def prepare(self, request: Request) -> None:
        self._words = vocabulary_words(request.model)
        super().prepare(request)

    def edit(self, prompt, rng, model):
        return random_token_addition(prompt, rng, self._words, self.k)


@dataclass
class RNA(_PromptEdit):
    """Random number addition: ``k`` random numbers at random positions."""

    name: ClassVar[str] = "rna"
    k: int = 4

    def edit(self, prompt, rng, model):
        return random_number_addition(prompt, rng, self.k)


@dataclass
class CWR(_PromptEdit):
    """Caption word repetition: ``k`` words of the caption repeated in place."""

    name: ClassVar[str] = "cwr"
    k: int = 2

    def edit(self, prompt, rng, model):
        return caption_word_repetition(prompt, rng, self.k)


@dataclass
class GNI(Mitigation):
    """Gaussian noise of ``sigma`` × the embedding's RMS on every text embedding position but the start token."""

    name: ClassVar[str] = "gni"
    needs_score_before: ClassVar[bool] = True
    sigma: float = 0.1

    def prepare(self, request: Request) -> None:
        request.embeds = torch.stack([gaussian_noise(request.embeds[i], request.rng(i), self.sigma)
                                      for i in range(len(request.prompts))])
        request.applied = [True] * len(request.prompts)
