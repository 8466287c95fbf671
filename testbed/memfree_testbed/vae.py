"""The latent testbed's autoencoder: a small diffusers ``AutoencoderKL`` trained by memfree on the testbed's images.

64×64 RGB goes to a 4-channel 16×16 latent (4× down-sampling: three blocks, two of which down-sample).
The loss is Stable Diffusion's autoencoder loss without its GAN and perceptual terms, which need
pretrained networks: L1 + L2 reconstruction plus a KL term of weight 1e-6. The scaling factor is found
as Stable Diffusion's was: one over the standard deviation of the training latents. Resumable like
the UNet's training: a run started again in the same folder continues where it stopped, bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from memfree.images import from_uint8_signed
from memfree.io import write_text
from memfree_testbed.data import load_dataset

KL_WEIGHT = 1e-6


def make_vae(size: int = 64) -> AutoencoderKL:
    """A 0.7M-parameter ``AutoencoderKL``: 4× down-sampling to 4 latent channels, attention only in the
    16×16 middle block; narrow enough that one CPU thread trains it in about 20 minutes."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=size, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reconstruction) for images ``x`` in [-1, 1]; the latent is sampled with generator ``g``."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
    rec = vae.decode(z).sample
    loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + KL_WEIGHT * posterior.kl().mean()
    return loss, rec


def train_vae(data_dir: str | Path, out_dir: str | Path, steps: int = 2500, batch_size: int = 16, lr: float = 1e-3,
              seed: int = 0, checkpoint_every: int = 200, stop_after: int | None = None,
              quiet: bool = False) -> Path | None:
    """Train (or resume) the autoencoder on every unique image of a testbed data set; returns OUT/vae when done.

    Each step's batch depends on the seed and the step alone, so a resumed run draws what an uninterrupted
    one would. ``stop_after`` ends this call after that many steps with a checkpoint and returns None.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, manifest = load_dataset(data_dir)
    pixels = from_uint8_signed(images)
    torch.manual_seed(seed)
    vae = make_vae(manifest["size"])
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ckpt, state_path = out_dir / "vae_checkpoint.safetensors", out_dir / "vae_state.json"
    start, elapsed, log = 0, 0.0, []
    if ckpt.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        vae.load_state_dict(load_file(str(ckpt)))
        opt.load_state_dict(torch.load(out_dir / "vae_optimizer.pt", weights_only=True))
        sched.load_state_dict(state["lr_scheduler"])
        start, elapsed, log = state["step"], state["elapsed_s"], state["log"]

    def checkpoint(step: int) -> None:
        tmp = ckpt.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp))
        os.replace(tmp, ckpt)
        torch.save(opt.state_dict(), out_dir / "vae_optimizer.tmp")
        os.replace(out_dir / "vae_optimizer.tmp", out_dir / "vae_optimizer.pt")
        write_text(state_path, json.dumps({"step": step, "elapsed_s": elapsed, "lr_scheduler": sched.state_dict(),
                                           "log": log, "seed": seed, "steps": steps, "batch_size": batch_size,
                                           "lr": lr, "data": str(data_dir)}))

    vae.train()
    running = None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train vae", disable=quiet)
    for step in bar:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=g)]
        loss, _ = vae_loss(vae, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "loss": round(running, 5), "elapsed_s": round(elapsed, 1)})
        stopping = stop_after is not None and step + 1 - start >= stop_after and step + 1 < steps
        if stopping or (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
        if stopping:
            bar.close()
            return None
    vae.eval()
    with torch.no_grad():
        latents = encode_images(vae, pixels, scaling_factor=1.0)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    folder = out_dir / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    write_text(folder / "training.json", json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                                    "kl_weight": KL_WEIGHT, "train_seconds": round(elapsed, 1),
                                                    "torch": torch.__version__, "final_loss": running,
                                                    "log": log}, indent=1))
    return folder


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, scaling_factor: float | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """Posterior means of images in [-1, 1] (N, 3, H, W), times the scaling factor (the VAE's own by default)."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    out = [vae.encode(pixels[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out) * scale


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, pixels: torch.Tensor) -> dict[str, float]:
    """Mean absolute error and PSNR (on a 0..1 scale) of encode-then-decode through the posterior mean."""
    z = encode_images(vae, pixels, scaling_factor=1.0)
    rec = torch.cat([vae.decode(z[i:i + 256].to(vae.device, vae.dtype)).sample.float().cpu()
                     for i in range(0, len(z), 256)]).clamp(-1, 1)
    err = (rec - pixels) / 2
    mse = err.pow(2).mean(dim=(1, 2, 3))
    return {"mae": float(err.abs().mean()), "psnr_db": float((-10 * torch.log10(mse.clamp(min=1e-10))).mean()),
            "images": len(pixels)}
