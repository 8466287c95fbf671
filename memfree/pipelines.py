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


PIPELINE_METHODS = {"none": (None, {}), "wen": ("wen", {}), "amg": ("amg", {"preset": "amg"}),
                    "amg-strong": ("amg", {"preset": "amg-strong"})}


def pipeline_generate(pipe, prompts: Sequence[str], mitigation: str = "none", index=None, seed: int = 0,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      threshold: float | None = None, progress: bool = True, **options) -> list[tuple]:
    """Generate one image per prompt on a pipeline under :func:`memfree.protect`; prompt i starts from seed + i.
    Returns (PIL image, :class:`memfree.protect.MemorizationReport`) per prompt. Methods: none, wen, amg,
    amg-strong (the others need memfree's own loop)."""
    if mitigation not in PIPELINE_METHODS:
        raise ValueError(f"on an SDXL or SD3 pipeline memfree runs {', '.join(PIPELINE_METHODS)} (through "
                         f"memfree.protect); {mitigation!r} needs memfree's own sampling loop")
    name, preset = PIPELINE_METHODS[mitigation]
    kwargs = {k: v for k, v in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale))
              if v is not None}
    out = []
    from tqdm.auto import tqdm
    with protect(pipe, name, index=index, threshold=threshold, **preset, **options):
        for i, prompt in enumerate(tqdm(prompts, desc=f"generate ({mitigation})", disable=not progress)):
            res = pipe(prompt, generator=torch.Generator().manual_seed(seed + i), **kwargs)
            out.append((res.images[0], res.memorization[0]))
    return out


def pipeline_calibrate(path: str | Path, prompts: Sequence[str], fpr: float = 0.01, generations: int = 1,
                       seed: int = 0, save: bool = True) -> dict:
    """:func:`memfree.detect.calibrate` for an SDXL or SD3 folder: the first-step scores of ordinary prompts on its
    own pipeline (as :func:`memfree.protect` computes them) set the threshold at ``fpr``, stored with the folder
    (or in a user file when it is read-only), where ``protect`` finds it."""
    import time
    import numpy as np
    from memfree.detect import min_negatives, threshold_at_fpr
    from memfree.settings import save_settings_entry
    if not 0 <= fpr < 1:
        raise ValueError("fpr must be in [0, 1)")
    if len(prompts) < min_negatives(fpr):
        raise ValueError(f"calibrating at fpr {fpr} needs at least {min_negatives(fpr)} ordinary prompts, "
                         f"got {len(prompts)}")
    t0 = time.perf_counter()
    scores = np.array([d.score for d in pipeline_detect(open_pipeline(path), prompts, generations, seed)])
    entry = {"threshold": threshold_at_fpr(scores, fpr), "fpr": fpr, "steps": 1, "generations": generations,
             "timestep": None, "calibration_prompts": len(scores), "negative_score_mean": float(scores.mean()),
             "negative_score_max": float(scores.max()), "seconds": round(time.perf_counter() - t0, 2)}
    if save:
        entry["saved_to"] = str(save_settings_entry(Path(path), "detection", entry))
    return entry


def pipeline_explain(pipe, prompt: str, generations: int = 1, seed: int = 0):
    """Per-word significance by occlusion (:func:`memfree.explain.explain_by_occlusion`) on a pipeline: each
    variant of the prompt is scored at the first step under :func:`memfree.protect`."""
    import numpy as np
    from memfree.explain import explain_by_occlusion
    if not prompt.strip():
        raise ValueError("empty prompt given")
    return explain_by_occlusion(prompt, pipe.tokenizer, lambda variants: np.array(
        [d.score for d in pipeline_detect(pipe, variants, generations, seed)]))
