"""`memfree serve`: a protected image service shaped like the OpenAI images API, and a web page to look into a prompt.

:func:`create_app` builds the FastAPI application around one loaded model:

* ``POST /v1/images/generations``: images under a mitigation (AMG by default), each with memfree's verdict
  (detection score, flagged, mitigated, nearest training image);
* ``POST /v1/memorization/check``: a prompt's first-step detection score and which of its words drive it;
* ``GET /v1/training-images/{id}``: a training image, when the index stores its pixels;
* ``GET /v1/models``, ``GET /healthz``, and ``GET /`` (one page, plain HTML, JS and CSS served from here).

All model work goes through one bounded queue with a single worker thread (torch on a CPU does not get faster by
running requests side by side): at most ``queue_size`` requests wait, and the next one is answered 503 with
``Retry-After`` at once. Every error is JSON, ``{"error": {"message", "type", "param"}}``, with a 4xx status for
anything a client can get wrong; :func:`run` serves the app with uvicorn and a graceful shutdown (queued requests
are answered 503, the running one finishes).
"""
from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import io
import math
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from memfree.model import Model

MITIGATIONS = ("none", "wen", "amg")
MAX_SEED = 2**62                 # as the command line: room for seed + i within what torch's generators take
MAX_BODY = 64 * 1024             # bytes of a request body
MAX_PROMPT_CHARS = 1000
LOSSLESS_FACTORIES = ("Flat", "SQ8_direct")   # FAISS storage that gives a pixel index's vectors back exactly
PUBLIC_PATHS = {"/", "/healthz", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


# ----------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An answer other than success: HTTP status, a message for people, an OpenAI-style type and the parameter."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers or {}


def error_response(status: int, message: str, type: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param}}, status_code=status,
                        headers=headers)


class QueueFull(Exception):
    """Every place in the queue is taken."""


class QueueClosed(Exception):
    """The service is shutting down: the request was not run."""


# ----------------------------------------------------------------------------------------------- the queue

class ModelQueue:
    """One worker thread runs model work, one job at a time; at most ``size`` jobs wait behind the running one.

    ``submit`` never blocks: it returns a :class:`concurrent.futures.Future`, or raises :class:`QueueFull` or
    :class:`QueueClosed`. A job's exception goes to its own future only, so one failure never reaches another.
    """

    def __init__(self, size: int = 8):
        if size < 0:
            raise ValueError("queue_size must be 0 or more")
        self.size = size
        self._cond = threading.Condition()
        self._waiting: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._seconds: deque[float] = deque(maxlen=20)   # recent jobs' run times, for Retry-After

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._work, name="memfree-model", daemon=True)
                self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def state(self) -> dict:
        with self._cond:
            return {"running": self._running, "waiting": len(self._waiting), "size": self.size}

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean run time times the jobs ahead (1 to 120)."""
        with self._cond:
            ahead = len(self._waiting) + self._running
            mean = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
        return max(1, min(120, math.ceil(mean * max(ahead, 1))))

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise QueueClosed("the service is shutting down")
            if len(self._waiting) + self._running > self.size:   # the running job plus `size` waiting
                raise QueueFull(f"all {self.size + 1} places (one running, {self.size} waiting) are taken")
            self._waiting.append((fn, future))
            self._cond.notify()
        self.start()   # normally started with the app; a caller that skipped that still gets its answer
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                fn, future = self._waiting.popleft()
                self._running = True
            try:
                if future.set_running_or_notify_cancel():   # False: its request went away while it waited
                    t0 = time.perf_counter()
                    try:
                        result = fn()
                    except BaseException as e:   # the job's own failure, delivered to its request only
                        future.set_exception(e)
                    else:
                        future.set_result(result)
                    self._seconds.append(time.perf_counter() - t0)
            finally:
                with self._cond:
                    self._running = False

    def close(self, wait: bool = True, timeout: float | None = None) -> int:
        """Stop taking jobs, fail the waiting ones with :class:`QueueClosed`, let the running one finish (joined
        when ``wait``). Returns how many waiting jobs were cancelled."""
        with self._cond:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for _, future in dropped:
            if future.set_running_or_notify_cancel():
                future.set_exception(QueueClosed("the service is shutting down; this request was not run"))
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return len(dropped)


# ----------------------------------------------------------------------------------------------- requests

class GenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations`` (the OpenAI images API's fields, and memfree's own)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    seed: int | None = None
    mitigation: str | None = None
    steps: int | None = None
    model: str | None = None
    user: str | None = None


class CheckRequest(BaseModel):
    """The body of ``POST /v1/memorization/check``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str


