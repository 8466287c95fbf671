"""Train the testbed: a pixel-space text-to-image UNet with a small CLIP text encoder, from scratch.

The recipe is the ordinary one (epsilon prediction, cosine noise schedule, AdamW, EMA, 10% caption
dropout for classifier-free guidance). Memorization is not forced by the loss: it comes from the
data, where planted images and captions repeat. Checkpoints are written atomically every few hundred
steps and a run started again with the same folder resumes where it stopped, bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from memfree.images import from_uint8, from_uint8_signed
from memfree.io import write_text
from memfree_testbed.data import load_dataset
from memfree.tokenizer import build_clip_tokenizer

TEXT_DIM = 64
GUIDANCE_SCALE = 2.0  # sampling default written to memfree.json (chosen by a sweep, README)


PIXEL_CHANNELS = (32, 64, 96, 128)
LATENT_CHANNELS = (48, 64, 96, 128)   # the latent testbed's UNet: 16×16×4 latents, a wider first block


def make_unet(size: int = 32, in_channels: int = 3,
              block_out_channels: tuple[int, ...] = PIXEL_CHANNELS) -> UNet2DConditionModel:
    """A 5.4M-parameter UNet (pixel space by default; ``in_channels=4`` for VAE latents); cross-attention
    only in the two lowest-resolution blocks where it is cheap on a CPU, plus a pooled text embedding added
    to the time embedding (diffusers' ``addition_embed_type="text"``) so that every resnet, at every
    resolution, sees the caption."""
    return UNet2DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def make_text_encoder(token_init_std: float = 1.0) -> CLIPTextModel:
    """A small CLIP text transformer over the real 49,408-token CLIP vocabulary.

    Token embeddings start at ``token_init_std`` rather than CLIP's 0.02. At 0.02 every word starts
    nearly the same vector, and a word the UNet could only use through spatial cross-attention
    ("left", "top") never became distinct: the earlier v2 model, trained so, ignores position words.
    At 1.0 words start distinct and the UNet learns placement; the bundled model was trained so (README).
    """
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=TEXT_DIM,
    ))
    with torch.no_grad():
        encoder.embeddings.token_embedding.weight.normal_(std=token_init_std)
    return encoder


def train_scheduler(latent: bool = False) -> DDPMScheduler:
    """Cosine-schedule ε-prediction; x̂0 is clipped to [-1, 1] in pixel space only (latents run past 1)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=not latent)


def _space(pixels: torch.Tensor, vae_dir: str | Path | None) -> tuple[torch.Tensor, AutoencoderKL | None]:
    """What the UNet learns to denoise: the pixels, or their VAE latents (posterior means × scaling factor)."""
    if vae_dir is None:
        return pixels, None
    from memfree_testbed.vae import encode_images
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    return encode_images(vae, pixels), vae


def _make_parts(sample: torch.Tensor, token_init_std: float) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """The UNet for samples shaped like ``sample`` (C, H, W) and the text encoder."""
    channels, size = sample.shape[0], sample.shape[-1]
    unet = make_unet(size, channels, PIXEL_CHANNELS if channels == 3 else LATENT_CHANNELS)
    return unet, make_text_encoder(token_init_std)


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·weights, in one fused call (a per-tensor loop is launch-bound on a GPU)."""
    with torch.no_grad():
        state = model.state_dict()
        floats = [k for k, p in state.items() if p.dtype.is_floating_point]
        torch._foreach_lerp_([ema[k] for k in floats], [state[k] for k in floats], 1 - decay)
        for k, p in state.items():
            if not p.dtype.is_floating_point:
                ema[k].copy_(p)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _part(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """One model's state dict out of a checkpoint, whose keys are prefixed ``name.``."""
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}


