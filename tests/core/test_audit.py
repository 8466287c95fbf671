"""`memfree audit data` on a small synthetic training set with planted duplication: exactly the planted clusters."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from memfree.audit import audit_data, normalise_caption, render_html, score_against
from memfree.cli import cli
from memfree.index import PixelEmbedder, build_index


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    base = images[10].astype(int)
    for j in (11, 12):   # a template: near-identical noisy copies of image 10, all under one caption
        images[j] = np.clip(base + rng.integers(-6, 7, size=base.shape), 0, 255).astype(np.uint8)
    ids = [f"img{i}" for i in range(40)]
    captions = [f"ordinary caption {i}" for i in range(40)]
    for j in (10, 11, 12):
        captions[j] = "A Template Caption"
    index = build_index(images, tmp_path_factory.mktemp("audit") / "index", PixelEmbedder(), ids=ids,
                        captions=captions, progress=False)
    items = list(zip(ids, captions))
    items += [("img3", "a face under another caption"), ("img3", "and a third caption.")]   # image duplication
    items += [("img7", "ordinary caption 7")]                                                 # verbatim repeat
    return index, items


def _summary(report):
    return sorted((c["kind"], tuple(c["ids"]), c["training_count"]) for c in report["clusters"])


def test_finds_exactly_the_planted_clusters(planted):
    index, items = planted
    report = audit_data(index, items)
    assert _summary(report) == [("caption_dup", ("img10", "img11", "img12"), 3), ("image_dup", ("img3",), 3),
                                ("verbatim", ("img7",), 2)]
    assert [c["rank"] for c in report["clusters"]] == [1, 2, 3]
    assert report["summary"]["by_kind"] == {"verbatim": 1, "image_dup": 1, "caption_dup": 1}
    assert report["summary"]["near_pairs"] == 3
    dup = next(c for c in report["clusters"] if c["kind"] == "image_dup")
    assert dup["captions_distinct"] == 3 and dup["size"] == 1
    groups = [{"kind": "caption_dup", "ids": ["img10", "img11", "img12"]}, {"kind": "image_dup", "ids": ["img3"]},
              {"kind": "verbatim", "ids": ["img7"]}]
    score = score_against(report, groups)
    assert score["precision"] == 1.0 and score["recall"] == 1.0
    assert score_against(report, groups + [{"kind": "verbatim", "ids": ["img9"]}])["recall"] == 0.75


def test_min_size_and_index_only(planted):
    index, items = planted
    assert _summary(audit_data(index, items, min_size=3)) == [("caption_dup", ("img10", "img11", "img12"), 3),
                                                              ("image_dup", ("img3",), 3)]
    assert _summary(audit_data(index)) == [("caption_dup", ("img10", "img11", "img12"), 3)]
    assert audit_data(index, threshold=0.0)["clusters"] == []   # noisy copies are not exact copies
    assert normalise_caption("  A  Template caption. ") == "a template caption"


def test_html_is_self_contained(planted):
    index, items = planted
    page = render_html(audit_data(index, items), index)
    assert page.count("data:image/png;base64,") == 5 and "http" not in page


def test_cli(planted, tmp_path):
    index, items = planted
    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in items))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["audit", "data", "--index", str(index.path), "--items", str(items_file),
                                   "--json", str(out / "a.json"), "--html", str(out / "a.html")])
    assert res.exit_code == 0, res.output
    assert "3 clusters" in res.output
    report = json.loads((out / "a.json").read_text())
    assert _summary(report)[1] == ("image_dup", ("img3",), 3)
    assert (out / "a.html").read_text().startswith("<!doctype html>")
    bad = CliRunner().invoke(cli, ["audit", "data", "--index", str(index.path), "--items", str(out / "a.html")])
    assert bad.exit_code != 0 and "--items" in bad.output
