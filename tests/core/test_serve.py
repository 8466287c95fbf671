"""`memfree serve` through FastAPI's TestClient on a tiny random model: the endpoints' shapes, every limit as a 4xx
with a message, the API key, the bounded queue (503 with Retry-After at once), one failing request leaving the next
alone, and the shutdown that answers waiting requests 503 while the running one finishes."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import memfree  # noqa: E402
from memfree.serve import create_app  # noqa: E402

STEPS = 2
PROMPT = "a red cat on a mat"


@pytest.fixture(scope="module")
def tiny(tiny_sd_path):
    return memfree.load(tiny_sd_path)


@pytest.fixture(scope="module")
def calibrated(tiny):
    return tiny.with_settings(detection={"threshold": 0.3})


@pytest.fixture(scope="module")
def client(calibrated):
    with TestClient(create_app(calibrated, default_mitigation="none")) as c:
        yield c


@pytest.fixture(scope="module")
def pixel_index(tmp_path_factory):
    """A small pixel index of 16x16 images (the tiny model's size), kept exactly (8-bit direct)."""
    from memfree.index import PixelEmbedder, build_index
    images = np.random.default_rng(0).integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("index") / "index"
    index = build_index(images, out, PixelEmbedder(), ids=[f"img{i}" for i in range(24)],
                        captions=[f"caption {i}" for i in range(24)], progress=False)
    return out, images, index


def png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return im.size


def assert_error(r, status: int, *words: str):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and isinstance(err["type"], str)
    for w in words:
        assert w in err["message"], (w, err["message"])
    return err


# ------------------------------------------------------------------------------------------- shapes

def test_check_answers_score_verdict_and_each_word(client, calibrated):
    r = client.post("/v1/memorization/check", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == PROMPT and body["threshold"] == 0.3
    assert [w["word"] for w in body["words"]] == PROMPT.split()
    assert all(isinstance(w["significance"], float) for w in body["words"])
    assert body["flagged"] == (body["score"] > 0.3)
    from memfree.detect import detect
    assert body["score"] == pytest.approx(detect(calibrated, [PROMPT], progress=False)[0].score, rel=1e-4)


def test_generation_is_shaped_like_the_openai_images_api(client):
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "steps": STEPS, "seed": 5,
                                                    "size": "16x16", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    for i, item in enumerate(body["data"]):
        assert png_size(item["b64_json"]) == (16, 16)
        m = item["memfree"]
        assert {"score", "flagged", "mitigated", "nearest"} <= set(m)
        assert m["seed"] == 5 + i and m["steps"] == STEPS and m["mitigation"] == "none"
        assert m["mitigated"] is False and m["nearest"] is None and m["flagged"] == (m["score"] > 0.3)


def test_models_health_docs_and_page(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["memfree"]["size"] == "16x16"
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue"]["size"] == 8
    assert client.get("/docs").status_code == 200
    assert "/v1/images/generations" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and 'id="generate"' in page.text
    for name, kind in (("app.js", "javascript"), ("app.css", "css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert "http://" not in asset.text and "https://" not in asset.text   # nothing from elsewhere
    assert "http://" not in page.text and "https://" not in page.text
    assert_error(client.get("/static/secret.py"), 404)


def test_requests_do_not_share_state(client, calibrated):
    """Same seed and steps, same image, whatever ran in between or beside it; the model's settings stay."""
    ask = lambda steps, seed: client.post("/v1/images/generations", json={"prompt": PROMPT, "steps": steps,
                                                                          "seed": seed})
    first = ask(STEPS, 3).json()["data"][0]["b64_json"]
    assert ask(3, 3).json()["data"][0]["b64_json"] != first
    results = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, ask(STEPS if k % 2 else 1, 3)))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values())
    assert results[1].json()["data"][0]["b64_json"] == first == results[3].json()["data"][0]["b64_json"]
    assert calibrated.settings.num_inference_steps == 50


def test_amg_with_an_index_reports_the_nearest_training_image(tiny, pixel_index):
    path, images, _ = pixel_index
    with TestClient(create_app(tiny, index=path)) as c:
        r = c.post("/v1/images/generations", json={"prompt": PROMPT, "steps": STEPS, "seed": 0})  # default: amg
        assert r.status_code == 200, r.text
        m = r.json()["data"][0]["memfree"]
        assert m["mitigation"] == "amg" and m["flagged"] is None   # this model is uncalibrated
        assert m["nearest"]["id"].startswith("img") and isinstance(m["nearest"]["similarity"], float)
        assert c.get("/v1/models").json()["data"][0]["memfree"]["training_images"] is True
        shown = c.get("/v1/training-images/img7")
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(shown.content)) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), images[7])   # exactly the indexed image
        assert_error(c.get("/v1/training-images/nope"), 404, "nope")