def _image_size(model: Model) -> tuple[int, int]:
    """(width, height) of the images the model makes: its sample size, times the VAE's scale when it has one."""
    _, h, w = model.latent_shape
    if model.vae is not None:
        scale = 2 ** (len(model.vae.config.block_out_channels) - 1)
        h, w = h * scale, w * scale
    return w, h


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    from memfree.images import to_uint8
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


class TrainingImages:
    """Training images read back from an index that stores their pixels: a pixel index (memfree's ``pixel``
    embedder) kept exactly (flat or 8-bit direct), whose vectors are the images × 255. Other indexes hold
    embeddings only, and :meth:`png` returns None."""

    def __init__(self, index):
        self.index = index
        spec = index.embedder.spec() if index is not None else {}
        size = spec.get("size")
        self.available = (index is not None and spec.get("kind") == "pixel" and bool(size)
                          and spec.get("dim") == 3 * size * size and index.factory in LOSSLESS_FACTORIES)
        self.size = size
        self._positions = {id_: i for i, id_ in enumerate(index.ids)} if self.available else {}

    def png(self, id_: str) -> bytes | None:
        pos = self._positions.get(id_)
        if pos is None:
            return None
        vec = self.index.vectors(torch.tensor([pos]))[0]
        return _png((vec / 255.0).reshape(3, self.size, self.size).clamp(0, 1))


def _control_character(text: str) -> tuple[int, str] | None:
    for i, c in enumerate(text):
        if (ord(c) < 32 and c not in "\t\n\r") or 127 <= ord(c) < 160:
            return i, c
    return None


# ----------------------------------------------------------------------------------------------- the service

