"""Measure the testbed's memorization and alignment: does it copy its planted images and nothing else?

For every evaluation prompt set the model generates with several seeds (default sampler); each
generation's nearest unique training image and nL2 decide whether it is memorized (nL2 < 1.4) and
whether it copies the planted image of its prompt. Alignment is read by the probe.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from memfree.model import Model
from memfree.images import from_uint8, from_uint8_signed
from memfree.sampling import sample
from memfree.similarity import NL2_THRESHOLD, nearest
from memfree_testbed.bundle import Testbed, load_testbed
from memfree_testbed.probe import accuracy
from memfree_testbed.render import ATTRIBUTES, Style, caption, render, style_of


def _targets(entry: dict) -> set[int]:
    """Training image ids that count as "the planted image" for an evaluation prompt."""
    if "images" in entry:
        return set(entry["images"])
    return {entry["image"]} if "image" in entry else set()


def evaluate_set(model: Model, tb: Testbed, entries: list[dict], seeds: list[int], *,
                 num_inference_steps: int | None = None, batch_size: int = 64, progress: bool = True,
                 pieces=()) -> dict:
    """Generate ``len(seeds)`` images per prompt and score them against the training set."""
    prompts = [e["prompt"] for e in entries for _ in seeds]
    seed_list = [s for _ in entries for s in seeds]
    out = sample(model, prompts, seed_list, num_inference_steps=num_inference_steps, batch_size=batch_size,
                 progress=progress, pieces=pieces)
    nn = tb.index.search(out.images)
    owners = [e for e in entries for _ in seeds]
    copies = [bool(m) and int(i) in _targets(e) for m, i, e in zip(nn.memorized, nn.ids, owners)]
    res = {
        "prompts": len(entries), "generations": len(prompts),
        "memorization_rate": float(nn.memorized.float().mean()),
        "copy_rate": float(np.mean(copies)) if any(_targets(e) for e in entries) else None,
        "nearest_is_planted_rate": float(np.mean([int(i) in _targets(e) for i, e in zip(nn.ids, owners)]))
        if any(_targets(e) for e in entries) else None,
        "nl2_mean": float(nn.nl2.mean()), "nl2_median": float(nn.nl2.median()),
        "first_step_score_mean": float(out.scores[:, 0].mean()),
    }
    if all("attrs" in e for e in entries):
        acc = accuracy(tb.probe.predict(out.images), [e["attrs"] for e in owners])
        res["alignment"], res["alignment_all_attributes"] = acc["mean"], acc["all"]
        res["alignment_per_attribute"] = {k: v for k, v in acc.items() if k not in ("mean", "all")}
    if tb.copy_index is not None:   # the learned copy detector's verdict beside nL2's
        sig, near = nearest(tb.copy_index, out.images)
        ids = [int(tb.copy_index.ids[int(j)]) for j in near[:, 0]]
        judged = sig > tb.copy_threshold
        res["memorization_rate_cosine"] = float(judged.float().mean())
        res["cosine_mean"] = float(sig.mean())
        if any(_targets(e) for e in entries):
            res["copy_rate_cosine"] = float(np.mean([bool(m) and i in _targets(e)
                                                      for m, i, e in zip(judged, ids, owners)]))
    res["_images"], res["_nl2"], res["_nearest"] = out.images, nn.nl2, nn.ids
    return res


def probe_accuracy(tb: Testbed, seed: int = 12345) -> dict[str, float]:
    """The probe on real testbed images: the ordinary training images and fresh held-out renders."""
    ordinary = [u for u in tb.manifest["unique"] if u["kind"] == "ordinary"]
    on_data = accuracy(tb.probe.predict(from_uint8(tb.images[[u["id"] for u in ordinary]])),
                       [u["attrs"] for u in ordinary])
    rng = np.random.default_rng(seed)
    held = tb.manifest["heldout_compositions"]
    renders = from_uint8(np.stack([render(a, rng, tb.manifest["size"], style_of(tb.manifest)) for a in held]))
    on_held = accuracy(tb.probe.predict(renders), held)
    # What perfect obedience scores: fresh renders of held-out prompts, checked for memorization.
    obedient = tb.index.search(renders)
    return {"on_data": on_data["mean"], "on_data_all_attributes": on_data["all"],
            "on_heldout_renders": on_held["mean"],
            "heldout_render_memorization_rate": float(obedient.memorized.float().mean())}


def image_size(model: Model) -> int:
    """The side of the images a model makes: its sample size, times the VAE's down-sampling for a latent model."""
    side = model.latent_shape[-1]
    if model.vae is not None:
        side *= 2 ** (len(model.vae.config.block_out_channels) - 1)
    return side


def to_model_space(model: Model, images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) as the UNet's clean samples: pixels in [-1, 1], or scaled VAE latents."""
    x = from_uint8_signed(images)
    if model.vae is None:
        return x
    with torch.no_grad():
        z = model.vae.encode(x.to(model.device, model.vae.dtype)).latent_dist.mean
    return (z * model.vae.config.scaling_factor).float().cpu()


