"""memfree inside a user's own diffusers pipeline: ``guard = memfree.protect(pipe, mitigation=...)``.

The pipeline stays the user's: its scheduler, negative prompts, ``num_images_per_prompt``, callbacks and
LoRA weights all work as before. memfree hooks its denoiser (``pipe.unet`` or ``pipe.transformer``) with
PyTorch forward hooks, in the k-diffusion manner of a wrapper around the denoiser:

* the pipeline does classifier-free guidance in one batched call [unconditional; conditional]; the hook
  reads both halves of that call's output, so the detection score ‖ε_c − ε_u‖ costs no extra pass when the
  first step is the detection timestep (otherwise one extra batched pass at the detection input);
* to change the guided prediction ε̂ (AMG), the hook returns a conditional half c' with
  u + g·(c' − u) = ε̂', so the pipeline's own guidance and scheduler step produce exactly ε̂'. An image on
  which nothing fires gets its output back untouched, so clean prompts stay bit-identical;
* ``wen`` replaces the conditional text embeddings before the first call (a forward pre-hook).

Every family is seen in ε-space by memfree's pieces, as in its own sampling loop. ε and v prediction
(SD 1.x, 2.x, SDXL) convert with ᾱ_t. Flow matching (SD3) predicts the velocity v = ε − x0 at
x_t = (1−σ)·x0 + σ·ε; it is viewed as the variance-preserving sample x_t·√ᾱ/(1−σ) with
ᾱ = (1−σ)²/((1−σ)² + σ²) and ε = x_t + (1−σ)·v, so that x̂0 = x_t − σ·v is the same in both views. Its
detection statistic is ‖v_c − v_u‖ (in ε it would vanish at σ = 1, the first step), and an AMG change Δε
becomes Δv = Δε/(1−σ). docs/spec.md §8 has the formulas.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from memfree.denoise import REFERENCE_STEPS, to_eps
from memfree.guidance import AMGConfig
from memfree.sampling import StepState
from memfree.settings import ModelSettings, read_settings

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "StableDiffusion3Pipeline": "sd3"}
MITIGATIONS = (None, "amg", "wen")
WEN_OPTIONS = ("target", "target_scale", "lr", "max_iters")
AMG_OPTIONS = tuple(AMGConfig.__dataclass_fields__)   # every field of AMG's configuration is an option


@dataclass
class MemorizationReport:
    """What memfree saw and did for one generated image."""

    score: float                       # detection score at the first step (‖ε_c − ε_u‖, ‖v_c − v_u‖ for flow)
    scores: list[float]                # the same statistic at every denoiser call
    threshold: float | None
    flagged: bool | None               # score > threshold (None without a threshold)
    mitigated: bool                    # the mitigation changed this image
    score_source: str = "free"         # "free": from the pipeline's own first call; "extra pass": one more call
    nearest_id: str | None = None      # nearest item of the index (with an index)
    similarity: float | None = None    # its similarity (σ of AMG: 1 − nL2/2 for pixels, cosine otherwise)
    amg: dict | None = None            # AMG's log for the image: checks, steps at which each term fired, peak σ


def _family(pipe) -> str:
    for klass in type(pipe).__mro__:
        if klass.__name__ in FAMILIES:
            return FAMILIES[klass.__name__]
    name = type(pipe).__name__
    hint = (" Flux is guidance-distilled: its one pass per step has no unconditional half, so detection would need "
            "a pass of its own; memfree does not protect it yet.") if "Flux" in name else ""
    raise TypeError(f"memfree.protect does not support {name}; supported: {', '.join(FAMILIES)}.{hint}")


def _denoiser(pipe, family: str) -> torch.nn.Module:
    return pipe.transformer if family == "sd3" else pipe.unet


class PipelineModel:
    """The little of :class:`memfree.model.Model` that memfree's pieces and Wen's optimiser use, backed by a
    diffusers pipeline: an ε-space denoiser call, text encoding, decoding to [0, 1] images, the settings."""

    def __init__(self, guard: "Guard"):
        self.guard, self.pipe = guard, guard.pipe
        self.scheduler = SimpleNamespace(config=SimpleNamespace(
            num_train_timesteps=getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000)))
        self.prediction_type = "epsilon"   # unet() below already answers in ε
        self.settings = guard.settings
        self.extra: dict[str, Any] = {}    # added conditioning of the current call (SDXL, SD3), cond half

    @property
    def device(self) -> torch.device:
        return self.guard.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.guard.denoiser.dtype

    def eps(self, x_vp: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> SimpleNamespace:
        """ε(x, t, embeds) for a batch in the variance-preserving view (what ``branch_eps`` calls as ``unet``)."""
        g = self.guard
        x_native = g.view.from_vp(x_vp)
        kwargs = {k: _rows(v, len(x_vp)) for k, v in self.extra.items()}
        with g.bypass():
            out = g.call_denoiser(x_native.to(self.dtype), g.view.native_t(t, len(x_vp)), embeds.to(self.dtype), kwargs)
        return SimpleNamespace(sample=g.view.to_eps(out.float(), x_native.float()))

    @property
    def unet(self) -> "_EpsDenoiser":
        return _EpsDenoiser(self)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.guard.encode_text(prompts)

    def decode(self, x0: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        vae = self.pipe.vae
        z = x0.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        images = (vae.decode(z).sample.float() + 1) / 2
        return images.clamp(0, 1) if clamp else images


class _EpsDenoiser:
    """Callable like a UNet (``unet(x, t, embeds).sample``), answering in ε; its parameters are the denoiser's."""

    def __init__(self, model: PipelineModel):
        self.model = model

    def __call__(self, x, t, embeds):
        return self.model.eps(x, t, embeds)

    def parameters(self):
        return self.model.guard.denoiser.parameters()


