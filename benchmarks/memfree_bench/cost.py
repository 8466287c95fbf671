"""`memfree bench cost`: what protection costs at the real size.

The pipelines are the real architectures (Stable Diffusion 1.5, 2.1, XL and 3-medium), assembled from
configurations written here with random weights: nothing is downloaded, and a forward pass costs the same
whatever the weights are. Parameters are created without their initialisers (which would take minutes for
billions of parameters on a CPU) and then filled with small random values, so every pass is a real one.
The copy-detection embedder has SSCD's size (a ResNet-50 trunk, GeM pooling, a 512-d projection, input
320²), saved as TorchScript and loaded with memfree's :class:`~memfree.index.TorchScriptEmbedder`; the
index holds a million random unit vectors in the FAISS index memfree would build for that many (IVF+PQ).

Methods, each a call of the user's own pipeline:

* ``none``: the pipeline alone;
* ``detect``: ``memfree.protect(pipe)``, the first-step detection score;
* ``wen``: ``protect(pipe, "wen", threshold=...)`` with a threshold every image passes and a target it never
  reaches, so the optimisation runs all of its ``max_iters`` (2 here; memfree's default is 10, and on a real
  prompt it stops once the score is under the target);
* ``amg-clean``: ``protect(pipe, "amg", index=...)`` with a gate and a watch level no similarity reaches
  (above 1): what an ordinary prompt pays, the checks of the cadence (every ``check_every``-th step, 4) and the
  nearest-neighbour report at the end;
* ``amg-fired``: the gate always fires (``always_on=True``): after the first check every step is checked and
  guided with the three terms of the cosine preset (the caption-deduplication branch included);
* ``amg-screened``: ``amg-clean`` behind both screens, as an ordinary prompt meets them: the first-step score
  under its threshold and x̂0 never near any of ``SCREEN_LATENTS`` training latents (a
  :class:`memfree.similarity.LatentScreen`, pooled to 8×8), so each call pays the latent comparison only.

All methods are timed in one run, round-robin, the order reversed every round, so a slow spell of a busy
machine falls on all of them; a method's ratio is its time over ``none``'s in the same round, median over
rounds. The components are timed on their own: one guided denoiser call (the batch of two of classifier-free
guidance), a VAE decode, the embedder forward and forward+backward, the decode forward+backward (AMG's
dissimilarity gradient goes through it) and the search of one query.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("tiny", "sd15", "sd21", "sdxl", "sd3")
NATIVE_RESOLUTION = {"tiny": 64, "sd15": 512, "sd21": 768, "sdxl": 1024, "sd3": 1024}
METHODS = ("none", "detect", "wen", "amg-clean", "amg-fired", "amg-screened")
SCREEN_LATENTS = 100_000   # training latents of the latent screen (random, far from anything the pipeline makes)
PROMPT = "a photograph of an astronaut riding a horse on a beach at sunset"
WEN_MAX_ITERS = 2
NEVER = 1.01   # above any cosine: a gate / watch level that an ordinary prompt's similarity never reaches

# Known figures of one H100 in fp16 at SD 1.5 size (the physical measurements), in seconds.
H100_SD15 = {"unet_call": 0.0296, "vae_decode": 0.0221, "embed": 0.0047, "image_50_steps": 1.6}


# -- random models of the real configurations --------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device, so initialisers cost nothing; buffers
    (position ids, sinusoidal tables) are made for real. :func:`_materialise` then gives them values."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _materialise(module: nn.Module, device, dtype, seed: int = 0) -> nn.Module:
    """Give every meta parameter storage on ``device`` and small random values: weights uniform in
    ±1/√fan_in, normalisation layers 1 and 0, other vectors (biases) 0. Buffers move to ``device`` and
    floating ones take ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) in done:              # tied weights stay tied
                mod._parameters[name] = done[id(p)]
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if is_norm:
                t.fill_(1.0 if name == "weight" else 0.0)
            elif t.dim() >= 2:
                bound = 1.0 / math.sqrt(max(1, t[0].numel()))
                t.uniform_(-bound, bound, generator=gen)
            else:
                t.zero_()
            new = nn.Parameter(t, requires_grad=p.requires_grad)
            done[id(p)] = new
            mod._parameters[name] = new
    return module.to(device=device, dtype=dtype)    # buffers too, as from_pretrained(torch_dtype=...) does


