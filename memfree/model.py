"""Open a diffusers-layout text-to-image model from a local directory: a user's Stable Diffusion
checkpoint (latent, with a VAE) or memfree's own pixel-space testbed, through the same code path.

Only local files are read and only safetensors weights are accepted, never pickles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler,
              "euler": EulerDiscreteScheduler}
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


class ModelError(ValueError):
    """A model directory is missing, incomplete or holds something memfree will not load."""


def bundled_model_path() -> Path:
    """The testbed model that ships inside the package (the default of every command)."""
    return Path(str(resources.files("memfree.testbed").joinpath("model")))


@dataclass
class Model:
    """The parts of a text-to-image diffusion model that memfree samples from and probes."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None
    path: Path | None = None
    defaults: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of x_t: latents for a VAE model, pixels for a pixel-space model."""
        s = self.unet.config.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (self.unet.config.in_channels, *s)

    @property
    def num_inference_steps(self) -> int:
        return int(self.defaults.get("num_inference_steps", 50))

    @property
    def guidance_scale(self) -> float:
        return float(self.defaults.get("guidance_scale", 7.5))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids padded to the encoder's length; over-long prompts are cut (the caller warns)."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Per-token text embeddings (B, L, D), the UNet's cross-attention input."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space to images in [0, 1], (B, 3, H, W): through the VAE when there is one."""
        if self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return ((x0.float() + 1) / 2).clamp(0, 1)

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler, keeping the trained noise schedule (``ddim``, ``ddpm``, ``dpm``, ``euler``)."""
        self.scheduler = make_scheduler(name, self.scheduler.config)


def make_scheduler(name: str, config) -> DDIMScheduler:
    if name not in SCHEDULERS:
        raise ModelError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory; pass a diffusers-layout model directory")
    if not (path / "model_index.json").exists():
        raise ModelError(f"{path} has no model_index.json, so it is not a diffusers-layout model directory")
    try:
        json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path / 'model_index.json'} is not valid JSON: {e}") from e
    for part in REQUIRED + (("vae",) if (path / "vae").exists() else ()):
        if not (path / part).is_dir():
            raise ModelError(f"{path} lacks the {part}/ folder that a text-to-image model needs")
        if part in ("unet", "text_encoder", "vae"):
            files = list((path / part).glob("*.safetensors"))
            if not files:
                pickles = [p.name for p in (path / part).glob("*.bin")] + [p.name for p in (path / part).glob("*.ckpt")]
                hint = f" (found {', '.join(pickles)}: memfree does not load pickled weights)" if pickles else ""
                raise ModelError(f"{path / part} holds no .safetensors weights{hint}")


def _quiet_loaders() -> None:
    """Silence the loaders' per-load chatter (accelerate hints, weight-loading bars)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()


def load(path: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, scheduler: str = "ddim") -> Model:
    """Load a local diffusers-layout model (default: the bundled testbed) for sampling and probing.

    Weights are read from safetensors only, with no network access; the sampler is rebuilt from the
    stored scheduler config as ``scheduler`` (DDIM by default).
    """
    path = Path(path) if path is not None else bundled_model_path()
    _check_dir(path)
    kw = dict(local_files_only=True, use_safetensors=True)
    _quiet_loaders()
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        vae = (AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
               if (path / "vae").exists() else None)
        stored = DDIMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not load the model in {path}: {e}") from e
    defaults = json.loads((path / "memfree.json").read_text()) if (path / "memfree.json").exists() else {}
    model = Model(unet=unet.to(device).eval().requires_grad_(False),
                  text_encoder=text_encoder.to(device).eval().requires_grad_(False),
                  tokenizer=tokenizer, scheduler=make_scheduler(scheduler, stored),
                  vae=vae.to(device).eval().requires_grad_(False) if vae is not None else None,
                  path=path, defaults=defaults)
    return model
