"""Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024; docs/spec.md §5) as a mitigation: the sampling piece of
:mod:`memfree.guidance` over a training-set index, under a preset (``amg``, ``amg-strong``) or an ablation."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from memfree.guidance import AMG, AMGConfig, config_for, config_for_index
from memfree.index import TrainingIndex
from memfree.mitigate.base import Mitigation, Request
from memfree.model import Model, ModelError
from memfree.sampling import Piece, SampleOutput


def default_index(model: Model) -> TrainingIndex:
    """The training-set index a model folder ships in ``index/``; a clear error when there is none."""
    path = model.path / "index" if model.path is not None else None
    if path is None or not (path / "meta.json").exists():
        raise ModelError(f"AMG needs a training-set index and {model.label} ships none: build one with "
                         "`memfree index build --images DIR --out DIR` and pass it with --index")
    return TrainingIndex.load(path)


class AMGMitigation(Mitigation):
    """AMG under ``preset`` (or an ablation name), searching ``index`` (a :class:`TrainingIndex` or its folder;
    default: the one the model ships). Any :class:`memfree.guidance.AMGConfig` field overrides the preset.
    ``latent_screen`` (a :class:`memfree.similarity.LatentScreen` or its file) starts each check in latent space."""

    name: ClassVar[str] = "amg"

    def __init__(self, preset: str = "amg", index: TrainingIndex | str | Path | None = None,
                 latent_screen: Any = None, **overrides: Any):
        config_for(preset, "l2", 0.0, **overrides)   # fail on a bad name or option before any work
        self.preset, self.index, self.overrides = preset, index, overrides
        if isinstance(latent_screen, (str, Path)):
            from memfree.similarity import LatentScreen
            latent_screen = LatentScreen.load(latent_screen)
        self.latent_screen = latent_screen
        self.piece: AMG | None = None

    @classmethod
    def options(cls, preset: str = "amg") -> dict[str, tuple[str, Any]]:
        """The AMGConfig fields, with the preset's values for a pixel (l2) index as defaults."""
        cfg = config_for(preset, "l2", 0.0)
        fields = {f.name: (str(f.type), getattr(cfg, f.name)) for f in dataclasses.fields(AMGConfig)}
        return {"index": ("str | None", None), "latent_screen": ("str | None", None), **fields}

    def pieces(self, request: Request) -> list[Piece]:
        index = self.index
        if index is None:
            index = default_index(request.model)
        elif isinstance(index, (str, Path)):
            index = TrainingIndex.load(index)
        cfg = config_for_index(self.preset, index, request.model.settings.threshold, **self.overrides)
        self.piece = AMG(index, cfg, first_scores=request.score_before, latent_screen=self.latent_screen)
        return [self.piece]

    def finish(self, request: Request, out: SampleOutput) -> None:
        for i in range(len(request.prompts)):
            summary = self.piece.summary(i)
            request.applied[i] = any(summary["fired_steps"].values())
            request.extra[i]["amg"] = summary
