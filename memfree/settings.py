"""Per-model settings: the sampler's defaults and the calibrated detection threshold, read through one function.

They come from the model folder's ``memfree.json``, overlaid by a sidecar file in a user location. Calibration
writes into the model folder when memfree may change it, and into the sidecar when the folder is read-only,
inside an installed package, or belongs to a model opened by name (a bundled model is an asset, not a workspace).
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from memfree.io import write_json

SETTINGS_FILE = "memfree.json"


@dataclass(frozen=True)
class ModelSettings:
    """What a model samples with by default, and its calibrated detector (``detection``, None if uncalibrated)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    detection: dict | None = None
    info: dict = field(default_factory=dict)   # anything else memfree.json records (kind, training summary ...)

    @property
    def threshold(self) -> float | None:
        """The calibrated detection threshold on the first-step score, or None."""
        return None if not self.detection else self.detection.get("threshold")


def user_home() -> Path:
    """Where memfree keeps per-user state: ``$MEMFREE_HOME``, else ``~/.cache/memfree``."""
    return Path(os.environ.get("MEMFREE_HOME") or Path.home() / ".cache" / "memfree")


def sidecar_path(model_dir: Path) -> Path:
    """The user-location settings file of the model in ``model_dir`` (one per resolved folder)."""
    resolved = str(Path(model_dir).resolve())
    key = hashlib.sha1(resolved.encode()).hexdigest()[:12]
    return user_home() / "models" / f"{Path(resolved).name}-{key}" / SETTINGS_FILE


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_settings(model_dir: Path | None) -> ModelSettings:
    """The settings of the model in ``model_dir``: its memfree.json, with the user sidecar's entries on top."""
    if model_dir is None:
        return ModelSettings()
    data = {**_read_json(Path(model_dir) / SETTINGS_FILE), **_read_json(sidecar_path(model_dir))}
    known = {"num_inference_steps", "guidance_scale", "detection"}
    return ModelSettings(num_inference_steps=int(data.get("num_inference_steps", 50)),
                         guidance_scale=float(data.get("guidance_scale", 7.5)), detection=data.get("detection"),
                         info={k: v for k, v in data.items() if k not in known})


def _installed(path: Path) -> bool:
    resolved = path.resolve()
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return any(resolved.is_relative_to(Path(r).resolve()) for r in roots if r)


def writable_in_place(model_dir: Path, opened_by_name: bool) -> bool:
    """Whether calibration may write into the model folder itself."""
    target = Path(model_dir) / SETTINGS_FILE
    if opened_by_name or _installed(Path(model_dir)):
        return False
    return os.access(model_dir, os.W_OK) and (not target.exists() or os.access(target, os.W_OK))


def save_settings_entry(model_dir: Path, key: str, value, opened_by_name: bool = False) -> Path:
    """Store ``key: value`` for a model (see the module docstring for where) and return the file written."""
    path = Path(model_dir) / SETTINGS_FILE
    if not writable_in_place(model_dir, opened_by_name):
        path = sidecar_path(model_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
    current = _read_json(path)
    current[key] = value
    write_json(path, current)
    side = sidecar_path(model_dir)
    if path != side and key in (stale := _read_json(side)):  # the sidecar would hide the new value
        del stale[key]
        write_json(side, stale)
    return path