def draw_batch(step: int, seed: int, pixels: torch.Tensor, image_ids: torch.Tensor, ids_all: torch.Tensor,
               empty_ids: torch.Tensor, batch_size: int, caption_dropout: float, scheduler, device: str
               ) -> tuple[torch.Tensor, ...]:
    """Training step ``step``'s batch, noised: (x_t, noise, t, token ids, picked items, caption dropped). It
    depends on the seed and the step alone (a generator per step), so a resumed run draws exactly what an
    uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    pick = torch.randint(0, len(image_ids), (batch_size,), generator=g)
    x0 = pixels[image_ids[pick]]
    ids = ids_all[pick].clone()
    drop = torch.rand(batch_size, generator=g) < caption_dropout
    ids[drop] = empty_ids
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
    x0 = x0.to(device).contiguous(memory_format=torch.channels_last)
    noise, t, ids = noise.to(device), t.to(device), ids.to(device)
    return scheduler.add_noise(x0, noise, t), noise, t, ids, pick, drop


def train(data_dir: str | Path, out_dir: str | Path, steps: int = 10000, batch_size: int = 32,
          lr: float = 1e-3, seed: int = 0, caption_dropout: float = 0.1, ema_decay: float = 0.999,
          checkpoint_every: int = 200, log_every: int = 50, quiet: bool = False, keep_mask_fn=None,
          stop_after: int | None = None, device: str = "cpu", guidance_scale: float = GUIDANCE_SCALE,
          token_init_std: float = 1.0, vae_dir: str | Path | None = None) -> Path | None:
    """Train (or resume) a testbed model into ``out_dir``; returns the exported model directory.

    ``keep_mask_fn(unet, x_t, t, cond, uncond, eps_cond=pred) -> bool mask`` optionally filters samples
    out of the loss (training-time mitigation); it is handed the step's own conditional prediction so
    that only the unconditional half costs an extra call. A batch with no survivor skips the optimiser step.
    ``stop_after`` ends this call after that many steps with a checkpoint (a time-boxed run) and
    returns None; calling again resumes. ``device`` ("cpu", "cuda") is where the steps run; the random
    streams are drawn on the CPU either way, so a run is the same recipe on every device.
    ``guidance_scale`` is the sampling default written into the model's ``memfree.json``;
    ``token_init_std`` is the text encoder's token-embedding init (0.02 reproduces the earlier v2 model).
    ``vae_dir``: a trained autoencoder (memfree_testbed.vae); the UNet then learns its latents and the
    exported model is a Stable Diffusion folder with that VAE.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, manifest = load_dataset(data_dir)
    pixels, vae = _space(from_uint8_signed(images), vae_dir)
    items = manifest["train"]
    image_ids = torch.tensor([t["image"] for t in items])
    kinds = sorted({t.get("kind", "ordinary") for t in items})
    kind_ids = torch.tensor([kinds.index(t.get("kind", "ordinary")) for t in items])
    seen, kept = torch.zeros(len(kinds)), torch.zeros(len(kinds))  # the filter's tally since the last log

    tok_dir = out_dir / "tokenizer_build"
    # A saved tokenizer (written last by the build, or copied in from a model) is reused as it is.
    tokenizer = build_clip_tokenizer(tok_dir) if not (tok_dir / "tokenizer_config.json").exists() \
        else CLIPTokenizer.from_pretrained(tok_dir)
    enc = tokenizer([t["caption"] for t in items], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt")
    ids_all = enc.input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids[0]

    torch.manual_seed(seed)
    unet, text_encoder = _make_parts(pixels[0], token_init_std)
    unet = unet.to(device, memory_format=torch.channels_last)  # about 7% faster convolutions on CPU
    text_encoder = text_encoder.to(device)
    scheduler = train_scheduler(latent=vae is not None)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_text = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}

    ckpt, state_path = out_dir / "checkpoint.safetensors", out_dir / "train_state.json"
    start, elapsed, log = 0, 0.0, []
    if ckpt.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        tensors = load_file(str(ckpt))
        unet.load_state_dict(_part(tensors, "unet"))
        text_encoder.load_state_dict(_part(tensors, "text"))
        ema_unet = {k: v.to(device) for k, v in _part(tensors, "ema_unet").items()}
        ema_text = {k: v.to(device) for k, v in _part(tensors, "ema_text").items()}
        opt_state = torch.load(out_dir / "optimizer.pt", weights_only=True, map_location=device)
        opt.load_state_dict(opt_state)
        sched.load_state_dict(state["lr_scheduler"])
        start, elapsed, log = state["step"], state["elapsed_s"], state["log"]

    def checkpoint(step: int) -> None:
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        tensors |= {f"text.{k}": v for k, v in text_encoder.state_dict().items()}
        tensors |= {f"ema_unet.{k}": v for k, v in ema_unet.items()}
        tensors |= {f"ema_text.{k}": v for k, v in ema_text.items()}
        _atomic_save(tensors, ckpt)
        torch.save(opt.state_dict(), out_dir / "optimizer.tmp")
        os.replace(out_dir / "optimizer.tmp", out_dir / "optimizer.pt")
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "elapsed_s": elapsed, "lr_scheduler": sched.state_dict(),
                                   "log": log, "seed": seed, "steps": steps, "batch_size": batch_size,
                                   "lr": lr, "token_init_std": token_init_std, "guidance_scale": guidance_scale,
                                   "data": str(data_dir), "vae": None if vae_dir is None else str(vae_dir)}))
        os.replace(tmp, state_path)

    unet.train(), text_encoder.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train testbed", disable=quiet)
    running = None
    for step in bar:
        t0 = time.perf_counter()
        x_t, noise, t, ids, pick, drop = draw_batch(step, seed, pixels, image_ids, ids_all, empty_ids, batch_size,
                                        caption_dropout, scheduler, device)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(x_t, t, cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        keep = None
        if keep_mask_fn is not None:
            with torch.no_grad():
                uncond = text_encoder(empty_ids[None].expand(batch_size, -1).to(device)).last_hidden_state
                keep = keep_mask_fn(unet, x_t, t, cond.detach(), uncond, eps_cond=pred.detach()).float()
            loss = (per_sample * keep).sum() / keep.sum().clamp(min=1)
            captioned = kind_ids[pick][~drop]  # a dropped caption scores 0 and is always kept
            seen += torch.bincount(captioned, minlength=len(kinds))
            kept += torch.bincount(captioned, weights=keep.cpu()[~drop], minlength=len(kinds))
        else:
            loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        if keep is None or keep.sum() > 0:  # a batch with no survivor skips the optimiser step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        elapsed += time.perf_counter() - t0
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % log_every == 0:
            log.append({"step": step + 1, "loss": round(running, 5), "elapsed_s": round(elapsed, 1)})
            if keep_mask_fn is not None:  # share of each kind's captioned samples the filter kept
                log[-1]["kept"] = {k: round(float(kept[i] / seen[i]), 3) for i, k in enumerate(kinds) if seen[i]}
                seen.zero_(), kept.zero_()
        stopping = stop_after is not None and step + 1 - start >= stop_after and step + 1 < steps
        if stopping or (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
        if stopping:
            bar.close()
            return None
    unet.load_state_dict(ema_unet)
    text_encoder.load_state_dict(ema_text)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "ema_decay": ema_decay,
            "token_init_std": token_init_std,
            "caption_dropout": caption_dropout, "train_seconds": round(elapsed, 1),
            "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
            if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "torch": torch.__version__, "final_loss": running, "log": log}
    return export_model(out_dir / "model", unet, text_encoder, tokenizer, manifest, info, guidance_scale, vae)


def export_checkpoint(run_dir: str | Path, model_dir: str | Path | None = None) -> Path:
    """Export the EMA weights of a run's latest checkpoint as a model, without touching the run.

    For a look at a run that is still going or was stopped: the model says at which step it was
    taken. The run's LR schedule still decays to its full length, so this is a preview, not the
    model the finished run exports (for a finished run it is the same weights).
    """
    run_dir = Path(run_dir)
    state = json.loads((run_dir / "train_state.json").read_text())
    images, manifest = load_dataset(state["data"])
    space, vae = _space(from_uint8_signed(images[:1]), state.get("vae"))
    tensors = load_file(str(run_dir / "checkpoint.safetensors"))
    unet, text_encoder = _make_parts(space[0], state.get("token_init_std", 1.0))
    unet.load_state_dict(_part(tensors, "ema_unet"))
    text_encoder.load_state_dict(_part(tensors, "ema_text"))
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "tokenizer_build")
    info = {k: state[k] for k in ("seed", "steps", "batch_size", "lr") if k in state}
    info |= {"checkpoint_step": state["step"], "train_seconds": round(state["elapsed_s"], 1), "log": state["log"]}
    model_dir = Path(model_dir) if model_dir else run_dir / f"model-step{state['step']}"
    return export_model(model_dir, unet, text_encoder, tokenizer, manifest, info,
                        state.get("guidance_scale", GUIDANCE_SCALE), vae)