def _rows(value, n: int):
    """The first n rows of a tensor (or of each tensor of a dict), repeated if it has one row."""
    if isinstance(value, dict):
        return {k: _rows(v, n) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != n:
        return value[:1].expand(n, *value.shape[1:]) if value.shape[0] == 1 else value[:n]
    return value


class _View:
    """Conversion between a family's native sample/prediction and the ε-space view at the current step."""

    def __init__(self, guard: "Guard"):
        self.guard = guard
        self.kind = "flow" if guard.family == "sd3" else guard.pipe.scheduler.config.prediction_type
        self.t_native = None

    def at(self, t: torch.Tensor) -> "_View":
        self.t_native = t
        if self.kind == "flow":
            sigma = min(float(t.flatten()[0]) / 1000.0, 1 - 1e-4)
            self.sigma = sigma
            self.abar = torch.tensor((1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2))
            self.k = math.sqrt(float(self.abar)) / (1 - sigma)
        else:
            acp = self.guard.pipe.scheduler.alphas_cumprod
            self.abar = acp[int(round(float(t.flatten()[0])))].float()
        return self

    def native_t(self, t, n: int):
        t = self.t_native if self.t_native is not None else t
        return t.expand(n) if isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) == 1 and n > 1 else t

    def to_vp(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k if self.kind == "flow" else x

    def from_vp(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.k if self.kind == "flow" else x

    def to_eps(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return x + (1 - self.sigma) * out
        return to_eps(self.kind, out, x, self.abar.to(x.device))

    def eps_change_to_native(self, delta: torch.Tensor) -> torch.Tensor:
        if self.kind == "flow":
            return delta / (1 - self.sigma)
        if self.kind == "v_prediction":
            return delta / self.abar.sqrt().to(delta.device)
        return delta

    def statistic(self, out_u: torch.Tensor, out_c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-image detection statistic: ‖ε_c − ε_u‖ (‖v_c − v_u‖ for flow)."""
        if self.kind == "flow":
            return (out_c - out_u).flatten(1).norm(dim=1)
        return (self.to_eps(out_c, x) - self.to_eps(out_u, x)).flatten(1).norm(dim=1)


@dataclass
class _Run:
    scores: list[torch.Tensor] = field(default_factory=list)
    first: torch.Tensor | None = None
    source: str = "free"
    calls: int = 0
    mitigated: torch.Tensor | None = None
    wen_embeds: torch.Tensor | None = None
    amg: Any = None


class Guard:
    """Hooks memfree into one pipeline; ``remove()`` takes them out again."""

    def __init__(self, pipe, mitigation: str | None = None, index=None, threshold: float | None = None,
                 settings: ModelSettings | None = None, **options):
        if mitigation not in MITIGATIONS:
            raise ValueError(f"unknown mitigation {mitigation!r}; choose one of: none (None), amg, wen")
        self.pipe, self.family = pipe, _family(pipe)
        self.denoiser = _denoiser(pipe, self.family)
        path = getattr(pipe.config, "_name_or_path", None) or getattr(pipe, "name_or_path", None)
        self.settings = settings or read_settings(Path(path) if path and Path(path).is_dir() else None)
        self.threshold = threshold if threshold is not None else self.settings.threshold
        self.mitigation, self.options = mitigation, options
        allowed = {None: set(), "wen": set(WEN_OPTIONS), "amg": {"preset", "latent_screen", *AMG_OPTIONS}}[mitigation]
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"unknown option(s) for mitigation {mitigation!r}: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(allowed)) or 'none'}")
        self.reports: list[MemorizationReport] = []   # the last call's, also when it returned a tuple
        from memfree.mitigate.amg import index_list, open_index
        self.indexes = [open_index(ix) for ix in index_list(index)] if index is not None else []
        from memfree.similarity import is_latent_index
        images_index = [ix for ix in self.indexes if not is_latent_index(ix)]
        self.index = images_index[0] if images_index else None   # the index reports name the nearest item of
        if mitigation == "amg" and not self.indexes:
            raise ValueError("amg needs an index of the images to steer away from: protect(pipe, 'amg', index=DIR)")
        if mitigation == "wen" and self.threshold is None and options.get("target") is None:
            raise ValueError("wen needs a threshold: run `memfree calibrate` on the model or pass threshold=")
        self.view = _View(self)
        self.model = PipelineModel(self)
        self._run: _Run | None = None
        self._screening: tuple | None = None
        self._bypass = False
        self._handles = [self.denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         self.denoiser.register_forward_hook(self._hook, with_kwargs=True)]
        self._original_class = type(pipe)
        guard = self

        class Protected(self._original_class):   # a subclass only to wrap __call__; remove() restores the class
            def __call__(self, *args, **kwargs):
                return guard._generate(*args, **kwargs)

        Protected.__name__ = Protected.__qualname__ = self._original_class.__name__
        pipe.__class__ = Protected
        self.removed = False

    # -- lifecycle -----------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take memfree out: the pipeline is exactly the object it was."""
        if self.removed:
            return
        for h in self._handles:
            h.remove()
        self.pipe.__class__ = self._original_class
        self.removed = True

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def bypass(self):
        """Inner denoiser calls made by memfree itself pass the hooks untouched."""
        saved, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = saved

    # -- one generation --------------------------------------------------------------------------------------
    def _generate(self, *args, **kwargs):
        self._run = _Run()
        try:
            out = self._original_class.__call__(self.pipe, *args, **kwargs)
            self.reports = self._reports(out)
            if not isinstance(out, tuple):
                out.memorization = self.reports
            return out
        finally:
            self._run = None

    def _reports(self, out) -> list[MemorizationReport]:
        run = self._run
        if run is None or run.first is None:
            return []
        scores = torch.stack(run.scores, dim=1) if run.scores else torch.empty(0)
        n = len(run.first)
        nearest = [None] * n
        if self.index is not None:
            images = _images_tensor(out[0] if isinstance(out, tuple) else getattr(out, "images", None))
            if images is not None and len(images) == n:
                images = images.to(self.denoiser.device)   # where AMG's checks ran: the embedder lives there
                from memfree.similarity import nearest_training
                nearest = nearest_training(self.index, images)
        reports = []
        for i in range(n):
            s = float(run.first[i])
            r = MemorizationReport(score=s, scores=[float(v) for v in scores[i]], threshold=self.threshold,
                                   flagged=None if self.threshold is None else s > self.threshold,
                                   mitigated=bool(run.mitigated[i]) if run.mitigated is not None else False,
                                   score_source=run.source)
            if nearest[i] is not None:
                r.nearest_id, r.similarity = nearest[i].get("id"), nearest[i].get("similarity")
            if run.amg is not None:
                from memfree.mitigate.amg import merged_summary
                r.amg = merged_summary([piece.summary(i) for piece in run.amg])
            reports.append(r)
        return reports

    # -- the hooks ------------------------------------------------------------------------------------------
    def call_denoiser(self, x, t, embeds, extra: dict):
        """One plain call of the denoiser with the pipeline's keyword conventions; returns the raw prediction."""
        if self.family == "sd3":
            out = self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False, **extra)
        else:
            out = self.denoiser(x, t, encoder_hidden_states=embeds, return_dict=False, **extra)
        return out[0]

    def _split_call(self, args, kwargs):
        """(x, t, embeds, other kwargs) of one denoiser call, whatever way the pipeline passed them."""
        kw = dict(kwargs)
        if self.family == "sd3":
            x, t = kw.pop("hidden_states", args[0] if args else None), kw.pop("timestep", None)
        else:
            x = args[0] if args else kw.pop("sample")
            t = args[1] if len(args) > 1 else kw.pop("timestep")
        embeds = kw.pop("encoder_hidden_states", args[2] if len(args) > 2 else None)
        kw.pop("return_dict", None)   # the rest (added conditioning, LoRA scale, ...) goes to memfree's own calls too
        return x, t, embeds, kw

    def _cfg(self, x: torch.Tensor) -> bool:
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and len(x) % 2 == 0

    def _pre_hook(self, module, args, kwargs):
        run = self._run
        if run is None or self._bypass or self.mitigation != "wen":
            return None
        x, t, embeds, extra = self._split_call(args, kwargs)
        if not self._cfg(x):
            return None
        half = len(x) // 2
        if run.wen_embeds is None:
            run.wen_embeds = self._wen(x[half:], t, embeds, extra)
        new_embeds = torch.cat([embeds[:half], run.wen_embeds.to(embeds.dtype)])
        if "encoder_hidden_states" in kwargs:
            return args, {**kwargs, "encoder_hidden_states": new_embeds}
        args = list(args)
        args[2] = new_embeds
        return tuple(args), kwargs

    def _wen(self, x_cond, t, embeds, extra) -> torch.Tensor:
        """Wen et al.'s optimisation of the conditional embeddings, for the images the detector flags."""
        from memfree.mitigate.wen import optimise_embeddings
        half = len(x_cond)
        cond = embeds[half:].detach().float()
        self.model.extra = {k: _rows(v[half:] if isinstance(v, torch.Tensor) and len(v) == 2 * half else v, half)
                            for k, v in extra.items()} if extra else {}
        self.view.at(t.flatten()[:1] if isinstance(t, torch.Tensor) and t.dim() else torch.as_tensor(t))
        x_T = self.view.to_vp(x_cond.float())
        with self.bypass():
            from memfree.detect import first_step_scores
            score, eps_u = first_step_scores(self._detect_model(t), cond, x_T)
        target = self.options.get("target") or self.options.get("target_scale", 0.8) * self.threshold
        gate = max(target, self.threshold) if self.threshold is not None else target
        flagged = (score.cpu() >= gate)
        self._run.mitigated = flagged.clone()
        if flagged.any():
            ids = torch.nonzero(flagged).flatten()
            trainable = [p.requires_grad for p in self.denoiser.parameters()]
            with self.bypass(), torch.enable_grad():   # pipelines run under no_grad
                new, _, _ = optimise_embeddings(self._detect_model(t), cond[ids], x_T[ids], target,
                                                self.options.get("lr", 0.05), self.options.get("max_iters", 10),
                                                uncond_eps=eps_u[ids])
            for p, flag in zip(self.denoiser.parameters(), trainable):   # leave the user's model as it was
                p.requires_grad_(flag)
            cond = cond.clone()
            cond[ids] = new.to(cond.dtype)
        return cond

    def _detect_model(self, t):
        """The pipeline model with the detection timestep pinned to this call's first timestep."""
        m = self.model
        m.settings = ModelSettings(detection={"timestep": int(round(float(torch.as_tensor(t).flatten()[0])))},
                                   guidance_scale=self.settings.guidance_scale)
        m.scheduler = SimpleNamespace(config=m.scheduler.config, alphas_cumprod=self._alphas_cumprod())
        return m

    def _alphas_cumprod(self) -> torch.Tensor:
        if self.view.kind == "flow":
            acp = torch.zeros(1001)
            acp[int(round(float(self.view.t_native.flatten()[0])))] = self.view.abar
            return acp
        return self.pipe.scheduler.alphas_cumprod

    def _hook(self, module, args, kwargs, output):
        run = self._run
        if run is None or self._bypass:
            return None
        x, t, embeds, extra = self._split_call(args, kwargs)
        raw = output[0] if isinstance(output, tuple) else output.sample
        if not self._cfg(x):
            return None
        half = len(x) // 2
        tt = t.flatten()[:1] if isinstance(t, torch.Tensor) and t.dim() else torch.as_tensor(t).flatten()[:1]
        view = self.view.at(tt)
        out_u, out_c = raw.float()[:half], raw.float()[half:]
        xf = x.float()[half:]
        stat = view.statistic(out_u, out_c, xf).cpu()
        run.scores.append(stat)
        if run.calls == 0:
            run.first = self._first_score(stat, xf, tt, embeds, extra, half)
            if run.mitigated is None:
                run.mitigated = torch.zeros(half, dtype=torch.bool)
        run.calls += 1
        if self.mitigation != "amg":
            return None
        return self._amg_step(run, output, raw, x, tt, embeds, extra, half)

    def _first_score(self, stat, x_cond, t, embeds, extra, half) -> torch.Tensor:
        """The detection score: this call's statistic when it is at the detection timestep on x_T, else one
        extra batched pass at the detection timestep on this call's input."""
        if self.family == "sd3":
            return stat
        if int(round(float(t))) == self._detection_timestep() and self._first_input_is_x_T():
            return stat
        det_t = self._detection_timestep()
        self._run.source = "extra pass"
        td = torch.tensor(det_t, device=x_cond.device)
        ext = {k: v for k, v in extra.items()}
        with self.bypass(), torch.no_grad():
            xx = torch.cat([x_cond, x_cond]).to(self.denoiser.dtype)
            out = self.call_denoiser(xx, td, embeds, ext).float()
        view = _View(self).at(td)
        return view.statistic(out[:half], out[half:], x_cond.float()).cpu()

    def _first_input_is_x_T(self) -> bool:
        """Whether the scheduler's first denoiser input is x_T itself: init_noise_sigma times the input scaling is
        1 (DDIM, PNDM: both 1; Euler: √(σ²+1) and its inverse). Checked on a fresh copy of the scheduler."""
        sched = self.pipe.scheduler
        copy = type(sched).from_config(sched.config)
        copy.set_timesteps(len(sched.timesteps))
        one = torch.ones(1)
        factor = float(copy.scale_model_input(one * copy.init_noise_sigma, copy.timesteps[0]))
        return abs(factor - 1.0) < 1e-5

    def _detection_timestep(self) -> int:
        det = self.settings.detection or {}
        if det.get("timestep") is not None:
            return int(det["timestep"])
        from diffusers import DDIMScheduler
        reference = DDIMScheduler.from_config(self.pipe.scheduler.config)
        reference.set_timesteps(REFERENCE_STEPS)
        return int(reference.timesteps[0])

    def _amg_step(self, run, output, raw, x, t, embeds, extra, half):
        from memfree.guidance import AMG, config_for_index, screening
        if run.amg is None:
            if self._screening is None:   # resolved (and a screen file read) once per guard
                overrides = {k: v for k, v in self.options.items() if k not in ("preset", "latent_screen")}
                self._screening = screening(self.indexes, self.threshold, self.options.get("latent_screen"),
                                            **overrides)
            screen, overrides = self._screening
            preset = self.options.get("preset", "amg")
            run.amg = [AMG(index=ix, config=config_for_index(preset, ix, self.threshold, **overrides),
                           first_scores=run.first, latent_screen=screen) for ix in self.indexes]
        view = self.view
        g = float(getattr(self.pipe, "guidance_scale", 1.0))
        xf = x.float()[half:]
        eps_u, eps_c = view.to_eps(raw.float()[:half], xf), view.to_eps(raw.float()[half:], xf)
        self.model.extra = {k: (v[half:] if isinstance(v, torch.Tensor) and len(v) == 2 * half else
                                {kk: vv[half:] for kk, vv in v.items()} if isinstance(v, dict) else v)
                            for k, v in extra.items()}
        guided = eps_u + g * (eps_c - eps_u)
        state = StepState(step=run.calls - 1, t=t.reshape(()), x_t=view.to_vp(xf), eps_u=eps_u, eps_c=eps_c,
                          eps=guided, alpha_bar=view.abar.to(xf.device), cond=embeds[half:].float(),
                          uncond=embeds[:half].float(), guidance_scale=g, indices=list(range(half)),
                          model=self.model)
        for piece in run.amg:   # several indexes: each piece sees the ε̂ the last one left
            piece(state)
        if state.eps is guided:
            return None
        delta = state.eps - guided
        changed = delta.flatten(1).abs().amax(dim=1) > 0
        run.mitigated |= changed.cpu()
        new = raw.clone()
        step = view.eps_change_to_native(delta) / g
        new[half:][changed] = (raw.float()[half:][changed] + step[changed]).to(raw.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token embeddings of prompts as the pipeline's denoiser takes them (the caption-duplication branch)."""
        pipe, dev = self.pipe, self.denoiser.device
        with torch.no_grad():
            if self.family == "sd":
                return pipe.encode_prompt(prompts, dev, 1, False)[0]
            if self.family == "sdxl":
                return pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)[0]
            return pipe.encode_prompt(prompts, prompts, prompts, device=dev, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]


def _images_tensor(images) -> torch.Tensor | None:
    """A pipeline's output images (PIL list, numpy or tensor) as (B, 3, H, W) in [0, 1]; None for latents."""
    if isinstance(images, list) and images and hasattr(images[0], "convert"):
        return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float() / 255
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().clamp(0, 1)
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3:
        return images.float().clamp(0, 1)
    return None


def protect(pipe, mitigation: str | None = None, index=None, threshold: float | None = None,
            settings: ModelSettings | None = None, **options) -> Guard:
    """Put memfree into a diffusers pipeline: every call then reports ``out.memorization`` (one report per
    image) and, with ``mitigation="amg"`` or ``"wen"``, mitigates. ``guard.remove()`` takes it out again.

    ``index``: a training-set index folder (memfree index build) or loaded index, or a list of them (AMG then
    steers away from each, one piece per index); AMG needs one.
    ``threshold``: the detection threshold, else the one ``memfree calibrate`` stored for the pipeline's folder.
    ``settings``: the model settings to use instead of the folder's (e.g. a calibrated ``detection`` timestep).
    ``options``: AMG's (``preset``, any AMGConfig field, and ``latent_screen``: a
    :class:`memfree.similarity.LatentScreen` or its file, the cheap latent first stage of each check; by default
    the index's own screen with the threshold's score screen, ``"off"`` for none) or wen's
    (``target``, ``target_scale``, ``lr``, ``max_iters``).
    """
    return Guard(pipe, mitigation=mitigation, index=index, threshold=threshold, settings=settings, **options)
