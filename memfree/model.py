"""Open a diffusers-layout text-to-image model from a local directory, or by the name an installed package
registered it under, through one code path: a user's Stable Diffusion checkpoint (latent, with a VAE) and a
pixel-space model load the same way.

Only local files are read and only safetensors weights are accepted, never pickles.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from memfree.settings import ModelSettings, read_settings

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler,
              "euler": EulerDiscreteScheduler}
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
ENTRY_POINT_GROUP = "memfree.models"   # a package registers a model as  name = "module:function"  (returns its folder)
DEFAULT_GROUP = "memfree.default_model"  # ... and may name one of them the default when several are installed

_registered: dict[str, Callable[[], Path]] = {}


class ModelError(ValueError):
    """A model directory is missing, incomplete or holds something memfree will not load."""


def register_model(name: str, folder: str | Path | Callable[[], Path]) -> None:
    """Make ``memfree.load(name)`` and ``--model name`` open ``folder`` (a path, or a function returning one)."""
    _registered[name] = folder if callable(folder) else (lambda: Path(folder))


def unregister_model(name: str) -> None:
    """Forget a model registered in code with :func:`register_model` (entry points stay)."""
    _registered.pop(name, None)


def named_models() -> dict[str, Callable[[], Path]]:
    """Models that can be opened by name: those registered by installed packages' entry points, then in code."""
    found = {ep.name: (lambda ep=ep: Path(ep.load()())) for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **_registered}


def resolve_model(model: str | Path | None) -> tuple[Path, str | None]:
    """A model folder and its name (None for a plain path). No argument means ``$MEMFREE_MODEL``, or else the
    one named model installed, or else the one an installed package names its default."""
    names = named_models()
    if model is None:
        model = os.environ.get("MEMFREE_MODEL")
        if model is None:
            preferred = [ep.name for ep in entry_points(group=DEFAULT_GROUP) if ep.name in names]
            if len(names) != 1 and len(preferred) != 1:
                which = f"installed: {', '.join(sorted(names))}" if names else "none is installed"
                raise ModelError(f"no model given and no single named model to default to ({which}): "
                                 "pass a model folder or name, or set MEMFREE_MODEL")
            model = next(iter(names)) if len(names) == 1 else preferred[0]
    if isinstance(model, str) and model in names and not (Path(model) / "model_index.json").exists():
        return names[model](), model   # a name, unless a model folder of that name is at hand
    return Path(model), None


# Folders of these pipelines are served through memfree.protect (memfree.pipelines), not this loader.
PIPELINE_ONLY = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}


@dataclass
class Model:
    """The parts of a text-to-image diffusion model that memfree samples from and probes, and its settings.

    The settings are frozen; ``with_settings`` gives a copy that shares the weights, so changing the steps of
    one request never changes them for another.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None
    path: Path | None = None
    name: str | None = None              # the name it was opened by, None when opened by path
    settings: ModelSettings = field(default_factory=ModelSettings)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device   # diffusers' .device walks every module: slow per step

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype   # diffusers' .dtype walks every parameter: slow per step

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def label(self) -> str:
        """A name to show people: the registered name, or the folder's name (never a full path)."""
        return self.name or (self.path.name if self.path is not None else "model")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of x_t: latents for a VAE model, pixels for a pixel-space model."""
        s = self.unet.config.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (self.unet.config.in_channels, *s)

    def with_settings(self, **changes) -> "Model":
        """A copy with some settings changed (``num_inference_steps``, ``guidance_scale``, ``detection``)."""
        return replace(self, settings=replace(self.settings, **changes))

    def with_scheduler(self, name: str) -> "Model":
        """A copy that samples with another sampler (``ddim``, ``ddpm``, ``dpm``, ``euler``), same noise schedule."""
        return replace(self, scheduler=make_scheduler(name, self.scheduler.config))

    def new_scheduler(self):
        """A fresh scheduler of the model's kind and config: every sampling run steps one of its own."""
        return type(self.scheduler).from_config(self.scheduler.config)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the encoder's length; over-long prompts are cut (the caller warns)."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Per-token text embeddings (B, L, D), the UNet's cross-attention input."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def decode(self, x0: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model space to images (B, 3, H, W) in [0, 1], through the VAE when there is one. ``clamp=False``
        keeps out-of-range values, so that gradients pass (AMG's dissimilarity term)."""
        if self.vae is not None:
            x0 = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = (x0.float() + 1) / 2
        return images.clamp(0, 1) if clamp else images


def make_scheduler(name: str, config) -> DDIMScheduler:
    if name not in SCHEDULERS:
        raise ModelError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def _check_dir(path: Path) -> None:
    if not path.exists():
        names = sorted(named_models())
        known = f" (named models: {', '.join(names)})" if names else ""
        raise ModelError(f"model directory {path} does not exist, nor is it a named model{known}")
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory; pass a diffusers-layout model directory")
    if not (path / "model_index.json").exists():
        raise ModelError(f"{path} has no model_index.json, so it is not a diffusers-layout model directory")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path / 'model_index.json'} is not valid JSON: {e}") from e
    if not isinstance(index, dict):
        raise ModelError(f"{path / 'model_index.json'} must hold a JSON object, not {type(index).__name__}")
    if index.get("_class_name") in PIPELINE_ONLY:
        raise ModelError(f"{path} is a {index['_class_name']} folder, which memfree's own sampling loop does not run: "
                         "protect the pipeline with memfree.protect(DiffusionPipeline.from_pretrained(path)); "
                         "`memfree detect --model PATH` opens it that way")
    for part in REQUIRED + (("vae",) if (path / "vae").exists() else ()):
        if not (path / part).is_dir():
            raise ModelError(f"{path} lacks the {part}/ folder that a text-to-image model needs")
        if part in ("unet", "text_encoder", "vae"):
            files = list((path / part).glob("*.safetensors"))
            if not files:
                pickles = [p.name for p in (path / part).glob("*.bin")] + [p.name for p in (path / part).glob("*.ckpt")]
                hint = f" (found {', '.join(pickles)}: memfree does not load pickled weights)" if pickles else ""
                raise ModelError(f"{path / part} holds no .safetensors weights{hint}")


