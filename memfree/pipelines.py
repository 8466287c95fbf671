"""Model folders that memfree's own loop does not sample (SDXL, SD3), opened as diffusers pipelines and measured
through :func:`memfree.protect`: the same hooks a user's pipeline gets, so the CLI and a service agree with them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from memfree.detect import Detection
from memfree.model import PIPELINE_ONLY, quiet_loading, resolve_model
from memfree.protect import FAMILIES, protect


def pipeline_family(model: str | Path | None) -> str | None:
    """``sdxl`` or ``sd3`` for a model folder (or name) whose ``model_index.json`` names such a pipeline, else None."""
    try:
        path, _ = resolve_model(model)
    except Exception:   # not a model at all: the ordinary loader says why
        return None
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return PIPELINE_ONLY.get(name)


def open_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A local diffusers folder as its pipeline, from safetensors only and without network access. SD3 folders
    saved without their T5 encoder open without it (the pipeline then feeds zeros in its place)."""
    from diffusers import DiffusionPipeline
    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    missing = {k: None for k in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
               if k in index and (index[k] == [None, None] or not (path / k).exists())}
    with quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True, torch_dtype=dtype,
                                                 **missing)
    if type(pipe).__name__ not in FAMILIES:
        raise ValueError(f"{path} holds a {type(pipe).__name__}; memfree protects {', '.join(FAMILIES)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_detect(pipe, prompts: Sequence[str], generations: int = 1, seed: int = 0,
                    threshold: float | None = None, num_inference_steps: int = 50) -> list[Detection]:
    """Wen et al.'s first-step score of each prompt on a pipeline, averaged over ``generations`` noises: each
    generation runs the pipeline's first step only (the loop is interrupted, nothing is decoded)."""
    def stop_after_first(p, i, t, kwargs):
        p._interrupt = True
        return kwargs

    out = []
    with protect(pipe, threshold=threshold) as guard:
        for prompt in prompts:
            res = pipe(prompt, num_images_per_prompt=generations, num_inference_steps=num_inference_steps,
                       generator=torch.Generator().manual_seed(seed), output_type="latent",
                       callback_on_step_end=stop_after_first)
            scores = [r.score for r in res.memorization]
            score = sum(scores) / len(scores)
            out.append(Detection(prompt=prompt, score=score, per_step=[score], threshold=guard.threshold,
                                 memorized=None if guard.threshold is None else score > guard.threshold))
    return out