def test_amg_steers_by_every_index_the_model_folder_ships(tiny_sd_path, pixel_index, tmp_path):
    """A model folder with index/ and index-*/: the service's AMG runs one piece per index, as `memfree generate`."""
    import shutil
    from memfree.serve import Service
    path, _, _ = pixel_index
    folder = shutil.copytree(tiny_sd_path, tmp_path / "model")
    shutil.copytree(path, folder / "index")
    shutil.copytree(path, folder / "index-second")
    service = Service(memfree.load(folder))
    assert [p.path.name for p in service.amg_indexes] == ["index", "index-second"]
    assert service.index is service.amg_indexes[0]
    out = service.generate_job(PROMPT, 1, 0, "amg", STEPS)()
    assert len(out["reports"][0].extra["amg"]["per_index"]) == 2


def test_training_images_are_404_without_an_index(client):
    assert_error(client.get("/v1/training-images/0"), 404, "no training-set index")


# ------------------------------------------------------------------------------------------- limits

GEN = "/v1/images/generations"
CHECK = "/v1/memorization/check"
BAD_BODIES = [
    (GEN, {"prompt": ""}, "empty"),
    (GEN, {"prompt": "   "}, "empty"),
    (GEN, {"prompt": "x" * 1001}, "1000"),
    (GEN, {"prompt": "cat " * 100}, "tokens"),
    (GEN, {"prompt": "a cat\x07"}, "control character"),
    (GEN, {"prompt": "a\x00cat"}, "control character"),
    (GEN, {"prompt": "a cat\x85"}, "control character"),
    (GEN, {"prompt": None}, "prompt"),
    (GEN, {"prompt": 42}, "prompt"),
    (GEN, {"prompt": ["a", "cat"]}, "prompt"),
    (GEN, {"prompt": "a cat", "n": 0}, "n must be"),
    (GEN, {"prompt": "a cat", "n": 5}, "n must be"),
    (GEN, {"prompt": "a cat", "n": "2"}, "n"),
    (GEN, {"prompt": "a cat", "n": True}, "n"),
    (GEN, {"prompt": "a cat", "n": 1.5}, "n"),
    (GEN, {"prompt": "a cat", "steps": 0}, "steps must be"),
    (GEN, {"prompt": "a cat", "steps": 101}, "steps must be"),
    (GEN, {"prompt": "a cat", "steps": "many"}, "steps"),
    (GEN, {"prompt": "a cat", "size": "1024x1024"}, "16x16"),
    (GEN, {"prompt": "a cat", "size": "big"}, "16x16"),
    (GEN, {"prompt": "a cat", "size": 16}, "size"),
    (GEN, {"prompt": "a cat", "response_format": "url"}, "b64_json"),
    (GEN, {"prompt": "a cat", "mitigation": "rta"}, "unknown mitigation"),
    (GEN, {"prompt": "a cat", "mitigation": "amg"}, "index"),
    (GEN, {"prompt": "a cat", "seed": -1}, "seed"),
    (GEN, {"prompt": "a cat", "seed": 2**63}, "seed"),
    (GEN, {"prompt": "a cat", "model": "dall-e-3"}, "dall-e-3"),
    (GEN, {"prompt": "a cat", "quality": "hd"}, "unknown field 'quality'"),
    (GEN, {}, "prompt is required"),
    (GEN, [PROMPT], "JSON object"),
    (GEN, "a cat", "JSON object"),
    (CHECK, {"prompt": ""}, "empty"),
    (CHECK, {"prompt": "x" * 1001}, "1000"),
    (CHECK, {"prompt": "cat " * 100}, "tokens"),
    (CHECK, {"prompt": "a\x1bcat"}, "control character"),
    (CHECK, {"prompt": 3}, "prompt"),
    (CHECK, {"prompt": "a cat", "n": 2}, "unknown field"),
    (CHECK, {}, "prompt is required"),
    (CHECK, {"prompt": "a cat \ud800"}, "surrogate"),
    (GEN, {"prompt": "\udfff a cat"}, "surrogate"),
]


@pytest.mark.parametrize("path,body,words", BAD_BODIES, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _, _) in
                                                               enumerate(BAD_BODIES)])
