"""Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024; docs/spec.md §5) as a mitigation: the sampling piece of
:mod:`memfree.guidance` over a training-set index, under a preset (``amg``, ``amg-strong``) or an ablation."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

from memfree.guidance import AMG, AMGConfig, config_for, config_for_index, screening
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


def default_indexes(model: Model) -> list:
    """Every index the model folder ships for AMG: ``index/`` first (the one reports name the nearest item of),
    then each ``index-*/`` in name order. A generation must then escape all of them (docs/testbed-latent.md:
    a learned embedder alone can be fooled, so a folder may ship a pixel index beside it)."""
    first = default_index(model)
    more = sorted(p for p in model.path.glob("index-*") if (p / "meta.json").is_file())
    return [first] + [open_index(p) for p in more]


def open_index(index):
    """An index given as a folder (a TrainingIndex or a LatentIndex folder) opened; a loaded one as it is."""
    if not isinstance(index, (str, Path)):
        return index
    from memfree.similarity import LatentIndex
    if (Path(index) / LatentIndex.FILE).is_file():
        return LatentIndex.load(index)
    return TrainingIndex.load(index)


def index_list(index) -> list:
    """``index`` as a list: a list as it is, ``DIR1:DIR2`` (``os.pathsep``, as in $PATH) split, one index wrapped."""
    if isinstance(index, str) and os.pathsep in index:
        return index.split(os.pathsep)
    return list(index) if isinstance(index, (list, tuple)) else [index]


def merged_summary(summaries: list[dict]) -> dict:
    """One image's AMG log over several indexes: a term fired at a step if it fired for any index."""
    summary = dict(summaries[0])
    if len(summaries) > 1:
        summary["fired_steps"] = {t: sorted({s for m in summaries for s in m["fired_steps"][t]})
                                  for t in summaries[0]["fired_steps"]}
        summary["checked_steps"] = sum(m["checked_steps"] for m in summaries)
        summary["per_index"] = summaries
    return summary


class AMGMitigation(Mitigation):
    """AMG under ``preset`` (or an ablation name), searching ``index`` (a :class:`TrainingIndex`, a
    :class:`memfree.similarity.LatentIndex` or a folder; default: the ones the model ships). A list of indexes
    (on the command line, folders joined by ``os.pathsep``) composes one AMG piece per index in the same loop,
    each with its own tuned gate: guided by two similarities, a generation must escape both
    (docs/testbed-latent.md shows why one learned embedder alone can be fooled).
    Any :class:`memfree.guidance.AMGConfig` field overrides the preset (for every index).
    ``latent_screen`` (a :class:`memfree.similarity.LatentScreen` or its file) starts each check in latent space;
    by default an index's own screen is used with the calibrated threshold, and ``"off"`` turns that off
    (:func:`memfree.guidance.screening`)."""

    name: ClassVar[str] = "amg"

    def __init__(self, preset: str = "amg", index: Any = None,
                 latent_screen: Any = None, **overrides: Any):
        config_for(preset, "l2", 0.0, **overrides)   # fail on a bad name or option before any work
        if isinstance(index, str) and os.pathsep in index:   # the CLI's list: DIR1:DIR2, as in $PATH
            index = index_list(index)
        self.preset, self.index, self.overrides = preset, index, overrides
        self.latent_screen = latent_screen
        self.piece: AMG | None = None

    @classmethod
    def options(cls, preset: str = "amg") -> dict[str, tuple[str, Any]]:
        """The AMGConfig fields, with the preset's values for a pixel (l2) index as defaults."""
        cfg = config_for(preset, "l2", 0.0)
        fields = {f.name: (str(f.type), getattr(cfg, f.name)) for f in dataclasses.fields(AMGConfig)}
        return {"index": ("str | None", None), "latent_screen": ("str | None", None), **fields}

    def pieces(self, request: Request) -> list[Piece]:
        if self.index is None:
            indexes = default_indexes(request.model)
        else:
            indexes = [open_index(ix) for ix in index_list(self.index)]
        threshold = request.model.settings.threshold
        screen, overrides = screening(indexes, threshold, self.latent_screen, **self.overrides)
        self.parts = [AMG(ix, config_for_index(self.preset, ix, threshold, **overrides),
                          first_scores=request.score_before, latent_screen=screen) for ix in indexes]
        self.piece = self.parts[0]
        return list(self.parts)

    def finish(self, request: Request, out: SampleOutput) -> None:
        for i in range(len(request.prompts)):
            summary = merged_summary([part.summary(i) for part in self.parts])
            request.applied[i] = any(summary["fired_steps"].values())
            request.extra[i]["amg"] = summary
