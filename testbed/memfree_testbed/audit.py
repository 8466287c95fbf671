"""The testbed's answer to memfree's ``memfree.ground_truth`` hook: the training items a testbed model was trained
on (every (image, caption) pair, repeats included) and its planted duplication groups, for `memfree audit data`."""
from __future__ import annotations

import json
from pathlib import Path


def planted_groups(manifest: dict) -> list[dict]:
    """The planted groups as {"kind", "group", "ids"}: a verbatim image, a face under many captions, a template."""
    groups: dict[tuple[str, int], list[str]] = {}
    for u in manifest["unique"]:
        if u["kind"] != "ordinary":
            groups.setdefault((u["kind"], int(u["group"])), []).append(str(u["id"]))
    return [{"kind": kind, "group": g, "ids": ids} for (kind, g), ids in sorted(groups.items())]


def ground_truth(model_dir: Path) -> dict | None:
    """Training items and planted groups of a testbed model folder; None for any other model."""
    path = Path(model_dir) / "testbed" / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    items = [(str(t["image"]), t["caption"]) for t in manifest.get("train", [])]
    return {"items": items, "groups": planted_groups(manifest), "source": "memfree_testbed"}
