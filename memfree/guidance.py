"""Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024) as one piece of the sampling loop.

At each step the piece looks at x̂0, finds its nearest training image in a :class:`TrainingIndex`
and measures their similarity σ_t. Only when σ_t exceeds a gate λ_t that rises toward t = 0 does it
change ε̂, with up to three terms, one per cause of memorization:

* despecification, −s1·(ε_c − ε_u) with s1 = clip(c1·σ, 0, s0 − 1): a lower effective guidance scale;
* caption deduplication, −s2·(ε(x_t, y_N) − ε_u) with s2 = clip(c2·σ, 0, s0 − s1 − 1), where y_N is
  the neighbour's own training caption (a third UNet branch, run only for gated images);
* dissimilarity, classifier guidance against σ: ε̂ moves so that x̂0 takes a step of c3 along −∇σ.
  In the paper's form c3_t·√(1−ᾱ_t)·∇_{x_t}σ this is c3_t = c3·ᾱ_t/(1 − ᾱ_t), a scale that rises
  toward t = 0 as the official schedule does. The gradient goes through the VAE decoder (if any) and
  the embedder with ε̂ held constant, so no UNet backward pass is needed. With ``grid=1`` (the
  pixel presets) the step is made to keep every channel's mean: in pixel nL2 the cheapest escape
  from a training image is a global colour cast, which also takes the picture away from what the
  prompt asks for. Without that way out it escapes through fine texture, which on the testbed keeps
  alignment closer to ``none`` (docs/methods.md); neither is a different picture.

Similarity: for an index with the ``l2`` metric (pixels), σ = 1 − nL2/2, AMG's normalised ℓ2 over the
k = 50 nearest images, so an exact copy is 1, "no closer than the crowd" is 0 and the memorization
threshold nL2 < 1.4 is σ > 0.3. For a ``cosine`` index (SSCD or another embedder), σ is the cosine
to the nearest neighbour (memorized above 0.5 for SSCD).

Beyond the paper, two ways to make ordinary prompts pay next to nothing:

* a cadence: σ is checked every ``check_every`` steps, and at every step once an image is under watch
  (σ above ``watch``, or the gate has fired). This is the default;
* a screen: the free first-step detection score ‖ε_c − ε_u‖ decides whether an image is checked at
  all; images scored under ``screen`` never pay for a search. Alone it misses whatever copies the
  detector misses, so it comes with a latent screen (:class:`memfree.similarity.LatentScreen`): either
  signal is enough, and an image the score does not flag is still checked whenever its x̂0 comes close
  to a training latent. Both are on by default when an index carries a latent screen and the model has
  a calibrated threshold (:func:`screening`). What neither signal sees (a copy by a learned embedder's verdict
  that is no copy in pixels or latents) a ``spot_check`` catches: one full check of every image at one noise level.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from memfree.denoise import branch_eps, predict_x0
from memfree.sampling import StepState
from memfree.similarity import (index_latent_screen, index_tuning, is_latent_index, load_latent_screen, nearest,
                                similarity_to)

TERMS = ("spe", "dup", "sim")
# With the default screens (docs/testbed-latent.md, "AMG as shipped"): one full check of every image at t/T = 0.3,
# and images under watch that the score did not flag checked every third step.
SCREEN_DEFAULTS = {"spot_check": 0.3, "watch_every": 3}
SPOT_CHECK = SCREEN_DEFAULTS["spot_check"]


@dataclass(frozen=True)
class AMGConfig:
    """Scales of the three terms and the gate. λ_t = lam_hi + (lam_lo − lam_hi)·(t/T)², low at t = T."""

    c1: float = 3.0
    c2: float = 3.0
    c3: float = 200.0             # the step x̂0 takes along −∇σ, per unit of gradient
    lam_lo: float = 0.24          # gate at the noisiest step
    lam_hi: float = 0.28          # gate at t = 0
    terms: tuple[str, ...] = TERMS
    always_on: bool = False       # ablation: ignore the gate, guide at every step
    screen: float | None = None   # two-stage gate: skip images whose first-step score is under this
    check_every: int = 4          # check σ every n-th step until an image is under watch ...
    watch: float = 0.2            # ... which it is once σ passes this (or the gate fires); from then on it is
    watch_every: int = 1          # checked every step, or with a screen, if the score did not flag it, every n-th
                                  # step and at every step after a check the gate fired at
    k: int = 50                   # neighbours for nL2
    alpha: float = 0.5
    grid: int = 0                 # >0: the ∇σ step averages to zero over each cell of a grid×grid split
                                  # (1: no change of any channel's mean, so no escape by a colour cast)
    latent_bar: float = 0.3       # with a LatentScreen: images whose latent σ is at or under this skip the full check
    smooth: int = 0               # >0: the ∇σ step is averaged over a smooth×smooth grid of cells, so x̂0 cannot
                                  # escape a learned embedder by fine-grained changes it alone notices
    spot_check: float | None = None  # with a screen: at the first step with t/T at or under this, every image gets
                                     # one full check all the same (one it acts on stays under watch); ≤ 0: none
    spot_floor: float | None = None  # the spot check covers only images scored at least spot_floor·screen at the
                                     # first step (None or 0: every image)
    check_precision: str = "auto"    # the decode a check measures σ on (never the gradient's): "bf16", "fp32" (the
                                     # VAE's own dtype, no autocast) or "auto", bf16 where the CPU computes it natively

    def gate(self, t: float, num_train_timesteps: int = 1000) -> float:
        r = min(max(float(t) / num_train_timesteps, 0.0), 1.0)
        return self.lam_hi + (self.lam_lo - self.lam_hi) * r * r


# Presets per similarity metric. "l2" values are in units of σ = 1 − nL2/2 (memorized above 0.3); the
# "l2" amg uses the dissimilarity term alone and `amg-all-terms` is the paper's three-term form. The
# "cosine" values take c1, c2 and the gate from the paper's SSCD setting. Why each value: docs/methods.md.
PRESETS: dict[str, dict[str, AMGConfig]] = {
    "amg": {"l2": AMGConfig(terms=("sim",), grid=1),
            "cosine": AMGConfig(c1=13.0, c2=13.0, c3=200.0, lam_lo=0.3, lam_hi=0.4, watch=0.2)},
    "amg-strong": {"l2": AMGConfig(c3=400.0, lam_lo=0.15, lam_hi=0.2, check_every=2, grid=1),
                   "cosine": AMGConfig(c1=13.0, c2=13.0, c3=400.0, lam_lo=0.2, lam_hi=0.3, watch=0.15,
                                       check_every=2)},
}

# Ablations of ``amg`` for the benchmark: the paper's three terms and each of them removed (at the
# preset's c1 and c2), the gate always on, a constant λ, the cheap cadence off (check every step),
# and the two-stage screen by the first-step detection score.
VARIANTS: dict[str, dict] = {
    "amg-all-terms": dict(terms=TERMS),
    "amg-no-spe": dict(terms=("dup", "sim")),
    "amg-no-dup": dict(terms=("spe", "sim")),
    "amg-no-sim": dict(terms=("spe", "dup")),
    "amg-always": dict(always_on=True, check_every=1),
    "amg-const": {},            # λ_t held at its t = 0 value
    "amg-every": dict(check_every=1),
    "amg-screen": {},           # screen = the model's calibrated detection threshold
}
AMG_METHODS = tuple(PRESETS) + tuple(VARIANTS)
CHECK_PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions natively (AVX-512 BF16 or AMX); elsewhere bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_decode(model, x0: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """x̂0 decoded for a check, returned in float32 but computed at ``precision``: bf16 makes the decode cheaper on a
    CPU with native bf16 for a σ that moves by rounding only (docs/spec.md §8.4); the dissimilarity gradient always
    decodes in the model's dtype."""
    on_cpu = x0.device.type == "cpu"
    if precision == "bf16" or (precision == "auto" and on_cpu and _native_bf16()):
        with torch.autocast(x0.device.type, dtype=torch.bfloat16):
            return model.decode(x0, clamp=False).float()
    return model.decode(x0, clamp=False)


