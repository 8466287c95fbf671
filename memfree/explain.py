"""Explanation (Wen et al.): which words of a prompt drive memorization.

Significance of token k is ‖∂L/∂e_k‖₂, with L = ‖ε_c − ε_u‖₂ and e_k the k-th row of the text
encoder's output, averaged over the chosen steps and generations. Gradients are taken along the
normal classifier-free-guided trajectory (the reference code's loop swaps its halves after the first
step; we do not). Token significances are summed back into the prompt's words.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from memfree.model import Model
from memfree.sampling import StepState, _to_eps, sample


@dataclass
class Explanation:
    prompt: str
    words: list[str]
    significance: list[float]         # one per word, summed over its tokens
    tokens: list[str]
    token_significance: list[float]   # one per prompt token (start, end and padding dropped)
    score: float                      # the detection score along the same trajectory

    def top_words(self, n: int = 1) -> list[int]:
        """Indices of the ``n`` most significant words."""
        order = sorted(range(len(self.words)), key=lambda i: -self.significance[i])
        return order[:n]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "score": self.score,
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
            out = s.model.unet(s.x_t.to(s.model.dtype), s.t, e).sample.float()
            eps_c = _to_eps(s.model, out, s.x_t, s.alpha_bar)
            loss = (eps_c - s.eps_u).flatten(1).norm(dim=1).sum()
            (g,) = torch.autograd.grad(loss, e)
        self.grads.append(g.norm(dim=2).detach().cpu())


def word_spans(prompt: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", prompt)]


def explain(model: Model, prompt: str, steps: int = 1, generations: int = 1, seed: int = 0,
            progress: bool = False) -> Explanation:
    """Per-word significance of ``prompt`` for the memorization score."""
    if not prompt.strip():
        raise ValueError("empty prompt given")
    probe = TokenGradients(steps)
    out = sample(model, [prompt] * generations, [seed + g for g in range(generations)], pieces=[probe],
                 max_steps=steps, progress=progress)
    sig = torch.stack(probe.grads).mean(dim=(0, 1))  # mean over steps and generations: (L,)
    enc = model.tokenizer(prompt, truncation=True, max_length=model.tokenizer.model_max_length,
                          return_offsets_mapping=True)
    n_tok = len(enc.input_ids) - 2                    # drop start and end tokens
    offsets = enc["offset_mapping"][1 : 1 + n_tok]
    tokens = model.tokenizer.convert_ids_to_tokens(enc.input_ids[1 : 1 + n_tok])
    tok_sig = [float(v) for v in sig[1 : 1 + n_tok]]
    spans = word_spans(prompt)
    words = [prompt[a:b] for a, b in spans]
    word_sig = [0.0] * len(words)
    for (start, end), v in zip(offsets, tok_sig):
        for i, (a, b) in enumerate(spans):
            if a <= start < b:
                word_sig[i] += v
                break
    return Explanation(prompt=prompt, words=words, significance=word_sig, tokens=tokens,
                       token_significance=tok_sig, score=float(out.scores.mean()))


def without_words(prompt: str, drop: list[int]) -> str:
    """The prompt with the words at the given indices removed."""
    spans = word_spans(prompt)
    return " ".join(prompt[a:b] for i, (a, b) in enumerate(spans) if i not in set(drop))