def export_model(model_dir: Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, manifest: dict, info: dict, guidance_scale: float = GUIDANCE_SCALE,
                 vae: AutoencoderKL | None = None) -> Path:
    """Save a diffusers-layout directory (the UNet in fp16 safetensors to keep the package small).

    With a ``vae`` the folder is a complete Stable Diffusion folder that ``StableDiffusionPipeline.
    from_pretrained`` opens without memfree; its text encoder stays fp32, because transformers loads a
    checkpoint in its saved dtype while diffusers loads fp32, and a pipeline of mixed dtypes fails.
    Without a VAE, a pixel-space model only memfree samples.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    latent = vae is not None
    unet.to(torch.float16).save_pretrained(model_dir / "unet", safe_serialization=True)
    text_encoder.to(torch.float32 if latent else torch.float16).save_pretrained(model_dir / "text_encoder",
                                                                               safe_serialization=True)
    unet.to(torch.float32), text_encoder.to(torch.float32)
    tokenizer.save_pretrained(model_dir / "tokenizer")
    DDIMScheduler.from_config(train_scheduler(latent).config, clip_sample=not latent,
                              set_alpha_to_one=True).save_pretrained(model_dir / "scheduler")
    import diffusers
    parts = {"scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"]}
    if latent:
        vae.save_pretrained(model_dir / "vae", safe_serialization=True)
        index = {"_class_name": "StableDiffusionPipeline", **parts, "vae": ["diffusers", "AutoencoderKL"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
                 "requires_safety_checker": False}
    else:
        index = {"_class_name": "MemfreePixelPipeline", **parts, "vae": [None, None]}
    write_text(model_dir / "model_index.json", json.dumps(
        {"_class_name": index.pop("_class_name"), "_diffusers_version": diffusers.__version__, **index}, indent=2))
    write_text(model_dir / "memfree.json", json.dumps({
        "kind": "testbed-latent" if latent else "testbed", "resolution": manifest["size"], "num_inference_steps": 50,
        "guidance_scale": guidance_scale, "training": info}, indent=2))
    return model_dir


def finish_model(model_dir: str | Path, data_dir: str | Path, quiet: bool = False,
                 embedder_path: str | Path | None = None) -> dict:
    """Attach the data set's ground truth, a freshly trained alignment probe and the training-set index to a
    testbed model. A latent model gets a compact ground truth (its ordinary renders are drawn again from the
    recipe); with ``embedder_path`` (a copy-detection TorchScript file) the index is that embedder's."""
    from memfree_testbed.bundle import attach_ground_truth
    from memfree_testbed.probe import accuracy, save_probe, train_probe
    from memfree_testbed.render import all_compositions, render, style_of

    model_dir = Path(model_dir)
    root = attach_ground_truth(model_dir, Path(data_dir), compact=(model_dir / "vae").exists())
    manifest = json.loads((root / "manifest.json").read_text())
    held = manifest["heldout_compositions"]
    held_keys = {json.dumps(h, sort_keys=True) for h in held}
    seen = [c for c in all_compositions() if json.dumps(c, sort_keys=True) not in held_keys]
    t0 = time.perf_counter()
    style = style_of(manifest)
    probe = train_probe(seen, size=manifest["size"], seed=manifest["seed"], quiet=quiet, style=style)
    rng = np.random.default_rng(manifest["seed"] + 7)
    truth = held * 4
    acc = accuracy(probe.predict(from_uint8(np.stack([render(a, rng, manifest["size"], style) for a in truth]))), truth)
    info = {"probe_accuracy": acc["mean"], "probe_accuracy_all_attributes": acc["all"],
            "probe_train_seconds": round(time.perf_counter() - t0, 1),
            "probe_trained_on": "fresh renders of the training compositions only"}
    save_probe(probe, root, info)
    attach_index(model_dir, data_dir, embedder_path, quiet)
    return info


