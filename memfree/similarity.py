"""Nearest training image and AMG's normalised ℓ2 (nL2) for pixel-space models.

nL2 = ℓ2(x, n0) / (α · mean ℓ2(x, z) over the k nearest training images z), with k = 50 and
α = 0.5 (Chen et al.). A generation is memorized when nL2 < 1.4: its nearest training image is much
closer than the crowd of its other neighbours, which is what a copy looks like and what following a
prompt with fresh detail does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memfree.sampling import from_uint8

NL2_THRESHOLD = 1.4


def normalised_l2(distances: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """nL2 per row from the ℓ2 distances to the k nearest training images (B, k), nearest first."""
    return distances[:, 0] / (alpha * distances.mean(dim=1)).clamp(min=1e-12)


def similarity_from_nl2(nl2: torch.Tensor) -> torch.Tensor:
    """s = 1 − nL2/2: 1 for an exact copy, 0 for "no closer than the crowd"; nL2 = 1.4 is s = 0.3."""
    return 1 - nl2 / 2


@dataclass
class Neighbours:
    ids: torch.Tensor        # (B,) nearest training image id
    distance: torch.Tensor   # (B,) ℓ2 to it
    nl2: torch.Tensor        # (B,) normalised ℓ2

    @property
    def memorized(self) -> torch.Tensor:
        return self.nl2 < NL2_THRESHOLD


class PixelIndex:
    """Exact nearest-neighbour search over unique training images in [0, 1] pixel space."""

    def __init__(self, images: np.ndarray | torch.Tensor, k: int = 50, alpha: float = 0.5):
        """``images``: uint8 (N, H, W, 3) as stored, or float (N, C, H, W) in [0, 1]."""
        x = from_uint8(images) if isinstance(images, np.ndarray) and images.dtype == np.uint8 else torch.as_tensor(images)
        self.shape = tuple(x.shape[1:])
        self.vectors = x.reshape(len(x), -1).float().contiguous()
        self.k, self.alpha = min(k, len(x)), alpha

    def __len__(self) -> int:
        return len(self.vectors)

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """ℓ2 from each image (B, C, H, W) in [0, 1] to every training image, (B, N)."""
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match the index's {self.shape}")
        q = images.reshape(len(images), -1).float().to(self.vectors.device)
        # The direct difference, not the |a|²+|b|²−2ab shortcut, so an exact copy is at distance 0.
        return torch.cdist(q, self.vectors, compute_mode="donot_use_mm_for_euclid_dist")

    def search(self, images: torch.Tensor) -> Neighbours:
        d = self.distances(images)
        near, ids = d.topk(self.k, dim=1, largest=False)
        return Neighbours(ids=ids[:, 0], distance=near[:, 0], nl2=normalised_l2(near, self.alpha))
