"""Image tensors to and from the uint8 arrays that PIL and the stored data sets use, and atomic PNG writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memfree.io import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, 3, H, W) or (3, H, W), to uint8 arrays in (…, H, W, 3) order for PIL."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def from_uint8_signed(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) to float (N, 3, H, W) in [-1, 1], the range a pixel-space UNet sees."""
    return from_uint8(images).mul(2).sub(1)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one image (3, H, W) in [0, 1] as a PNG, atomically: a killed write leaves no partial file."""
    from PIL import Image
    pil = Image.fromarray(to_uint8(image))
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
