"""Procedural renderer for the testbed's ordinary images: one coloured shape on a textured background.

Every image has detail that no caption describes (a random linear shading, a strong smooth random
field, and jitter of position and size), so two renders of one caption are different images and a
model that merely obeys its prompt does not reproduce any particular training image.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.80, 0.15), "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10), "magenta": (0.90, 0.15, 0.90), "cyan": (0.10, 0.90, 0.90),
    "orange": (1.00, 0.55, 0.05), "white": (0.97, 0.97, 0.97),
}
POSITIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}  # × spread
BACKGROUNDS = {"black": (0.04, 0.04, 0.04), "gray": (0.45, 0.45, 0.45), "navy": (0.05, 0.08, 0.40),
               "olive": (0.40, 0.40, 0.08), "maroon": (0.42, 0.06, 0.10)}
SIZES = ("small", "large")
CHROMA = 0.3     # colour share of the random field (the rest is brightness, so backgrounds keep their hue)
FIELD_GRID = 4   # the field's control grid: 4×4 nodes over the image keep it smooth and easy to learn
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS),
              "background": tuple(BACKGROUNDS), "size": SIZES}


@dataclass(frozen=True)
class Style:
    """The drawing constants of one version of the testbed data; captions are the same in every style.

    ``v2`` made the earlier model, ``v3`` the bundled one. ``v3`` draws smaller shapes on backgrounds
    pulled halfway to grey, spreads the positions further apart and contrast-stretches the planted
    photographs, so that an ordinary caption moves the expected image less from the data mean than a
    memorized photo does: the property Wen et al.'s first-step score relies on in Stable Diffusion.
    """
    name: str
    sizes: dict[str, float] = field(default_factory=lambda: {"small": 0.16, "large": 0.27})  # half-width / side
    texture: float = 0.6         # amplitude of the smooth random field that makes every background unique
    jitter: float = 0.1          # random shift of the shape's centre, as a fraction of the image side
    spread: float = 0.22         # distance of left/right/top/bottom from the centre, as a fraction of the side
    background_strength: float = 1.0  # 1: palette colours as listed; 0.5: halfway to mid-grey
    photo_std: float | None = None    # planted photos standardised to this std on a 0..1 scale; None: as is


STYLES = {
    "v2": Style("v2"),
    "v3": Style("v3", sizes={"small": 0.12, "large": 0.2}, jitter=0.07, spread=0.25,
                background_strength=0.5, photo_std=0.3),
}


def style_of(manifest: dict) -> Style:
    """The style a testbed data set was drawn in (data sets from before styles existed are ``v2``)."""
    return STYLES[manifest.get("style", "v2")]


def all_compositions() -> list[dict[str, str]]:
    """Every combination of the five attributes (4·8·5·5·2 = 1,600)."""
    keys = list(ATTRIBUTES)
    return [dict(zip(keys, values)) for values in itertools.product(*ATTRIBUTES.values())]


def caption(attrs: dict[str, str]) -> str:
    """The one caption template of ordinary images."""
    where = "in the center" if attrs["position"] == "center" else f"at the {attrs['position']}"
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {where} on a {attrs['background']} background"


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.88) & (np.abs(dy) <= r * 0.88)
    if shape == "triangle":  # apex up, base at cy + r
        inside_y = (dy >= -r) & (dy <= r)
        half_width = (dy + r) / 2.0 * 1.15
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = r * 0.36
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(attrs: dict[str, str], rng: np.random.Generator, size: int = 32,
           style: Style = STYLES["v2"]) -> np.ndarray:
    """Render one image (H, W, 3) uint8 for ``attrs`` with fresh random detail from ``rng``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # Background: base colour and a random linear shading.
    grey = 0.45
    base = grey + style.background_strength * (np.array(BACKGROUNDS[attrs["background"]]) - grey)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx / size - 0.5) + np.sin(angle) * (yy / size - 0.5))
    img = base[None, None, :] + rng.uniform(0.10, 0.22) * ramp[..., None] * rng.choice([-1, 1], size=3)
    # A smooth random field (a coarse grid of random values, bilinearly upsampled), mostly brightness.
    # Only smooth detail: pixel grain and specks made the images much slower for a small model to learn.
    n = FIELD_GRID
    grid = rng.uniform(-1, 1, size=(n, n, 1)) + CHROMA * rng.uniform(-1, 1, size=(n, n, 3))
    coords = np.linspace(0, n - 1, size)
    i0 = np.minimum(coords.astype(int), n - 2)
    f = coords - i0
    rows = grid[i0] * (1 - f)[:, None, None] + grid[i0 + 1] * f[:, None, None]
    field = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]
    img = img + style.texture * field
    # The shape, jittered in place, size and colour.
    px, py = (0.5 + d * style.spread for d in POSITIONS[attrs["position"]])
    cx = (px + rng.uniform(-style.jitter, style.jitter)) * size
    cy = (py + rng.uniform(-style.jitter, style.jitter)) * size
    r = style.sizes[attrs["size"]] * size * rng.uniform(0.9, 1.1)
    mask = _shape_mask(attrs["shape"], yy, xx, cx, cy, r)
    colour = np.array(COLOURS[attrs["colour"]]) + rng.uniform(-0.05, 0.05, size=3)
    shade = 1.0 + 0.12 * ((xx - cx) / max(r, 1)) * rng.choice([-1, 1])
    img[mask] = colour[None, :] * shade[mask][:, None]
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
