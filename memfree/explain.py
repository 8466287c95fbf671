"""Explanation: which words of a prompt drive memorization.

Two methods, both along the normal classifier-free-guided trajectory (the reference code's loop swaps
its halves after the first step; we do not):

* ``gradient`` (Wen et al.): significance of token k is ‖∂L/∂e_k‖₂, with L = ‖ε_c − ε_u‖₂ and e_k
  the k-th row of the text encoder's output, averaged over the chosen steps and generations; token
  significances are summed back into the prompt's words. One UNet forward and backward.
* ``occlusion``: significance of a word is how much the detection score falls when that word is
  deleted from the prompt (leave-one-out), so it measures the effect deletion is judged by; a word's
  value is split evenly over its tokens. The two leading words are then picked greedily (the second
  is the one whose deletion lowers the score most once the first is gone), because words that
  trigger memorization overlap: the two largest single drops often name the same cue twice.
  It costs about two first-step scores per word, in two batches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from memfree.detect import trajectory_scores
from memfree.model import Model
from memfree.denoise import branch_eps
from memfree.sampling import StepState, sample


@dataclass
class Explanation:
    prompt: str
    words: list[str]
    significance: list[float]         # one per word, summed over its tokens
    tokens: list[str]
    token_significance: list[float]   # one per prompt token (start, end and padding dropped)
    score: float                      # the detection score along the same trajectory
    method: str = "gradient"
    leading: list[int] = field(default_factory=list)  # occlusion: words picked greedily, most telling first

    def top_words(self, n: int = 1) -> list[int]:
        """Indices of the ``n`` most significant words (the greedy picks first, when there are any)."""
        rest = sorted((i for i in range(len(self.words)) if i not in self.leading), key=lambda i: -self.significance[i])
        return (self.leading + rest)[:n]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "method": self.method, "score": self.score,
                "top_words": [self.words[i] for i in self.top_words(2)],
                "words": [{"word": w, "significance": s} for w, s in zip(self.words, self.significance)],
                "tokens": [{"token": t, "significance": s} for t, s in zip(self.tokens, self.token_significance)]}


class TokenGradients:
    """A sampling piece that records ‖∂‖ε_c − ε_u‖₂/∂e_k‖₂ per token for the first ``steps`` steps."""

    def __init__(self, steps: int):
        self.steps = steps
        self.grads: list[torch.Tensor] = []   # (B, L) per step

    def __call__(self, s: StepState) -> None:
        if s.step >= self.steps:
            return
        with torch.enable_grad():
            e = s.cond.detach().clone().requires_grad_(True)
            eps_c = branch_eps(s.model, s.x_t, s.t, e, s.alpha_bar)
            loss = (eps_c - s.eps_u).flatten(1).norm(dim=1).sum()
            (g,) = torch.autograd.grad(loss, e)
        self.grads.append(g.norm(dim=2).detach().cpu())


def word_spans(prompt: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", prompt)]


METHODS = ("gradient", "occlusion")


def _words_and_tokens(prompt: str, tokenizer) -> tuple[list[str], list[str], list[int | None]]:
    """The prompt's words, its tokens (start, end and padding dropped) and the word each token belongs to."""
    enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_offsets_mapping=True)
    n_tok = len(enc.input_ids) - 2
    offsets = enc["offset_mapping"][1 : 1 + n_tok]
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids[1 : 1 + n_tok])
    spans = word_spans(prompt)
    owner = [next((i for i, (a, b) in enumerate(spans) if a <= start < b), None) for start, _ in offsets]
    return [prompt[a:b] for a, b in spans], tokens, owner


def explain_by_occlusion(prompt: str, tokenizer, scores) -> Explanation:
    """Occlusion with any scorer: ``scores(prompts)`` gives the detection score of each prompt (memfree's loop,
    or a diffusers pipeline under :func:`memfree.protect`); ``tokenizer`` (a fast CLIP tokenizer) maps words
    to tokens."""
    words, tokens, owner = _words_and_tokens(prompt, tokenizer)
    s = scores([prompt] + [without_words(prompt, [i]) for i in range(len(words))])
    word_sig = [float(s[0] - v) for v in s[1:]]
    per_word = [owner.count(i) for i in range(len(words))]
    tok_sig = [word_sig[i] / max(per_word[i], 1) if i is not None else 0.0 for i in owner]
    first = max(range(len(words)), key=lambda i: word_sig[i])
    others = [i for i in range(len(words)) if i != first]
    leading = [first]
    if others:
        s2 = scores([without_words(prompt, [first, i]) for i in others])
        leading.append(others[int(np.argmin(s2))])
    return Explanation(prompt=prompt, words=words, significance=word_sig, tokens=tokens,
                       token_significance=tok_sig, score=float(s[0]), method="occlusion", leading=leading)


def explain(model: Model, prompt: str, steps: int = 1, generations: int = 1, seed: int = 0,
            method: str = "occlusion", progress: bool = False) -> Explanation:
    """Per-word significance of ``prompt`` for the memorization score, by ``gradient`` or ``occlusion``."""
    if not prompt.strip():
        raise ValueError("empty prompt given")
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "occlusion":
        def scores(variants: list[str]) -> np.ndarray:
            return trajectory_scores(model, variants, steps, generations, seed, 64, progress).mean((1, 2))
        return explain_by_occlusion(prompt, model.tokenizer, scores)
    words, tokens, owner = _words_and_tokens(prompt, model.tokenizer)
    n_tok = len(tokens)
    probe = TokenGradients(steps)
    out = sample(model, [prompt] * generations, [seed + g for g in range(generations)], pieces=[probe],
                 max_steps=steps, progress=progress)
    sig = torch.stack(probe.grads).mean(dim=(0, 1))  # mean over steps and generations: (L,)
    tok_sig = [float(v) for v in sig[1 : 1 + n_tok]]
    word_sig = [0.0] * len(words)
    for i, v in zip(owner, tok_sig):
        if i is not None:
            word_sig[i] += v
    return Explanation(prompt=prompt, words=words, significance=word_sig, tokens=tokens,
                       token_significance=tok_sig, score=float(out.scores.mean()))


def without_words(prompt: str, drop: list[int]) -> str:
    """The prompt with the words at the given indices removed."""
    spans = word_spans(prompt)
    return " ".join(prompt[a:b] for i, (a, b) in enumerate(spans) if i not in set(drop))