def test_bad_input_is_a_400_with_a_message(client, path, body, words):
    sent = json.dumps(body).encode()   # ASCII, \u escapes: a lone surrogate travels as JSON allows
    err = assert_error(client.post(path, content=sent, headers={"Content-Type": "application/json"}), 400, words)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("content,headers,status,words", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}, 400, ""),
    (b"", {"Content-Type": "application/json"}, 400, "JSON object"),
    (b"null", {"Content-Type": "application/json"}, 400, "JSON object"),
    (b'{"prompt": "a cat"}', {"Content-Type": "text/plain"}, 400, ""),
    (b'{"prompt": "' + b"x" * 70_000 + b'"}', {"Content-Type": "application/json"}, 413, "65536"),
    (b"[" * 60_000, {"Content-Type": "application/json"}, 400, "JSON"),                 # too deep for json.loads
    (b'{"prompt": "a", "n": 1' + b"0" * 5000 + b"}", {"Content-Type": "application/json"}, 400, "JSON"),
    (b'{"prompt": "a", "n": 1e400}', {"Content-Type": "application/json"}, 400, ""),
    (b'{"prompt": "a \\ud800"}', {"Content-Type": "application/json"}, 400, "surrogate"),
])
def test_malformed_or_oversized_bodies_are_4xx(client, content, headers, status, words):
    for path in (GEN, CHECK):
        assert_error(client.post(path, content=content, headers=headers), status, words)


def test_a_lying_content_length_over_the_limit_is_413_before_the_body(client):
    r = client.post(CHECK, content=b'{"prompt": "a"}', headers={"Content-Type": "application/json",
                                                                "Content-Length": str(10**9)})
    assert_error(r, 413)


def test_wrong_methods_and_paths_are_4xx(client):
    assert_error(client.get(GEN), 405)
    assert_error(client.delete("/healthz"), 405)
    assert_error(client.get("/v2/nothing"), 404, "/v2/nothing")


def test_wen_needs_a_calibrated_model(tiny):
    with TestClient(create_app(tiny, default_mitigation="none")) as c:
        assert_error(c.post(GEN, json={"prompt": "a cat", "mitigation": "wen"}), 400, "calibrate")


# ------------------------------------------------------------------------------------------- the API key

def test_the_api_key_guards_every_call_but_the_page_and_health(tiny):
    with TestClient(create_app(tiny, api_key="s3cret", default_mitigation="none")) as c:
        for path in ("/", "/healthz", "/static/app.js", "/static/app.css", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        calls = [("get", "/v1/models", None), ("post", CHECK, {"prompt": "a cat"}),
                 ("post", GEN, {"prompt": "a cat", "steps": 1}), ("get", "/v1/training-images/0", None)]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                            {"Authorization": "s3cret"}, {"Authorization": "Bearer "}):
                r = getattr(c, method)(path, headers=headers, **({"json": body} if body else {}))
                err = assert_error(r, 401, "API key")
                assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post(CHECK, json={"prompt": "a cat"}, headers=good).status_code == 200
        assert c.post(GEN, json={"prompt": "a cat", "steps": 1}, headers=good).status_code == 200
        assert_error(c.post(CHECK, json={"prompt": ""}, headers=good), 400)   # a key does not skip the checks


