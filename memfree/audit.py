"""Auditing a training set for the duplication that makes text-to-image models memorize (the causes AMG names):

* ``verbatim``: one image trained two or more times under the same caption;
* ``image_dup``: one image (or near-identical images) under two or more distinct captions;
* ``caption_dup``: one caption over two or more distinct images that are near each other (a template).

Near-identical images are found with a k-nearest-neighbour search of a built :class:`TrainingIndex` (so it scales
like the index does, not like all pairs) and joined into groups with union-find. A pair is near when its RMS pixel
difference (an ℓ2 pixel index; values in [0, 1]) is below ``threshold``, or its cosine (a cosine index) above it.
Packages may register the training items and planted ground truth of their models under the entry-point group
``memfree.ground_truth``: a function taking a model folder and returning None (not mine) or a dict with ``items``
(a list of (id, caption) pairs, one per training step item) and ``groups`` (a list of {"kind", "ids"}).
"""
from __future__ import annotations

import base64
import html
import io
import re
import time
from collections import Counter, defaultdict
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from memfree.index import TrainingIndex

GROUND_TRUTH_ENTRY_POINTS = "memfree.ground_truth"
RMS_THRESHOLD = 0.125     # RMS pixel difference (values in [0, 1]) below which two images are near-identical
COSINE_NEAR = 0.85        # cosine above which two copy-detection embeddings are near-identical
KINDS = ("verbatim", "image_dup", "caption_dup")


def normalise_caption(caption: str | None) -> str:
    """Lower case, single spaces, no surrounding punctuation: captions equal under this are one caption."""
    text = re.sub(r"\s+", " ", str(caption or "")).strip().lower()
    return text.strip(" .,;:!?\"'")


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(index: TrainingIndex, threshold: float | None = None, k: int = 10, batch_size: int = 1024
               ) -> tuple[list[tuple[int, int, float]], float]:
    """Pairs of index positions (i < j) whose images are near-identical, with their RMS difference (ℓ2) or cosine,
    from each image's k nearest neighbours; and the threshold used."""
    metric = index.embedder.metric
    if threshold is None:
        threshold = COSINE_NEAR if metric == "cosine" else RMS_THRESHOLD
    spec = index.embedder.spec()
    scale = float(spec.get("scale", 1.0)) * float(np.sqrt(max(index.embedder.dim, 1)))
    n, pairs = len(index), {}
    for start in range(0, n, batch_size):
        pos = torch.arange(start, min(start + batch_size, n))
        values, found = index.search(index.vectors(pos), k + 1)
        for row, i in enumerate(pos.tolist()):
            for v, j in zip(values[row].tolist(), found[row].tolist()):
                if j < 0 or j == i:
                    continue
                score = v if metric == "cosine" else v / scale
                if (score >= threshold) if metric == "cosine" else (score <= threshold):
                    pairs[(min(i, j), max(i, j))] = round(float(score), 5)
    return [(i, j, s) for (i, j), s in sorted(pairs.items())], float(threshold)


def audit_data(index: TrainingIndex, items: Iterable[tuple[str, str | None]] | None = None, *,
               threshold: float | None = None, k: int = 10, min_size: int = 2, max_captions: int = 5) -> dict:
    """Duplicate clusters of a training set, largest training count first.

    ``items``: the training items as (id, caption) pairs, repeats included (one per time a pair is trained); by
    default each indexed image counts once under its stored caption. Ids not in the index are their own images.
    ``min_size``: clusters whose training count is below it are left out. Returns {"clusters", "summary"}."""
    started = time.perf_counter()
    pos_of = {i: p for p, i in enumerate(index.ids)}
    items = list(zip(index.ids, index.captions)) if items is None else list(items)
    counts: Counter = Counter((str(i), normalise_caption(c)) for i, c in items)
    shown: dict[str, str] = {}
    for _, c in items:
        shown.setdefault(normalise_caption(c), str(c or ""))
    pairs, threshold = near_pairs(index, threshold, k)
    extra = sorted({i for i, _ in counts if i not in pos_of})
    uf = _UnionFind(len(index) + len(extra))
    for i, j, _ in pairs:
        uf.union(i, j)
    node = {**pos_of, **{i: len(index) + n for n, i in enumerate(extra)}}

    group_items: dict[int, Counter] = defaultdict(Counter)   # component -> (id, caption) -> count
    for (i, c), n in counts.items():
        group_items[uf.find(node[i])][(i, c)] += n

    def caption_text(c: str) -> str:
        return shown.get(c, c)

    clusters = []
    for root, pair_counts in group_items.items():
        ids = sorted({i for i, _ in pair_counts}, key=lambda i: node[i])
        by_caption: dict[str, set] = defaultdict(set)
        per_caption: Counter = Counter()
        for (i, c), n in pair_counts.items():
            by_caption[c].add(i)
            per_caption[c] += n
        total = sum(pair_counts.values())
        if len(by_caption) >= 2:   # one image, or near-identical images, under several captions
            clusters.append({"kind": "image_dup", "ids": ids, "size": len(ids), "captions_distinct": len(by_caption),
                             "training_count": total,
                             "captions": [caption_text(c) for c, _ in per_caption.most_common(max_captions)]})
        for c, members in by_caption.items():
            if len(members) >= 2:  # one caption over several near-identical images
                members = sorted(members, key=lambda i: node[i])
                clusters.append({"kind": "caption_dup", "ids": members, "size": len(members), "captions_distinct": 1,
                                 "training_count": per_caption[c], "captions": [caption_text(c)]})
        for (i, c), n in pair_counts.items():
            if n >= 2:             # one image and caption trained several times
                clusters.append({"kind": "verbatim", "ids": [i], "size": 1, "captions_distinct": 1,
                                 "training_count": n, "captions": [caption_text(c)]})
    clusters = [c for c in clusters if c["training_count"] >= min_size]
    clusters.sort(key=lambda c: (-c["training_count"], -c["size"], KINDS.index(c["kind"]), node[c["ids"][0]]))
    for rank, c in enumerate(clusters, 1):
        c["rank"] = rank
    total_items = sum(counts.values())
    in_clusters = sum(c["training_count"] for c in clusters)
    summary = {"images": len(index), "training_items": total_items, "near_pairs": len(pairs), "k": k,
               "metric": index.embedder.metric,
               "threshold": threshold, "threshold_means": "cosine at or above" if index.embedder.metric == "cosine"
               else "RMS pixel difference (values in [0, 1]) at or below", "min_size": min_size,
               "clusters": len(clusters), "by_kind": {kind: sum(c["kind"] == kind for c in clusters) for kind in KINDS},
               "training_items_in_clusters": in_clusters, "seconds": round(time.perf_counter() - started, 2)}
    return {"clusters": clusters, "summary": summary}