@contextlib.contextmanager
def quiet_loading():
    """Silence the loaders' per-load chatter (accelerate hints, weight-loading bars) for this load only."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in (dlog, tlog)]
    for log, _, _ in saved:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level, bars in saved:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


def _load_tokenizer(path: Path) -> CLIPTokenizer:
    folder = path / "tokenizer"
    if not any(folder.iterdir()):
        raise ModelError(f"{folder} is empty: a CLIP tokenizer needs its vocab.json and merges.txt")
    try:
        return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except Exception as e:   # a broken tokenizer folder fails in many ways inside transformers
        raise ModelError(f"the tokenizer in {folder} could not be read ({type(e).__name__}: {e})") from e


def _load_part(cls, path: Path, part: str, **kw):
    """One weighted part, refused when its file's tensors do not fit its config (missing, unexpected or
    misshapen weights would otherwise be filled in at random and sample garbage without a word)."""
    module, info = cls.from_pretrained(path, subfolder=part, output_loading_info=True, **kw)
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        said = "; ".join(f"{len(v)} {k.replace('_keys', '')} (e.g. {v[0]})" for k, v in problems.items() if v)
        raise ModelError(f"the weights in {path / part} do not belong to its config: {said}")
    return module


def load(model: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, scheduler: str = "ddim") -> Model:
    """Load a model for sampling and probing: a local diffusers-layout folder, or a named model.

    Without an argument: ``$MEMFREE_MODEL``, or the one named model installed. Weights are read from safetensors
    only, with no network access; the sampler is rebuilt from the stored scheduler config as ``scheduler``.
    """
    path, name = resolve_model(model)
    _check_dir(path)
    kw = dict(local_files_only=True, use_safetensors=True)
    try:
        with quiet_loading():
            unet = _load_part(UNet2DConditionModel, path, "unet", torch_dtype=dtype, **kw)
            text_encoder = _load_part(CLIPTextModel, path, "text_encoder", dtype=dtype, **kw)
            tokenizer = _load_tokenizer(path)
            vae = (_load_part(AutoencoderKL, path, "vae", torch_dtype=dtype, **kw)
                   if (path / "vae").exists() else None)
            stored = DDIMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
        settings = read_settings(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not load the model in {path}: {e}") from e
    return Model(unet=unet.to(device).eval().requires_grad_(False),
                 text_encoder=text_encoder.to(device).eval().requires_grad_(False),
                 tokenizer=tokenizer, scheduler=make_scheduler(scheduler, stored),
                 vae=vae.to(device).eval().requires_grad_(False) if vae is not None else None,
                 path=path, name=name, settings=settings)