class Service:
    """The model, its index and the queue behind the endpoints."""

    def __init__(self, model: Model, index=None, queue_size: int = 8, max_n: int = 4, max_steps: int = 100,
                 max_prompt_chars: int = MAX_PROMPT_CHARS, default_mitigation: str = "amg"):
        from memfree.index import TrainingIndex
        if max_n < 1 or max_steps < 1 or max_prompt_chars < 1:
            raise ValueError("max_n, max_steps and max_prompt_chars must be at least 1")
        if default_mitigation not in MITIGATIONS:
            raise ValueError(f"unknown mitigation {default_mitigation!r}; choose one of {', '.join(MITIGATIONS)}")
        amg_indexes = None
        if index is None and model.path is not None and (Path(model.path) / "index" / "meta.json").exists():
            from memfree.mitigate import default_indexes
            amg_indexes = default_indexes(model)   # the indexes the model folder ships, as `memfree generate` uses
            index = amg_indexes[0]
        if index is not None and not isinstance(index, TrainingIndex):
            index = TrainingIndex.load(index)
        self.model, self.index = model, index
        self.amg_indexes = amg_indexes or ([index] if index is not None else None)   # AMG steers by each
        self.queue = ModelQueue(queue_size)
        self.max_n, self.max_prompt_chars = max_n, max_prompt_chars
        train_steps = int(getattr(model.scheduler.config, "num_train_timesteps", 1000))
        self.default_steps = model.settings.num_inference_steps
        self.max_steps = min(max(max_steps, self.default_steps), train_steps)
        self.default_mitigation = default_mitigation
        self.width, self.height = _image_size(model)
        self.training_images = TrainingImages(index)
        # A tokenizer of the request handlers' own: a fast tokenizer must not be used by two threads at once,
        # and the worker's model uses the model's.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.max_tokens = int(model.tokenizer.model_max_length)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    # -- checks a request passes before it takes a place in the queue

    def check_prompt(self, prompt: str) -> str:
        if not prompt.strip():
            raise ApiError(400, "prompt is empty", param="prompt")
        if len(prompt) > self.max_prompt_chars:
            raise ApiError(400, f"prompt is {len(prompt)} characters long; at most {self.max_prompt_chars} are taken",
                           param="prompt")
        bad = _control_character(prompt)
        if bad is not None:
            raise ApiError(400, f"prompt holds the control character U+{ord(bad[1]):04X} at position {bad[0]}; "
                                "remove it", param="prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"prompt holds an unpaired surrogate (U+{ord(prompt[e.start]):04X}) at position "
                                f"{e.start}: it is not text", param="prompt") from None
        try:
            tokens = len(self.tokenizer(prompt, truncation=False).input_ids)
        except Exception as e:   # whatever the tokenizer cannot read is the prompt's fault, not the server's
            raise ApiError(400, f"prompt cannot be tokenized ({type(e).__name__}: {e})", param="prompt") from None
        if tokens > self.max_tokens:
            raise ApiError(400, f"prompt is {tokens} tokens long (with its start and end tokens); the model reads at "
                                f"most {self.max_tokens}: shorten it", param="prompt")
        return prompt

    def describe(self) -> dict:
        index = None if self.index is None else {"images": len(self.index), "metric": self.index.embedder.metric}
        return {"size": self.size, "default_steps": self.default_steps, "max_steps": self.max_steps,
                "max_n": self.max_n, "mitigations": list(MITIGATIONS), "default_mitigation": self.default_mitigation,
                "threshold": self.model.settings.threshold, "index": index,
                "training_images": self.training_images.available, "max_prompt_chars": self.max_prompt_chars,
                "max_prompt_tokens": self.max_tokens, "queue_size": self.queue.size}

    # -- model work, run on the queue's worker

    async def run(self, job: Callable[[], Any]) -> Any:
        try:
            future = self.queue.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"the service is busy: {e}; retry later", "server_busy",
                           headers={"Retry-After": str(self.queue.retry_after())}) from None
        except QueueClosed as e:
            raise ApiError(503, str(e), "shutting_down", headers={"Retry-After": "5"}) from None
        try:
            return await asyncio.wrap_future(future)
        except ApiError:
            raise
        except QueueClosed as e:
            raise ApiError(503, str(e), "shutting_down", headers={"Retry-After": "5"}) from None
        except Exception as e:
            raise _model_failure(e) from e

    def generate_job(self, prompt: str, n: int, seed: int, mitigation: str, steps: int) -> Callable[[], dict]:
        def job() -> dict:
            from memfree.mitigate import generate
            from memfree.similarity import nearest_training
            model = self.model.with_settings(num_inference_steps=steps)   # this request's own settings
            options = {"index": self.amg_indexes} if mitigation == "amg" else {}
            res = generate(model, [prompt] * n, mitigation, seed=seed, progress=False, **options)
            nearest = nearest_training(self.index, res.images) if self.index is not None else [None] * n
            return {"reports": res.reports, "nearest": nearest, "pngs": [_png(img) for img in res.images],
                    "seconds": res.seconds}
        return job

    def check_job(self, prompt: str) -> Callable[[], dict]:
        def job() -> dict:
            from memfree.explain import explain
            t0 = time.perf_counter()
            e = explain(self.model, prompt, method="occlusion")
            return {"explanation": e, "seconds": time.perf_counter() - t0}
        return job


def _model_failure(e: Exception) -> ApiError:
    """A failure inside model work, as the answer to that request alone."""
    from memfree.sampling import NumericalError
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return ApiError(503, "the model ran out of memory on this request; retry later or ask for fewer images",
                        "server_busy", headers={"Retry-After": "10"})
    if isinstance(e, NumericalError):
        return ApiError(500, f"the model failed on this request: {e}", "model_error")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    return ApiError(500, f"the model failed on this request ({type(e).__name__}: {e})", "server_error")


# ----------------------------------------------------------------------------------------------- the app

