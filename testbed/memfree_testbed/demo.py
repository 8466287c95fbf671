"""`memfree demo`: a small HTML report showing the testbed's planted training images next to what the
model generates for their captions, and held-out prompts next to their generations.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memfree.model import Model
from memfree.images import to_uint8
from memfree.similarity import NL2_THRESHOLD
from memfree_testbed.bundle import load_testbed
from memfree_testbed.report import evaluate_set

SECTIONS = (("verbatim", 8, "Verbatim: one photo under one caption, {n} times in training"),
            ("image_dup", 4, "Image duplication: one face under {n} different captions"),
            ("caption_dup", 4, "Caption duplication: one caption over {n} images sharing a layout"),
            ("paraphrase", 4, "Paraphrases of verbatim captions"),
            ("heldout", 8, "Held-out prompts: compositions never trained on"))


def _per_item(manifest: dict, kind: str) -> int:
    """Training items per planted photo, face or caption of ``kind``, read from the data's counts."""
    if kind == "caption_dup":   # one caption per group, each group many distinct images
        return manifest["counts"][kind] // max(len(manifest["eval"][kind]), 1)
    unique = sum(u["kind"] == kind for u in manifest["unique"])
    return manifest["counts"].get(kind, 0) // max(unique, 1)


def _png(img: np.ndarray | torch.Tensor, scale: int = 4) -> str:
    if isinstance(img, torch.Tensor):
        img = to_uint8(img)
    im = Image.fromarray(img)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def run_demo(model: Model, out_dir: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Generate the demo's images (one seed per prompt) and write ``out_dir/index.html``."""
    t0 = time.perf_counter()
    tb = load_testbed(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><meta charset='utf-8'><title>memfree demo</title>",
             "<style>body{font-family:sans-serif;max-width:960px;margin:auto}td{padding:4px 10px;"
             "vertical-align:middle}.mem{color:#b00;font-weight:bold}.ok{color:#070}</style>",
             "<h1>memfree testbed: what the model copies</h1>",
             f"<p>Model <code>{html.escape(model.label)}</code>, "
             f"{type(model.scheduler).__name__} {model.settings.num_inference_steps} steps, guidance "
             f"{model.settings.guidance_scale}, seed {seed}. A generation is memorized when its nearest training image "
             f"has nL2 &lt; {NL2_THRESHOLD} (AMG's normalised ℓ2).</p>"]
    summary = {}
    for name, n, title in SECTIONS:
        entries = tb.eval_sets[name][:n]
        res = evaluate_set(model, tb, entries, [seed], progress=progress)
        summary[name] = {"memorization_rate": res["memorization_rate"], "copy_rate": res["copy_rate"]}
        title = title.format(n=_per_item(tb.manifest, name))
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr><th>prompt</th><th>training image</th>"
                     "<th>generation</th><th>nearest training image</th><th>nL2</th></tr>")
        for e, img, nl2, near in zip(entries, res["_images"], res["_nl2"], res["_nearest"]):
            planted = sorted(set([e["image"]] if "image" in e else e.get("images", [])))
            left = _png(tb.images[planted[0]]) if planted else "<i>none (novel composition)</i>"
            memorized = bool(nl2 < NL2_THRESHOLD)
            verdict = "memorized" if memorized else "novel"
            parts.append(f"<tr><td>{html.escape(e['prompt'])}</td><td>{left}</td><td>{_png(img)}</td>"
                         f"<td>{_png(tb.images[int(near)])}</td>"
                         f"<td class='{'mem' if memorized else 'ok'}'>{float(nl2):.2f} {verdict}</td></tr>")
        parts.append("</table>")
    seconds = time.perf_counter() - t0
    parts.append(f"<p>Generated in {seconds:.1f} s.</p>")
    (out_dir / "index.html").write_text("\n".join(parts), encoding="utf-8")
    return {"html": str(out_dir / "index.html"), "seconds": round(seconds, 1), "sets": summary}