def attach_index(model_dir: str | Path, data_dir: str | Path, embedder_path: str | Path | None = None,
                 quiet: bool = False) -> dict | None:
    """Build a testbed model's own index: of pixels, or of a copy-detection embedder, which is then copied into
    ``<model>/embedder/``, measured on the data (``<model>/testbed/embedder.json``) and used by cosine."""
    from memfree_testbed.bundle import build_testbed_index
    model_dir = Path(model_dir)
    if embedder_path is None:
        build_testbed_index(model_dir, progress=not quiet)
        return None
    from memfree.index import TorchScriptEmbedder
    from memfree.similarity import write_index_tuning
    from memfree_testbed.embedder import evaluate_copy_detection
    target = model_dir / "embedder" / "copy-embedder.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(embedder_path).resolve() != target.resolve():
        shutil.copyfile(embedder_path, target)
    size = json.loads((model_dir / "testbed" / "manifest.json").read_text())["size"]
    embedder = TorchScriptEmbedder(target, size=size)
    quality = evaluate_copy_detection(embedder, data_dir)
    write_text(model_dir / "testbed" / "embedder.json", json.dumps(quality, indent=1))
    build_testbed_index(model_dir, progress=not quiet, embedder=embedder)
    write_index_tuning(model_dir / "index", copy_threshold=quality["copy_threshold"])
    return quality
