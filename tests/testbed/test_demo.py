"""`memfree demo` in a real browser (Debian's headless Chromium): the page has every section, the summary table
and, in every row, the generation without and with memfree; a screenshot is kept as a test artifact."""
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import memfree
from memfree_testbed.demo import SECTIONS, run_demo

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SIZES = {name: 2 for name, _, _ in SECTIONS}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium package is not installed")
    return path


class Page(HTMLParser):
    """What the rendered DOM holds: section ids, summary-table rows, and per table row its image classes."""

    def __init__(self):
        super().__init__()
        self.ids, self.rows, self.summary_rows, self.in_summary = set(), [], 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self.in_summary = a.get("id") == "summary-table"
        if tag == "tr":
            self.summary_rows += self.in_summary
            if a.get("class") == "row":
                self.rows.append([])
        if tag == "img" and self.rows and a.get("class") in ("with", "without"):
            self.rows[-1].append(a["class"])


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    model = memfree.load("testbed").with_settings(num_inference_steps=10)
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(model, out, progress=False, sizes=SIZES)
    return model, Path(res["html"]), res


def test_the_page_shows_problem_and_cure_in_a_browser(demo_page, tmp_path):
    model, page, res = demo_page
    browser = chromium()
    run = lambda *extra: subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra,
                                         page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = run("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Page()
    parsed.feed(dom.stdout)
    assert {"summary", *(name for name, _, _ in SECTIONS)} <= parsed.ids
    assert parsed.summary_rows == 1 + len(SECTIONS)                      # header and one row per prompt kind
    assert len(parsed.rows) == sum(SIZES.values())
    assert all(sorted(r) == ["with", "without"] for r in parsed.rows)    # both generations in every row
    assert str(model.path) not in dom.stdout and "<code>testbed</code>" in dom.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    shot.unlink(missing_ok=True)
    assert run("--window-size=1250,2400", f"--screenshot={shot}").returncode == 0
    assert shot.exists() and shot.stat().st_size > 10_000
    assert "bit-identical" in dom.stdout                                  # held-out rows AMG left alone say so
