"""`memfree serve`'s page in a real browser (Debian's headless Chromium through its chromedriver), on the bundled
testbed served by uvicorn on a free local port: a planted caption typed into the prompt box gets its words
coloured and the verdict "memorized"; Generate shows a progress state, then the image with its verdict (and the
nearest training image when AMG acted or a copy was found). A screenshot is kept as a test artifact."""
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import memfree
from memfree.serve import create_app, make_server
from memfree_testbed.bundle import load_testbed

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
STEPS = 30   # fewer than the model's 50; AMG leaves visible noise below about 30


def missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what}: .ci/run installs Debian's chromium and chromium-driver, and `make install` selenium")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    model = memfree.load("testbed")
    app = create_app(model)
    port = free_port()
    server = make_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield model, f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(60)
    assert not thread.is_alive()


@pytest.fixture()
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing("Debian's chromium or chromium-driver package is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1300", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # The driver is Debian's: with its path given, Selenium never looks for (or downloads) one of its own.
    drv = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield drv
    finally:
        drv.quit()


def wait(driver, seconds: float, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d), message)


def test_the_page_colours_a_planted_caption_and_generates(service, browser):
    from selenium.webdriver.common.by import By
    model, base, app = service
    prompt = load_testbed(model).eval_sets["verbatim"][0]["prompt"]
    browser.get(f"{base}/?steps={STEPS}&seed=0")
    wait(browser, 30, lambda d: "model testbed" in d.find_element(By.ID, "model-info").text, "no model information")
    assert browser.find_element(By.ID, "steps").get_attribute("value") == str(STEPS)

    browser.find_element(By.ID, "prompt").send_keys(prompt)
    verdict = browser.find_element(By.ID, "verdict")
    wait(browser, 90, lambda d: verdict.get_attribute("data-flagged") == "true", "the verdict never said flagged")
    assert "memorized" in verdict.text and "mem" in verdict.get_attribute("class").split()
    words = browser.execute_script(
        "return Array.from(document.querySelectorAll('#backdrop .word')).map(s => "
        "[s.textContent, s.dataset.significance, getComputedStyle(s).backgroundColor])")
    assert [w for w, _, _ in words] == prompt.split()
    assert all(sig is not None for _, sig, _ in words)                 # every word coloured by its significance
    with urllib.request.urlopen(urllib.request.Request(
            f"{base}/v1/memorization/check", data=json.dumps({"prompt": prompt}).encode(),
            headers={"Content-Type": "application/json"})) as r:
        check = json.load(r)
    top = max(range(len(words)), key=lambda i: check["words"][i]["significance"])
    assert float(words[top][1]) == pytest.approx(check["words"][top]["significance"], abs=1e-4)
    colour = [float(v) for v in re.findall(r"[\d.]+", words[top][2])]   # rgb(...) when fully opaque
    assert colour[:3] == [220, 0, 0] and (colour[3] if len(colour) == 4 else 1.0) > 0.3   # its top word is red

    # Record the button's and the progress indicator's states while the request runs: the page stays live.
    browser.execute_script(
        "window.seen = []; const b = document.getElementById('generate'), p = document.getElementById('progress');"
        "new MutationObserver(() => window.seen.push([b.disabled, p.hidden]))"
        ".observe(document.body, {attributes: true, subtree: true, attributeFilter: ['disabled', 'hidden']});")
    browser.find_element(By.ID, "generate").click()
    wait(browser, 120, lambda d: d.execute_script(
        "const i = document.querySelector('#results .result img.generated');"
        "return i !== null && i.complete && i.naturalWidth > 0"), "no generated image appeared")
    seen = browser.execute_script("return window.seen")
    assert [True, False] in seen                                         # disabled, progress shown ...
    assert browser.find_element(By.ID, "generate").is_enabled()          # ... and back afterwards
    assert browser.find_element(By.ID, "progress").get_attribute("hidden") is not None
    result = browser.find_element(By.CSS_SELECTOR, "#results .result")
    assert result.get_attribute("data-flagged") == "true"
    caption = result.find_element(By.TAG_NAME, "figcaption").text
    assert "score" in caption and "flagged" in caption
    if result.get_attribute("data-mitigated") == "true" or ": a copy" in result.text:
        wait(browser, 30, lambda d: d.execute_script(
            "const i = document.querySelector('#results .result img.nearest');"
            "return i !== null && i.complete && i.naturalWidth === 32"), "the nearest training image did not show")
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith((base, "data:", "blob:")) for r in resources), resources   # nothing from elsewhere

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve.png"
    shot.unlink(missing_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