def config_for(method: str, metric: str = "l2", threshold: float | None = None, tuned: dict | None = None,
               **overrides) -> AMGConfig:
    """The configuration behind a method name (``amg``, ``amg-strong`` or an ablation) for an index
    metric; ``threshold`` is the calibrated detection threshold that ``amg-screen`` screens with.
    ``tuned`` maps a preset name to AMGConfig values tuned for one embedder (an index's ``tuning.json``);
    they replace the preset's, before the ablation. ``overrides`` (``None`` meaning "keep") win over all."""
    if method not in AMG_METHODS:
        raise ValueError(f"unknown AMG method {method!r}; choose one of {', '.join(AMG_METHODS)}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"unknown similarity metric {metric!r} (l2 or cosine)")
    given = set(overrides) | {k for values in (tuned or {}).values() for k in (values or {})}
    unknown = given - set(AMGConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown AMG parameter(s): {', '.join(sorted(unknown))}")
    base = method if method in PRESETS else "amg"
    cfg = replace(PRESETS[base][metric], **{k: (tuple(v) if k == "terms" else v)
                                            for k, v in ((tuned or {}).get(base) or {}).items()})
    cfg = replace(cfg, **VARIANTS.get(method, {}))
    if method == "amg-const":
        cfg = replace(cfg, lam_lo=cfg.lam_hi)
    if method == "amg-screen":
        if threshold is None:
            raise ValueError("amg-screen needs the model's detection threshold: run `memfree calibrate` first")
        cfg = replace(cfg, screen=threshold)
    cfg = replace(cfg, **{k: (tuple(v) if k == "terms" else v) for k, v in overrides.items() if v is not None})
    bad = set(cfg.terms) - set(TERMS)
    if bad:
        raise ValueError(f"unknown AMG term(s) {', '.join(sorted(bad))}; terms are {', '.join(TERMS)}")
    if cfg.check_every < 1 or cfg.watch_every < 1:
        raise ValueError("check_every and watch_every must be at least 1")
    if cfg.check_precision not in CHECK_PRECISIONS:
        raise ValueError(f"unknown check_precision {cfg.check_precision!r}; "
                         f"choose one of {', '.join(CHECK_PRECISIONS)}")
    if cfg.grid < 0 or cfg.smooth < 0:
        raise ValueError("grid and smooth must be 0 (off) or a positive number of cells per side")
    return cfg


def _new_entry() -> dict:
    return {"checked": 0, "latent_checked": 0, "screened_out": False, "first_score": math.inf, "watch": False,
            "spotted": False, "fired_last": False, "max_sigma": None, "steps": []}


@dataclass
class AMG:
    """The AMG piece for :func:`memfree.sampling.sample`; keeps a per-image log of what it did."""

    index: object
    config: AMGConfig = field(default_factory=AMGConfig)
    first_scores: torch.Tensor | None = None   # detection scores per image when the loop's first step is not
                                               # the detection input (the screen compares them with its threshold)
    latent_screen: object | None = None        # a LatentScreen: a check starts in latent space, no decode
    log: dict[int, dict] = field(default_factory=lambda: defaultdict(_new_entry))

    def _due(self, step: int, i: int, spot: bool) -> bool:
        e = self.log[i]
        if spot:
            return True
        if e["screened_out"] and self.latent_screen is None:
            return False
        if e["watch"]:   # the cadence under watch spares only images the score screen did not flag
            return e["fired_last"] or not e["screened_out"] or step % self.config.watch_every == 0
        return step % self.config.check_every == 0

    def __call__(self, s: StepState) -> None:
        cfg, model = self.config, s.model
        if s.step == 0 and cfg.screen is not None:
            scores = s.score if self.first_scores is None else self.first_scores[s.indices]
            for j, i in enumerate(s.indices):
                self.log[i]["screened_out"] = bool(scores[j] < cfg.screen)
                self.log[i]["first_score"] = float(scores[j])
        spot = self._spot_due(s)
        rows = [j for j, i in enumerate(s.indices) if self._due(s.step, i, spot)]
        spot_only: set[int] = set()   # rows checked only because of the spot check
        if rows and self.latent_screen is not None:   # the cheap first stage: x̂0 against training latents
            lat = self._latent_sigma(s, rows)
            for j in rows:
                self.log[s.indices[j]]["latent_checked"] += 1
            # with both screens either signal is enough: images the first-step score flags skip the latent filter
            flagged = cfg.screen is not None
            keep = [self.log[s.indices[j]]["watch"] or bool(lat[r] > cfg.latent_bar)
                    or (flagged and not self.log[s.indices[j]]["screened_out"]) for r, j in enumerate(rows)]
            spot_only = {j for j, k in zip(rows, keep) if spot and not k}
            rows = [j for j, k in zip(rows, keep) if k or (spot and self._spot_covers(s, j))]
        elif spot:
            spot_only = {j for j in rows if self.log[s.indices[j]]["screened_out"]
                         and not self.log[s.indices[j]]["watch"]}
            rows = [j for j in rows if j not in spot_only or self._spot_covers(s, j)]
        if not rows:
            return
        a = s.alpha_bar
        x_t, eps = s.x_t[rows], s.eps[rows].detach()
        x0 = predict_x0(x_t, eps, a)
        latent = is_latent_index(self.index)
        view = (lambda z: z) if latent else (lambda z: model.decode(z, clamp=False))
        checked = x0 if latent else self._decoded(s, rows, x0)
        sig, near = nearest(self.index, checked, cfg.k, cfg.alpha)
        lam = cfg.gate(s.t, model.scheduler.config.num_train_timesteps)
        fire = torch.ones_like(sig, dtype=torch.bool) if cfg.always_on else sig > lam
        for r, j in enumerate(rows):
            e = self.log[s.indices[j]]
            e["checked"] += 1
            near_watch = bool(sig[r] > cfg.watch) and j not in spot_only   # a spot check watches only what it acts on
            e["watch"] = e["watch"] or near_watch or bool(fire[r])
            e["fired_last"] = bool(fire[r])
            e["max_sigma"] = max(float(sig[r]), e["max_sigma"] if e["max_sigma"] is not None else -math.inf)
        if not fire.any():
            return
        fired_rows = torch.nonzero(fire).flatten().tolist()
        change = torch.zeros_like(eps)
        if "sim" in cfg.terms and cfg.c3 > 0:  # dissimilarity: x̂0 steps c3 along −∇σ
            with torch.enable_grad():
                x0f = x0[fired_rows].detach().requires_grad_(True)
                sig_f = similarity_to(self.index, view(x0f), near[fired_rows], cfg.alpha)
                grad = torch.autograd.grad(sig_f.sum(), x0f)[0]
            if cfg.grid > 0:
                coarse = torch.nn.functional.adaptive_avg_pool2d(grad, cfg.grid)
                grad = grad - torch.nn.functional.interpolate(coarse, size=grad.shape[-2:], mode="nearest")
            if cfg.smooth > 0:
                coarse = torch.nn.functional.adaptive_avg_pool2d(grad, cfg.smooth)
                grad = torch.nn.functional.interpolate(coarse, size=grad.shape[-2:], mode="bilinear", align_corners=False)
            change[fired_rows] += cfg.c3 * (a.sqrt() / (1 - a).sqrt()) * grad
        s0 = s.guidance_scale
        sig_c = sig.clamp(min=0)
        s1 = (cfg.c1 * sig_c).clamp(0, max(s0 - 1, 0)) if "spe" in cfg.terms else torch.zeros_like(sig)
        s2 = torch.minimum(cfg.c2 * sig_c, (s0 - s1 - 1).clamp(min=0)) if "dup" in cfg.terms else torch.zeros_like(sig)
        with_text = {r: bool(s.cond[rows[r]].ne(s.uncond[rows[r]]).any()) for r in fired_rows}  # "" has none
        captions = {r: self.index.captions[int(near[r, 0])] for r in fired_rows}
        dup_rows = [r for r in fired_rows if s2[r] > 0 and with_text[r] and captions[r]]
        if dup_rows:  # caption deduplication: a third UNet branch on the neighbour's caption
            with torch.no_grad():
                e_n = branch_eps(model, x_t[dup_rows], s.t, model.encode([captions[r] for r in dup_rows]), a)
            for q, r in enumerate(dup_rows):
                change[r] -= s2[r] * (e_n[q] - s.eps_u[rows[r]])
        for r in fired_rows:
            j = rows[r]
            terms = []
            if with_text[r] and s1[r] > 0:  # despecification: a lower effective guidance scale
                change[r] -= s1[r] * (s.eps_c[j] - s.eps_u[j])
                terms.append("spe")
            if r in dup_rows:
                terms.append("dup")
            if "sim" in cfg.terms and cfg.c3 > 0:
                terms.append("sim")
            self.log[s.indices[j]]["steps"].append({"step": s.step, "t": int(s.t), "sigma": round(float(sig[r]), 4),
                                                    "lambda": round(lam, 4), "terms": terms})
        eps_new = s.eps.clone()
        eps_new[rows] = eps + change
        s.eps = eps_new

    def _spot_due(self, s: StepState) -> bool:
        """Whether this is the step of the spot check: the first at or under ``spot_check``·T (one per image)."""
        cfg = self.config
        if (cfg.spot_check is None or cfg.spot_check <= 0
                or float(s.t) > cfg.spot_check * s.model.scheduler.config.num_train_timesteps):
            return False
        fresh = [i for i in s.indices if not self.log[i]["spotted"]]
        for i in fresh:
            self.log[i]["spotted"] = True
        return bool(fresh)

    def _spot_covers(self, s: StepState, j: int) -> bool:
        """Whether the spot check covers batch row j: every image, or with ``spot_floor`` only those whose first-step
        score is at least spot_floor·screen (the near misses of the score screen)."""
        cfg = self.config
        if not cfg.spot_floor or cfg.screen is None:
            return True
        return self.log[s.indices[j]]["first_score"] >= cfg.spot_floor * cfg.screen

    @staticmethod
    def _per_row(s: StepState, key: str, rows: list[int], compute) -> torch.Tensor:
        """``compute(rows)`` for the rows no other AMG piece has computed it for at this step and ε̂ (several indexes
        check the same images: one decode or latent search serves them all until one of them changes ε̂)."""
        cached = s.shared.get(key)
        if cached is None or cached[0] is not s.eps:
            cached = (s.eps, {})
            s.shared[key] = cached
        done = cached[1]
        missing = [j for j in rows if j not in done]
        if missing:
            with torch.no_grad():
                for j, value in zip(missing, compute(missing)):
                    done[j] = value
        return torch.stack([done[j] for j in rows])

    def _latent_sigma(self, s: StepState, rows: list[int]) -> torch.Tensor:
        """The latent screen's σ of x̂0 for these rows."""
        screen = self.latent_screen
        return self._per_row(s, f"amg_latent_{id(screen)}", rows, lambda r: screen.similarity(
            predict_x0(s.x_t[r], s.eps[r].detach(), s.alpha_bar)))

    def _decoded(self, s: StepState, rows: list[int], x0: torch.Tensor) -> torch.Tensor:
        """x̂0 of these rows decoded for the check (``x0`` holds them in the order of ``rows``)."""
        where, precision = {j: q for q, j in enumerate(rows)}, self.config.check_precision
        return self._per_row(s, f"amg_decoded_{precision}", rows,
                             lambda r: check_decode(s.model, x0[[where[j] for j in r]], precision))

    def summary(self, i: int) -> dict:
        """What AMG did to image i: similarity checks run, steps at which each term fired, peak σ."""
        e = self.log[i]
        fired = {term: [st["step"] for st in e["steps"] if term in st["terms"]] for term in TERMS}
        return {"checked_steps": e["checked"], "latent_checked_steps": e["latent_checked"],
                "screened_out": e["screened_out"], "max_sigma": e["max_sigma"], "fired_steps": fired}


def config_for_index(method: str, index, threshold: float | None = None, **overrides) -> AMGConfig:
    """:func:`config_for` for ``index``: its metric, and the values its ``tuning.json`` holds for its embedder."""
    return config_for(method, index.embedder.metric, threshold, index_tuning(index).get("amg"), **overrides)


def screening(indexes: list, threshold: float | None, latent_screen=None, **overrides) -> tuple[object, dict]:
    """The latent screen AMG runs with, and ``overrides`` with the screen settings that go with it.

    ``latent_screen``: a :class:`LatentScreen` or its file is used as given; ``False`` (or ``"off"``) means none.
    By default (None) the screen an index folder carries (``latent-screen.safetensors``) is used together with the
    first-step score screen at the calibrated ``threshold``, either signal sending an image to the full check:
    each covers the other's blind spot (caption templates for the latent one, paraphrases for the score).
    The bar is the carrying index's ``latent_bar`` in ``tuning.json`` (else AMGConfig's); the spot check and the
    watch cadence are :data:`SCREEN_DEFAULTS` unless that file holds its own. Without a threshold, or with no index
    carrying a screen, there is no default screen and every check is a full one."""
    if latent_screen is False or (isinstance(latent_screen, str) and latent_screen.lower() in ("off", "false")):
        return None, overrides
    if latent_screen is not None:
        loaded = load_latent_screen(latent_screen) if isinstance(latent_screen, (str, Path)) else latent_screen
        return loaded, overrides
    if threshold is None:
        return None, overrides
    for index in indexes:
        carried = index_latent_screen(index)
        if carried is not None:
            tuned = index_tuning(index)
            defaults = ({"screen": threshold} | {k: tuned.get(k, v) for k, v in SCREEN_DEFAULTS.items()}
                        | {k: tuned[k] for k in ("latent_bar", "spot_floor") if tuned.get(k) is not None})
            return carried, defaults | {k: v for k, v in overrides.items() if v is not None}
    return None, overrides