class _Gate:
    """ASGI middleware in front of every route: the API key, then the body size (read before the app sees it)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def _public(self, scope) -> bool:
        path = scope["path"]
        return scope["method"] in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith("/static/"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and not self._public(scope):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                said = "a wrong API key" if scheme.lower() == "bearer" else "no API key"
                await error_response(401, f"this service needs an API key (Authorization: Bearer KEY); got {said}",
                                     "authentication_error", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        too_big = error_response(413, f"the request body is over {self.max_body} bytes", "request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await too_big(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body:
                await too_big(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError, fields: list[str]) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request is malformed", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})", None
    if kind == "missing" and not loc:
        return "the body must be a JSON object (Content-Type: application/json)", None
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return ("the body must be a JSON object (Content-Type: application/json)"
                + (f" with the fields {', '.join(fields)}" if fields else "")), None
    name = ".".join(loc) or "body"
    if kind == "extra_forbidden":
        return f"unknown field {name!r}; this endpoint takes {', '.join(fields)}", name
    if kind == "missing":
        return f"{name} is required", name
    return f"{name}: {err.get('msg', 'invalid value')}", name


def _page_file(name: str) -> str:
    return resources.files("memfree").joinpath("web", name).read_text(encoding="utf-8")


def create_app(model: Model, index=None, api_key: str | None = None, queue_size: int = 8, max_n: int = 4,
               max_steps: int = 100, max_prompt_chars: int = MAX_PROMPT_CHARS, max_body: int = MAX_BODY,
               default_mitigation: str = "amg") -> FastAPI:
    """The service around ``model`` (a :class:`memfree.Model`).

    ``index``: a training-set index (:class:`memfree.index.TrainingIndex` or its folder) for AMG and for every
    image's nearest training item; default: the ``index/`` the model folder ships, if any. ``api_key``: when set,
    every call but the page, its assets, ``/healthz`` and the API docs needs ``Authorization: Bearer KEY``.
    ``queue_size`` requests may wait behind the running one; ``max_n`` images per call; ``max_steps`` sampling steps
    per call (at least the model's default). The queue's worker starts and stops with the app's lifespan (a
    TestClient used as a context manager, or uvicorn).
    """
    service = Service(model, index, queue_size, max_n, max_steps, max_prompt_chars, default_mitigation)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.queue.start()
        try:
            yield
        finally:   # the running job finishes; any still waiting are answered 503
            await asyncio.get_running_loop().run_in_executor(None, service.queue.close)

    app = FastAPI(title="memfree", version=_version(), lifespan=lifespan,
                  description="A text-to-image service that detects, explains and mitigates training-data "
                              "memorization. `POST /v1/images/generations` is shaped like the OpenAI images API.")
    app.state.service = service
    bearer = [Depends(HTTPBearer(auto_error=False, description="The service's API key, when it has one"))]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        route = request.scope.get("route")
        body_model = {"/v1/images/generations": GenerationRequest, "/v1/memorization/check": CheckRequest}.get(
            getattr(route, "path", ""))
        fields = list(body_model.model_fields) if body_model is not None else []
        message, param = _validation_message(exc, fields)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        if exc.status_code == 400 and "parsing the body" in message:   # what FastAPI says when json.loads gives up
            message = "the body could not be read as JSON (nested too deeply, or a number too large?)"
        return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):   # a bug: still JSON with a message
        return error_response(500, f"internal error ({type(exc).__name__}: {exc})", "server_error")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_page_file("index.html"), headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise ApiError(404, f"no such file: /static/{name}", "not_found_error")
        return Response(_page_file(name), media_type=ASSETS[name], headers=PAGE_HEADERS)

    @app.get("/healthz", tags=["service"])
    async def healthz():
        """Liveness: ``ok`` while the service takes requests, with its queue's state."""
        closed = service.queue.closed
        body = {"status": "shutting_down" if closed else "ok", "model": model.label, "queue": service.queue.state()}
        return JSONResponse(body, status_code=503 if closed else 200)

    @app.get("/v1/models", tags=["service"], dependencies=bearer)
    async def models():
        """The model this service runs (OpenAI's list shape), with its limits and what memfree has for it."""
        created = 0
        if model.path is not None and (Path(model.path) / "model_index.json").exists():
            created = int((Path(model.path) / "model_index.json").stat().st_mtime)
        return {"object": "list", "data": [{"id": model.label, "object": "model", "created": created,
                                             "owned_by": "memfree", "memfree": service.describe()}]}

    @app.post("/v1/images/generations", tags=["images"], dependencies=bearer)
    async def images_generations(body: GenerationRequest):
        """Images for a prompt under a mitigation (``none``, ``wen``, ``amg``: default ``amg``), each with memfree's
        verdict: the prompt's detection score, whether it is flagged, whether the mitigation acted, and the
        nearest training image when the service has an index. Image i uses seed + i."""
        if body.model is not None and body.model != model.label:
            raise ApiError(400, f"this service runs the model {model.label!r}, not {body.model!r}", param="model")
        prompt = service.check_prompt(body.prompt)
        if not 1 <= body.n <= service.max_n:
            raise ApiError(400, f"n must be from 1 to {service.max_n}, got {body.n}", param="n")
        if body.size is not None and body.size.strip().lower() != service.size:
            raise ApiError(400, f"size {body.size!r} is not offered: this model makes {service.size} images only",
                           param="size")
        if body.response_format != "b64_json":
            raise ApiError(400, f"response_format {body.response_format!r} is not offered: only b64_json",
                           param="response_format")
        mitigation = body.mitigation if body.mitigation is not None else service.default_mitigation
        if mitigation not in MITIGATIONS:
            raise ApiError(400, f"unknown mitigation {mitigation!r}; choose one of {', '.join(MITIGATIONS)}",
                           param="mitigation")
        if mitigation == "amg" and service.index is None:
            raise ApiError(400, "mitigation amg needs a training-set index and this service has none: start it with "
                                "--index DIR, or ask for mitigation none or wen", param="mitigation")
        if mitigation == "wen" and model.settings.threshold is None:
            raise ApiError(400, "mitigation wen needs the model's calibrated detection threshold and this model has "
                                "none: run `memfree calibrate`, or ask for mitigation none or amg", param="mitigation")
        steps = service.default_steps if body.steps is None else body.steps
        if not 1 <= steps <= service.max_steps:
            raise ApiError(400, f"steps must be from 1 to {service.max_steps}, got {steps}", param="steps")
        seed = random.randrange(MAX_SEED - 64) if body.seed is None else body.seed
        if not 0 <= seed <= MAX_SEED - 64:
            raise ApiError(400, f"seed must be from 0 to {MAX_SEED - 64}, got {seed}", param="seed")
        out = await service.run(service.generate_job(prompt, body.n, seed, mitigation, steps))
        threshold = model.settings.threshold
        data = []
        for rep, near, png in zip(out["reports"], out["nearest"], out["pngs"]):
            data.append({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None, "memfree": {
                "score": rep.score_before, "score_after": rep.score_after, "threshold": threshold,
                "flagged": None if threshold is None else bool(rep.score_before > threshold),
                "mitigated": bool(rep.applied), "mitigation": mitigation, "seed": rep.seed, "steps": steps,
                "nearest": None if near is None else {"id": near["id"], "similarity": near["similarity"],
                                                      "memorized": near["memorized"]}}})
        return {"created": int(time.time()), "data": data}

    @app.post("/v1/memorization/check", tags=["memorization"], dependencies=bearer)
    async def memorization_check(body: CheckRequest):
        """The prompt's first-step detection score against the calibrated threshold, and each word's significance
        (how much the score falls when the word is deleted)."""
        prompt = service.check_prompt(body.prompt)
        out = await service.run(service.check_job(prompt))
        e = out["explanation"]
        threshold = model.settings.threshold
        return {"prompt": prompt, "score": e.score, "threshold": threshold,
                "flagged": None if threshold is None else bool(e.score > threshold),
                "words": [{"word": w, "significance": s} for w, s in zip(e.words, e.significance)],
                "top_words": [e.words[i] for i in e.top_words(2)], "seconds": round(out["seconds"], 4)}

    @app.get("/v1/training-images/{image_id}", tags=["memorization"], dependencies=bearer,
             responses={200: {"content": {"image/png": {}}}})
    async def training_image(image_id: str):
        """The training image with this index id, as a PNG, when the index stores pixels (a ``pixel`` index kept
        exactly); 404 otherwise."""
        if not service.training_images.available:
            raise ApiError(404, "this service has no training images to show: its index stores embeddings, not "
                                "pixels" if service.index is not None else
                                "this service has no training-set index", "not_found_error", param="image_id")
        png = service.training_images.png(image_id)
        if png is None:
            raise ApiError(404, f"no training image with id {image_id!r}", "not_found_error", param="image_id")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    app.add_middleware(_Gate, api_key=api_key, max_body=max_body)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("memfree")
    except Exception:
        return "0"


# ----------------------------------------------------------------------------------------------- running it

def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until SIGINT or SIGTERM (see :func:`make_server` for the shutdown)."""
    make_server(app, host, port, log_level).run()


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                graceful: float = 300):
    """A uvicorn server for ``app`` with a graceful shutdown: it stops accepting connections, answers new and
    waiting requests 503 at once, and lets the running one finish (``graceful`` seconds at most)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            service = getattr(app.state, "service", None)
            if service is not None:   # before uvicorn waits on open requests: those waiting get their 503 now
                service.queue.close(wait=False)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful,
                            access_log=log_level == "debug", lifespan="on")
    return Server(config)


def local_host(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


__all__ = ["ApiError", "ModelQueue", "QueueClosed", "QueueFull", "Service", "create_app", "make_server", "run"]