def score_against(report: dict, groups: Sequence[dict]) -> dict:
    """Precision and recall of planted ``groups`` ({"kind", "ids"}): a group is found when a reported cluster of
    its kind holds its ids; a reported cluster is right when it holds some planted group of its kind."""
    clusters = report["clusters"]
    members = [(c["kind"], set(map(str, c["ids"]))) for c in clusters]
    found = [any(kind == g["kind"] and set(map(str, g["ids"])) <= ids for kind, ids in members) for g in groups]
    right = [any(g["kind"] == kind and set(map(str, g["ids"])) <= ids for g in groups) for kind, ids in members]
    by_kind = {}
    for kind in sorted({g["kind"] for g in groups}):
        picked = [f for f, g in zip(found, groups) if g["kind"] == kind]
        by_kind[kind] = {"planted": len(picked), "found": sum(picked)}
    return {"precision": sum(right) / len(right) if right else 1.0,
            "recall": sum(found) / len(found) if found else 1.0,
            "planted_groups": len(groups), "found_groups": sum(found), "reported_clusters": len(clusters),
            "unmatched_clusters": [c["rank"] for c, r in zip(clusters, right) if not r][:50], "by_kind": by_kind}


def ground_truth_for(model_dir: str | Path) -> dict | None:
    """The training items (and planted groups, if known) that an installed package provides for a model folder."""
    for ep in entry_points(group=GROUND_TRUTH_ENTRY_POINTS):
        found = ep.load()(Path(model_dir))
        if found is not None:
            return found
    return None


def _thumbnail(index: TrainingIndex, position: int, images=None) -> str | None:
    """A base64 PNG of one training image: from ``images`` (an array N×H×W×3 uint8, or a list of paths) when given,
    else from a pixel index's stored vector."""
    from PIL import Image
    if images is not None:
        item = images[position]
        im = Image.fromarray(np.asarray(item)) if not isinstance(item, (str, Path)) else Image.open(item).convert("RGB")
    else:
        spec = index.embedder.spec()
        if spec.get("kind") != "pixel" or not spec.get("size"):
            return None
        size = int(spec["size"])
        v = index.vectors(torch.tensor([position]))[0].numpy()
        im = Image.fromarray(np.clip(v, 0, 255).round().astype(np.uint8).reshape(3, size, size).transpose(1, 2, 0))
    im.thumbnail((96, 96)) if max(im.size) > 96 else None
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def render_html(report: dict, index: TrainingIndex, images=None, per_cluster: int = 6, max_clusters: int = 200) -> str:
    """A self-contained HTML page of the clusters (thumbnails embedded as base64 PNGs)."""
    pos_of = {i: p for p, i in enumerate(index.ids)}
    s = report["summary"]
    esc = html.escape
    rows = []
    for c in report["clusters"][:max_clusters]:
        thumbs = []
        for i in c["ids"][:per_cluster]:
            data = _thumbnail(index, pos_of[i], images) if i in pos_of else None
            thumbs.append(f'<img src="data:image/png;base64,{data}" title="{esc(i)}" width="64" height="64">'
                          if data else f"<span>{esc(i)}</span>")
        more = f" +{len(c['ids']) - per_cluster}" if len(c["ids"]) > per_cluster else ""
        caps = "<br>".join(esc(t) for t in c["captions"])
        rows.append(f"<tr><td>{c['rank']}</td><td>{c['kind']}</td><td>{c['training_count']}</td><td>{c['size']}</td>"
                    f"<td>{c['captions_distinct']}</td><td>{''.join(thumbs)}{more}</td><td>{caps}</td></tr>")
    score = report.get("score")
    score_line = (f"<p>Against the planted ground truth: precision {score['precision']:.3f}, "
                  f"recall {score['recall']:.3f} ({score['found_groups']}/{score['planted_groups']} groups).</p>"
                  if score else "")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>memfree data audit</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px;vertical-align:top}img{image-rendering:pixelated;margin:1px}</style></head><body>"
            f"<h1>memfree data audit</h1><p>{s['images']} images, {s['training_items']} training items, "
            f"{s['clusters']} clusters ({', '.join(f'{n} {k}' for k, n in s['by_kind'].items())}); near-identical: "
            f"{esc(s['threshold_means'])} {s['threshold']} among {s['k']} nearest neighbours.</p>{score_line}"
            "<table><tr><th>#</th><th>kind</th><th>trained</th><th>images</th><th>captions</th><th>images</th>"
            f"<th>captions (most trained)</th></tr>{''.join(rows)}</table></body></html>\n")