def test_the_command_takes_its_key_from_the_environment(tiny_sd_path, monkeypatch):
    from memfree import serve as serve_module
    from memfree.cli import cli
    started = {}
    monkeypatch.setattr(serve_module, "run", lambda app, host, port, log_level: started.update(
        app=app, host=host, port=port))
    res = CliRunner().invoke(cli, ["serve", "--model", str(tiny_sd_path), "--port", "8123", "--mitigation", "none"],
                             env={"MEMFREE_API_KEY": "from-env"})
    assert res.exit_code == 0, res.output
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    with TestClient(started["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    res = CliRunner().invoke(cli, ["serve", "--model", str(tiny_sd_path), "--api-key", " "])
    assert res.exit_code != 0 and "empty" in res.output


# ------------------------------------------------------------------------------------------- the queue

def block_worker(app) -> threading.Event:
    """Occupy the queue's worker with a job that runs until the returned event is set."""
    release = threading.Event()
    queue = app.state.service.queue
    queue.submit(lambda: release.wait(30))
    deadline = time.monotonic() + 10
    while not queue.state()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return release


def wait_for(queue, waiting: int) -> None:
    deadline = time.monotonic() + 10
    while queue.state()["waiting"] < waiting:
        assert time.monotonic() < deadline, queue.state()
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_at_once(tiny):
    app = create_app(tiny, queue_size=1, default_mitigation="none")
    with TestClient(app) as c:
        release = block_worker(app)
        try:
            waiting = {}
            t = threading.Thread(target=lambda: waiting.update(r=c.post(CHECK, json={"prompt": "a cat"})))
            t.start()
            wait_for(app.state.service.queue, 1)
            for path, body in ((CHECK, {"prompt": "a dog"}), (GEN, {"prompt": "a dog", "steps": 1})):
                t0 = time.monotonic()
                r = c.post(path, json=body)
                assert time.monotonic() - t0 < 2                       # never hangs
                err = assert_error(r, 503, "busy")
                assert err["type"] == "server_busy" and int(r.headers["retry-after"]) >= 1
            assert_error(c.post(CHECK, json={"prompt": ""}), 400)      # bad input still a 400, not queued
        finally:
            release.set()
        t.join(30)
        assert waiting["r"].status_code == 200                          # the waiting one was served
        assert c.post(CHECK, json={"prompt": "a dog"}).status_code == 200


@pytest.mark.parametrize("error,status,kind", [(RuntimeError("kaput"), 500, "server_error"),
                                               (ValueError("a bad value"), 400, "invalid_request_error"),
                                               (MemoryError(), 503, "server_busy")])
def test_one_failing_request_does_not_break_the_next(client, monkeypatch, error, status, kind):
    import memfree.explain
    real = memfree.explain.explain
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(memfree.explain, "explain", flaky)
    err = assert_error(client.post(CHECK, json={"prompt": PROMPT}), status)
    assert err["type"] == kind
    r = client.post(CHECK, json={"prompt": PROMPT})
    assert r.status_code == 200 and len(calls) == 2
    assert client.post(GEN, json={"prompt": PROMPT, "steps": 1}).status_code == 200


def test_shutdown_answers_the_waiting_503_and_lets_the_running_one_finish(tiny):
    app = create_app(tiny, queue_size=2, default_mitigation="none")
    queue = app.state.service.queue
    with TestClient(app) as c:
        release = threading.Event()
        running = queue.submit(lambda: release.wait(30) and "finished")
        while not queue.state()["running"]:
            time.sleep(0.01)
        answers = []
        threads = [threading.Thread(target=lambda p=p: answers.append(c.post(CHECK, json={"prompt": p})))
                   for p in ("a cat", "a dog")]
        for t in threads:
            t.start()
        wait_for(queue, 2)
        assert queue.close(wait=False) == 2
        for t in threads:
            t.join(30)
        assert [r.status_code for r in answers] == [503, 503]
        assert all(r.json()["error"]["type"] == "shutting_down" for r in answers)
        assert_error(c.post(CHECK, json={"prompt": "a bird"}), 503, "shutting down")
        assert c.get("/healthz").status_code == 503
        assert not running.done()
        release.set()
        assert running.result(30) == "finished"


def test_uvicorn_shuts_down_gracefully(tiny):
    """The served app: on shutdown the waiting requests get their 503 at once and the running job finishes."""
    import socket

    import httpx

    from memfree.serve import make_server
    app = create_app(tiny, queue_size=2, default_mitigation="none")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    queue = app.state.service.queue
    release = threading.Event()
    running = queue.submit(lambda: release.wait(30) and "finished")
    answers = []
    clients = [threading.Thread(target=lambda p=p: answers.append(
        httpx.post(f"http://127.0.0.1:{port}{CHECK}", json={"prompt": p}, timeout=30))) for p in ("a cat", "a dog")]
    try:
        for t in clients:
            t.start()
        wait_for(queue, 2)
        server.should_exit = True
        for t in clients:
            t.join(10)
        assert [r.status_code for r in answers] == [503, 503]
        assert all(r.json()["error"]["type"] == "shutting_down" for r in answers)
        time.sleep(0.3)
        assert thread.is_alive() and not running.done()    # still waiting on the running job
    finally:
        release.set()
    thread.join(30)
    assert not thread.is_alive() and running.result(1) == "finished"


def test_the_app_answers_without_its_lifespan_too(tiny):
    """A client that never ran the app's startup (no `with TestClient(...)`) still gets its answer."""
    r = TestClient(create_app(tiny, default_mitigation="none")).post(CHECK, json={"prompt": "a cat"})
    assert r.status_code == 200 and r.json()["words"][1]["word"] == "cat"