def word_influence(model: Model, compositions: list[dict[str, str]], style: Style,
                   timesteps=(250, 500, 750), seed: int = 0) -> dict[str, float]:
    """How much each attribute's word moves the model's noise prediction, per attribute.

    For every composition, its caption and the caption with one attribute swapped for another value
    see the same noised render; the mean ‖ε(x_t, c) − ε(x_t, c')‖₂ says whether the model uses that
    word at all. A word near zero is one the model ignores, whatever sampling luck says (position
    words in the models trained with token init 0.02). ``style`` is the one the model's data was drawn
    in (``style_of(manifest)``), so the renders look like its training images.
    """
    rng = np.random.default_rng(seed)
    x0 = to_model_space(model, np.stack([render(a, rng, image_size(model), style) for a in compositions]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    ts = [torch.full((len(x0),), t) for t in timesteps]
    with torch.no_grad():
        x_ts = [model.scheduler.add_noise(x0, noise, tt).to(model.device, model.dtype) for tt in ts]
        c = model.encode([caption(a) for a in compositions])
        eps = [model.unet(x_t, tt.to(model.device), c).sample.float() for x_t, tt in zip(x_ts, ts)]
        out = {}
        for attr, values in ATTRIBUTES.items():
            swapped = [dict(a, **{attr: values[(values.index(a[attr]) + 1 + int(rng.integers(len(values) - 1)))
                                                % len(values)]}) for a in compositions]
            c2 = model.encode([caption(a) for a in swapped])
            diffs = [(e - model.unet(x_t, tt.to(model.device), c2).sample.float()).flatten(1).norm(dim=1)
                     for x_t, tt, e in zip(x_ts, ts, eps)]
            out[attr] = float(torch.cat(diffs).mean())
    return out


def testbed_report(model: Model, seeds: tuple[int, ...] = (0, 1, 2, 3), num_inference_steps: int | None = None,
                   batch_size: int = 64, progress: bool = True, keep_images: bool = False) -> dict:
    """The acceptance figures of the testbed as a flat JSON-ready dict (plus per-set details)."""
    tb = load_testbed(model)
    t0 = time.perf_counter()
    sets = {}
    for name, entries in tb.eval_sets.items():
        sets[name] = evaluate_set(model, tb, entries, list(seeds), num_inference_steps=num_inference_steps,
                                  batch_size=batch_size, progress=progress)
    probe = probe_accuracy(tb)
    influence = word_influence(model, tb.manifest["heldout_compositions"][:40], style_of(tb.manifest))
    report = {
        "model": model.label, "seeds_per_prompt": len(seeds),
        "sampler": {"scheduler": type(model.scheduler).__name__,
                    "num_inference_steps": num_inference_steps or model.settings.num_inference_steps,
                    "guidance_scale": model.settings.guidance_scale},
        "nl2_threshold": NL2_THRESHOLD,
        "verbatim_memorization_rate": sets["verbatim"]["copy_rate"],
        "image_dup_memorization_rate": sets["image_dup"]["copy_rate"],
        "caption_dup_memorization_rate": sets["caption_dup"]["copy_rate"],
        "caption_dup_template_rate": sets["caption_dup"]["nearest_is_planted_rate"],
        "paraphrase_memorization_rate": sets["paraphrase"]["copy_rate"],
        "heldout_memorization_rate": sets["heldout"]["memorization_rate"],
        "seen_once_memorization_rate": sets["seen_once"]["memorization_rate"],
        "seen_once_copy_rate": sets["seen_once"]["copy_rate"],
        "heldout_alignment": sets["heldout"]["alignment"],
        "heldout_alignment_all_attributes": sets["heldout"]["alignment_all_attributes"],
        "seen_once_alignment": sets["seen_once"]["alignment"],
        "probe_accuracy_on_data": probe["on_data"],
        "probe_accuracy_on_heldout_renders": probe["on_heldout_renders"],
        "heldout_render_memorization_rate": probe["heldout_render_memorization_rate"],
        "word_influence": influence,
        **({f"{k}_cosine": sets[s][f] for k, s, f in (
            ("verbatim_memorization_rate", "verbatim", "copy_rate_cosine"),
            ("image_dup_memorization_rate", "image_dup", "copy_rate_cosine"),
            ("caption_dup_memorization_rate", "caption_dup", "copy_rate_cosine"),
            ("paraphrase_memorization_rate", "paraphrase", "copy_rate_cosine"),
            ("heldout_memorization_rate", "heldout", "memorization_rate_cosine"),
            ("seen_once_memorization_rate", "seen_once", "memorization_rate_cosine"))}
           | {"copy_threshold_cosine": tb.copy_threshold} if tb.copy_index is not None else {}),
        "seconds": round(time.perf_counter() - t0, 1),
        "sets": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in sets.items()},
    }
    if keep_images:
        report["_sets"] = sets
    return report