def _clip_text(hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                            projection_dim=projection or 768)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _sd_vae(latent_channels: int = 4, scaling: float = 0.18215, **extra):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scaling, **extra)


def _parts(arch: str, tokenizer) -> tuple[type, dict]:
    """The pipeline class and its parts (parameters still on meta) of one architecture."""
    import diffusers as d
    sd_scheduler = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        set_alpha_to_one=False)
    no_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if arch == "tiny":      # tests/conftest.py's tiny SD-1.x shape
        unet = d.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = d.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              norm_num_groups=8, sample_size=16)
        text = _clip_text(32, 2, 4)
        scheduler = d.PNDMScheduler(skip_prk_steps=True, **sd_scheduler)
        return d.StableDiffusionPipeline, dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                scheduler=scheduler, **no_checker)
    if arch == "sd15":
        unet = d.UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                      cross_attention_dim=768, attention_head_dim=8)
        scheduler = d.PNDMScheduler(skip_prk_steps=True, **sd_scheduler)
        return d.StableDiffusionPipeline, dict(vae=_sd_vae(), text_encoder=_clip_text(768, 12, 12), tokenizer=tokenizer,
                                                unet=unet, scheduler=scheduler, **no_checker)
    if arch == "sd21":      # 768-v: OpenCLIP-H text tower (CLIP layout), v prediction, DDIM
        unet = d.UNet2DConditionModel(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                      cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                      use_linear_projection=True, upcast_attention=True)
        scheduler = d.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **sd_scheduler)
        return d.StableDiffusionPipeline, dict(vae=_sd_vae(), text_encoder=_clip_text(1024, 23, 16, act="gelu"),
                                                tokenizer=tokenizer, unet=unet, scheduler=scheduler, **no_checker)
    if arch == "sdxl":
        unet = d.UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        scheduler = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading")
        return d.StableDiffusionXLPipeline, dict(
            vae=_sd_vae(scaling=0.13025), text_encoder=_clip_text(768, 12, 12),
            text_encoder_2=_clip_text(1280, 32, 20, projection=1280, act="gelu"),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    if arch == "sd3":       # SD3-medium without T5 (text_encoder_3=None: its 256 token slots are zeros)
        transformer = d.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        vae = _sd_vae(latent_channels=16, scaling=1.5305, shift_factor=0.0609, use_quant_conv=False,
                      use_post_quant_conv=False)
        return d.StableDiffusion3Pipeline, dict(
            transformer=transformer, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=_clip_text(768, 12, 12, projection=768),
            text_encoder_2=_clip_text(1280, 32, 20, projection=1280, act="gelu"),
            tokenizer=tokenizer, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def build_pipeline(arch: str, cache: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A diffusers pipeline of ``arch`` with random weights, on ``device`` in ``dtype`` (VAE included)."""
    from memfree.tokenizer import build_clip_tokenizer
    tok_dir = Path(cache) / "clip-tokenizer"
    if (tok_dir / "tokenizer_config.json").exists():
        from transformers import CLIPTokenizer
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = build_clip_tokenizer(tok_dir)
    with _parameters_on_meta():
        klass, parts = _parts(arch, tokenizer)
    for i, part in enumerate(parts.values()):
        if isinstance(part, nn.Module):
            _materialise(part, device, dtype, seed + i).eval()
    pipe = klass(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- an embedder of SSCD's size ----------------------------------------------------------------------------
class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class CopyEmbedder(nn.Module):
    """SSCD's shape: a ResNet trunk (ResNet-50 by default), GeM pooling (p = 3), a linear projection."""

    def __init__(self, depths=(3, 4, 6, 3), base: int = 64, dim: int = 512, p: float = 3.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], base
        for stage, depth in enumerate(depths):
            width = base * 2 ** stage
            for b in range(depth):
                blocks.append(_Bottleneck(cin, width, 2 if (b == 0 and stage > 0) else 1))
                cin = 4 * width
        self.trunk = nn.Sequential(*blocks)
        self.p = p
        self.project = nn.Linear(cin, dim)
        for m in self.modules():    # keep the random activations in range through the residual stages
            if isinstance(m, _Bottleneck):
                nn.init.constant_(m.bn3.weight, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(self.stem(x))
        x = x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)   # GeM
        return self.project(x)


EMBEDDERS = {"sscd": dict(depths=(3, 4, 6, 3), base=64, size=320),      # ResNet-50 at 320²: SSCD's size
             "tiny": dict(depths=(1, 1, 1, 1), base=8, size=64)}


def build_embedder(cache: Path, kind: str = "sscd", device: str = "cpu"):
    """The embedder as memfree loads a copy-detection model: a TorchScript file read by TorchScriptEmbedder."""
    from memfree.index import TorchScriptEmbedder
    spec = EMBEDDERS[kind]
    path = Path(cache) / f"embedder-{kind}.pt"
    if not path.exists():
        from memfree.io import atomic_write
        torch.manual_seed(0)
        model = CopyEmbedder(spec["depths"], spec["base"]).eval()
        with warnings.catch_warnings():   # TorchScript is deprecated in torch 2.13, yet SSCD ships as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: scripted.save(str(p)))
    emb = TorchScriptEmbedder(path, size=spec["size"])
    return emb if torch.device(device).type == "cpu" else _OnDevice(emb.to(device), device)


class _OnDevice:
    """An embedder whose model sits on an accelerator: inputs (also protect's end-of-call report, made from
    the PIL images on the CPU) are moved to it first. Everything else is the wrapped embedder's."""

    def __init__(self, inner, device):
        self.inner, self.device = inner, torch.device(device)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.to(self.device))


# -- an index of a million random vectors ------------------------------------------------------------------
class _Names:
    """``prefix i`` for i < n, without a million strings in memory (ids and captions of the random index)."""

    def __init__(self, prefix: str, n: int):
        self.prefix, self.n = prefix, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return f"{self.prefix}{i % self.n}"


def build_random_index(cache: Path, embedder, vectors: int, seed: int = 0):
    """A :class:`~memfree.index.TrainingIndex` of ``vectors`` random unit vectors of the embedder's size, in
    the FAISS index ``memfree index build`` makes for that many (flat up to 200,000, IVF+PQ above), cached
    in ``cache``. Every item has a caption, so AMG's caption-deduplication branch runs when it fires."""
    import faiss

    from memfree.index import NPROBE, TrainingIndex, make_faiss_index
    from memfree.io import atomic_write

    path = Path(cache) / f"index-{embedder.dim}d-{vectors}-seed{seed}.faiss"
    if path.exists():
        index = faiss.read_index(str(path))
    else:
        rng = np.random.default_rng(seed)
        vec = np.empty((vectors, embedder.dim), dtype=np.float32)
        for lo in range(0, vectors, 100_000):       # in slices: no float64 copy of the whole set
            block = rng.standard_normal((min(100_000, vectors - lo), embedder.dim), dtype=np.float32)
            vec[lo:lo + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        index, _, _ = make_faiss_index(vec, embedder.metric, "auto")
        del vec
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: faiss.write_index(index, str(p)))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        factory = type(faiss.downcast_index(index)).__name__.removeprefix("Index")
    else:
        pq = faiss.downcast_index(ivf).pq
        factory = f"IVF{ivf.nlist},PQ{pq.M}x{pq.nbits}"
    return TrainingIndex(embedder, index, _Names("", vectors), _Names("a photo of training image ", vectors),
                         factory, NPROBE if ivf is not None else None)


# -- timing ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of a block in MB: CUDA's allocator peak on a GPU; on the CPU the process's resident set,
    sampled every 10 ms by a thread (weights included; coarse: freed memory the allocator keeps counts)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.start = device, 0.0, 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (4096 / 2**20)

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start = self.peak = self.rss_mb()
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, self.rss_mb())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


def _timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _denoiser(pipe) -> nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet


def _first_timestep(pipe, steps: int) -> int:
    import copy
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return int(round(float(scheduler.timesteps[0])))


def _call(pipe, resolution: int, steps: int, seed: int = 0, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, height=resolution, width=resolution,
                generator=torch.Generator("cpu").manual_seed(seed), **kwargs)


def time_components(pipe, index, resolution: int, repeats: int = 2) -> list[dict]:
    """Seconds of each piece of a protected generation, each timed on its own (median of ``repeats`` after
    one warm-up; the light pieces 10× as often)."""
    from memfree.similarity import nearest
    den, vae = _denoiser(pipe), pipe.vae
    device = den.device
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = den.register_forward_pre_hook(capture, with_kwargs=True)
    try:   # one step of the pipeline gives a guided call's exact inputs (batch of 2: unconditional, conditional)
        _call(pipe, resolution, 1, output_type="latent")
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    z = torch.randn(1, vae.config.latent_channels, resolution // 8, resolution // 8, device=device, dtype=vae.dtype)
    image = torch.rand(1, 3, resolution, resolution, device=device)
    emb = index.embedder(image).detach()

    def decode_backward():
        zz = z.detach().requires_grad_(True)
        torch.autograd.grad(vae.decode(zz).sample.float().sum(), zz)

    def embed_backward():
        x = image.detach().requires_grad_(True)
        torch.autograd.grad(index.embedder(x).sum(), x)

    light = max(10, 5 * repeats)
    with torch.no_grad():
        rows = [("denoiser_call_cfg", _timed(lambda: den(*args, **kwargs), device, repeats, warmup=0)),
                ("vae_decode", _timed(lambda: vae.decode(z), device, repeats)),
                ("embed_fwd", _timed(lambda: index.embedder(image), device, light)),
                ("search_1", _timed(lambda: index.search(emb, 1), device, 20 * light))]
    rows.append(("embed_fwd_bwd", _timed(embed_backward, device, light)))
    rows.append(("vae_decode_fwd_bwd", _timed(decode_backward, device, max(1, repeats // 2), warmup=0)))
    with torch.no_grad():   # the whole check as AMG runs it on a decoded x̂0: decode, embed, search
        rows.append(("amg_check", _timed(lambda: nearest(index, (vae.decode(z).sample.float() + 1) / 2), device,
                                         max(1, repeats // 2), warmup=0)))
    return [{"component": name, "seconds": statistics.median(t), "times": [round(x, 6) for x in t]}
            for name, t in rows]


def _guard(pipe, method: str, index, settings):
    import memfree
    if method == "none":
        return None
    if method == "detect":
        return memfree.protect(pipe, settings=settings)
    if method == "wen":   # every image flagged, a target never reached: all max_iters iterations run
        return memfree.protect(pipe, "wen", threshold=1e-6, settings=settings, max_iters=WEN_MAX_ITERS)
    if method == "amg-clean":
        return memfree.protect(pipe, "amg", index=index, settings=settings, lam_lo=NEVER, lam_hi=NEVER, watch=NEVER)
    if method == "amg-fired":
        return memfree.protect(pipe, "amg", index=index, settings=settings, always_on=True)
    if method == "amg-screened":
        return memfree.protect(pipe, "amg", index=index, settings=settings, lam_lo=NEVER, lam_hi=NEVER, watch=NEVER,
                               screen=float("inf"), latent_screen=_far_latent_screen(pipe), latent_bar=0.3)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


_SCREENS: dict = {}


def _far_latent_screen(pipe):
    """A latent screen of SCREEN_LATENTS random latents of the pipeline's channel count, all far from anything it
    generates (so no image passes the bar); built once per channel count."""
    from memfree.similarity import LatentScreen
    channels = pipe.vae.config.latent_channels
    if channels not in _SCREENS:
        g = torch.Generator().manual_seed(0)
        _SCREENS[channels] = LatentScreen(torch.randn(SCREEN_LATENTS, channels, 8, 8, generator=g) + 50.0, grid=8)
    return _SCREENS[channels]


class _Counter:
    """Counts forward calls of a module (denoiser calls, VAE decoder passes) through a forward pre-hook."""

    def __init__(self, module: nn.Module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1


def measure_methods(pipe, index, resolution: int, steps: int, repeats: int, methods=METHODS, seed: int = 0,
                    progress: bool = True) -> list[dict]:
    """Seconds per image and peak memory of every method, round-robin over methods, the order reversed
    every round; ratio = time over ``none``'s of the same round (median over rounds)."""
    from tqdm.auto import tqdm

    from memfree.settings import ModelSettings
    methods = ["none"] + [m for m in methods if m != "none"]
    device = _denoiser(pipe).device
    # The detection timestep is pinned to this run's first timestep: with 50 PNDM/DDIM steps the first call is
    # the detection input and the score is free; a short run should not pay an extra pass the real one does not.
    settings = ModelSettings(detection={"timestep": _first_timestep(pipe, steps)})
    for m in methods:    # warm-up of every code path at a small size (first calls allocate and compile)
        guard = _guard(pipe, m, index, settings)
        try:
            _call(pipe, 64, 1)
        finally:
            if guard is not None:
                guard.remove()
    den_calls, dec_calls = _Counter(_denoiser(pipe)), _Counter(pipe.vae.decoder)
    seconds = {m: [] for m in methods}
    peaks = {m: [] for m in methods}
    info: dict[str, dict] = {}
    bar = tqdm(total=repeats * len(methods), desc="bench cost", disable=not progress)
    try:
        for r in range(repeats):
            for m in (methods if r % 2 == 0 else methods[::-1]):
                bar.set_postfix_str(m)
                guard = _guard(pipe, m, index, settings)
                den_calls.n = dec_calls.n = 0
                try:
                    with _PeakMemory(device) as mem:
                        _sync(device)
                        t0 = time.perf_counter()
                        _call(pipe, resolution, steps, seed)
                        _sync(device)
                        seconds[m].append(time.perf_counter() - t0)
                    reports = guard.reports if guard is not None else []
                finally:
                    if guard is not None:
                        guard.remove()
                peaks[m].append(mem.peak)
                entry = {"denoiser_calls": den_calls.n, "decoder_passes": dec_calls.n}
                if reports:
                    rep = reports[0]
                    entry.update(score_source=rep.score_source, mitigated=rep.mitigated)
                    if rep.amg is not None:
                        entry.update(checked_steps=rep.amg["checked_steps"],
                                     fired_steps=len(set(s for v in rep.amg["fired_steps"].values() for s in v)))
                info[m] = entry
                bar.update(1)
    finally:
        bar.close()
        den_calls.handle.remove()
        dec_calls.handle.remove()
    rows = []
    for m in methods:
        ratios = [t / b for t, b in zip(seconds[m], seconds["none"])]
        rows.append({"method": m, "seconds_per_image": statistics.median(seconds[m]),
                     "ratio": statistics.median(ratios), "peak_memory_mb": round(max(peaks[m]), 1),
                     "seconds": [round(t, 4) for t in seconds[m]], "ratios": [round(x, 4) for x in ratios],
                     **info[m]})
    return rows


def _device_and_dtype(device: str | None) -> tuple[str, torch.dtype]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, (torch.float16 if torch.device(device).type == "cuda" else torch.float32)


def run_cost(archs, resolution: int | None = None, steps: int = 4, repeats: int = 2, vectors: int = 1_000_000,
             cache: str | Path = "memfree-out/bench-cost-cache", device: str | None = None, progress: bool = True,
             methods=METHODS, seed: int = 0) -> dict:
    """The whole benchmark for each architecture in ``archs``: rows per method and per component."""
    device, dtype = _device_and_dtype(device)
    flush = device == "cpu" and torch.set_flush_denormal(True)   # random weights must not take the slow denormal path
    try:
        return _run(archs, resolution, steps, repeats, vectors, Path(cache), device, dtype, progress, methods, seed)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _run(archs, resolution, steps, repeats, vectors, cache, device, dtype, progress, methods, seed) -> dict:
    rows, components, meta = [], [], {}
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
        res = resolution or NATIVE_RESOLUTION[arch]
        if res % 64:
            raise ValueError(f"resolution must be a multiple of 64, got {res}")
        t0 = time.perf_counter()
        pipe = build_pipeline(arch, cache, device, dtype, seed)
        build_s = time.perf_counter() - t0
        embedder = build_embedder(cache, "tiny" if arch == "tiny" else "sscd", device)
        t0 = time.perf_counter()
        index = build_random_index(cache, embedder, vectors, seed)
        index_s = time.perf_counter() - t0
        head = {"arch": arch, "resolution": res, "steps": steps, "device": device}
        for c in time_components(pipe, index, res, max(1, min(repeats, 3))):
            components.append({**head, **c})
        for r in measure_methods(pipe, index, res, steps, repeats, methods, seed, progress):
            rows.append({**head, **r})
        meta[arch] = {"parameters_m": {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                                       for n, m in pipe.components.items() if isinstance(m, nn.Module)},
                      "scheduler": type(pipe.scheduler).__name__, "build_seconds": round(build_s, 1),
                      "index_seconds": round(index_s, 1), "index": index.factory, "index_vectors": len(index),
                      "embedder": {"model": "ResNet-50 + GeM + 512-d projection" if arch != "tiny" else
                                   "tiny ResNet + GeM + 512-d projection", "input": embedder.size},
                      "text_encoder_3": "left out (T5 slots are zeros)" if arch == "sd3" else None}
        del pipe, index
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "repeats": repeats, "steps": steps, "prompt": PROMPT, "wen_max_iters": WEN_MAX_ITERS,
            "amg_check_every": 4, "architectures": meta, "rows": rows, "components": components}


# -- what the components say about a GPU ---------------------------------------------------------------------
def checks_per_image(calls: int, check_every: int) -> int:
    """How many denoiser calls AMG checks on an image that never comes under watch (calls 0, n, 2n, ...)."""
    return len(range(0, calls, check_every))


def projected_ratios(unet: float, decode: float, embed: float, search: float, image: float, calls: int = 50,
                     check_every: int = 4) -> dict[str, float]:
    """Ratios to an unprotected image (``image`` seconds, ``calls`` guided denoiser calls) of check designs on
    an ordinary prompt, from component costs. A check in pixel space is decode + embed + search; protect's
    end-of-call report adds one embed + search of the output image.

    * ``detect``: the score is the first call's, free (PNDM/DDIM at the reference step count);
    * ``amg-clean``: a pixel check every ``check_every``-th call;
    * ``amg-screen``: the first-step score screens ordinary images out, nothing is checked;
    * ``amg-every-8``: a pixel check every 8th call;
    * ``amg-latent``: the check is a search in a latent-space index (no decode, no embedding);
    * ``amg-every-1``: a pixel check at every call (the paper's cadence).
    """
    report = embed + search
    check = decode + embed + search
    return {"detect": 1.0,
            "amg-clean": 1 + (checks_per_image(calls, check_every) * check + report) / image,
            "amg-screen": 1 + report / image,
            "amg-every-8": 1 + (checks_per_image(calls, 8) * check + report) / image,
            "amg-latent": 1 + (checks_per_image(calls, check_every) * search + search) / image,
            "amg-every-1": 1 + (calls * check + report) / image}


def format_table(res: dict) -> str:
    lines = ["| arch | res | steps | method | s/image | ratio | peak MB | denoiser calls | decoder passes | checks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['arch']} | {r['resolution']} | {r['steps']} | {r['method']} | {r['seconds_per_image']:.2f} "
                     f"| {r['ratio']:.3f} | {r['peak_memory_mb']:.0f} | {r['denoiser_calls']} | {r['decoder_passes']} "
                     f"| {r.get('checked_steps', '')} |")
    lines += ["", "| arch | res | component | seconds |", "|---|---|---|---|"]
    for c in res["components"]:
        lines.append(f"| {c['arch']} | {c['resolution']} | {c['component']} | {c['seconds']:.4f} |")
    return "\n".join(lines)
