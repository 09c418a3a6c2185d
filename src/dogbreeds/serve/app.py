"""The REST service: FastAPI app around a `Predictor` and a micro-batcher.

    GET  /                 the web page (serve/static, works offline)
    GET  /healthz          liveness + model name + batcher counters
    GET  /v1/breeds        the classes the model knows
    POST /v1/predict       an image (multipart field `image`, or the raw body) -> top-k JSON
    POST /v1/explain       an image -> Grad-CAM overlay PNG (runs and checkpoints; not .onnx files)
    GET  /docs             OpenAPI docs (FastAPI)

Limits (each answered with a status code and a message, never by growing memory):
    413  body over --max-upload-mb (Content-Length checked first, then enforced while reading),
         or an image over the pixel limit
    415  not an image (or empty); 422  a corrupt or truncated image, or a missing form field
    408  the body did not arrive within --body-timeout (the headers: --header-timeout, serve/timeouts.py)
    503  too many requests in flight, or too many body bytes being received (Retry-After says when to retry)

Slow clients cost a socket, not a slot: a request's body is read (bounded in bytes, time, and
in total bytes across all requests being read) before it takes an admission slot, so clients
that trickle bytes cannot lock real requests out. Decoding is bounded too: at most one decode
per CPU core at once (--max-decodes), each decoding no more pixels than the model needs
(data/decode.py's min_short_side: JPEG draft mode, integer box reduction), and freed heap memory
is handed back to the OS after each decode (glibc malloc_trim), so pixel bombs under the pixel
limit cost bounded, transient memory. A client that disconnects mid-upload gets one log line.

Predictions run on whatever backend the predictor has (infer/backend.py; for a run: onnxruntime
by default, `--engine torch` for PyTorch eager). Grad-CAM needs the PyTorch model, so /v1/explain
runs on a private PyTorch copy: the backend's own model when it has one, else the run's
checkpoint (`backend.checkpoint`) loaded on the first explain request. An .onnx file has no
checkpoint: 501.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ..errors import EmptyImageError, ImageDecodeError, NotAnImageError, TooManyPixelsError
from ..infer.predictor import DEFAULT_MAX_PIXELS, Predictor
from ..trust.present import verdict_text
from .batcher import MicroBatcher, Overloaded

log = logging.getLogger("dogbreeds.serve")
STATIC_DIR = Path(__file__).with_name("static")
RETRY_AFTER_S = "1"  # a batch takes well under a second; 1 s is the smallest header value


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 16          # images per forward pass
    max_wait_ms: float = 10.0    # how long the first request of a batch waits for company
    max_queue: int = 64          # requests waiting beyond the batch in progress; then 503
    max_upload_mb: float = 10.0  # request body limit
    max_pixels: int = DEFAULT_MAX_PIXELS
    header_timeout_s: float = 10.0  # request line + headers must arrive within this (serve/timeouts.py)
    body_timeout_s: float = 60.0     # the whole body must arrive within this once the headers are in; else 408
    max_decodes: int = 0             # images decoded at once; 0: one per CPU core

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def decode_slots(self) -> int:
        if self.max_decodes:
            return self.max_decodes
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @property
    def max_reading_bytes(self) -> int:
        """Body bytes being received across all requests at once: the memory that admission
        used to bound (max_queue + max_batch bodies of max_upload_mb), now counted in bytes."""
        return (self.max_queue + self.max_batch) * self.max_upload_bytes


class _Admission:
    """Counts requests being read, decoded, queued or computed. Bounding it bounds memory:
    at most (max_queue + max_batch) bodies of at most max_upload_mb each are ever held."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0

    def check(self) -> None:
        if self.in_flight >= self.capacity:
            raise HTTPException(503, f"server busy: {self.in_flight} requests in flight; retry shortly",
                                headers={"Retry-After": RETRY_AFTER_S})

    def __enter__(self):
        self.check()
        self.in_flight += 1  # single event-loop thread: no lock needed

    def __exit__(self, *exc):
        self.in_flight -= 1


class _ReadingBudget:
    """Body bytes being received, across all requests. Bodies are read before a request takes
    an admission slot, so this bounds their memory: a request that would push the total past
    `capacity` gets 503. A slow client holds only the bytes it has sent."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        self.requests = 0

    @contextmanager
    def account(self):
        taken = [0]

        def take(count: int) -> None:
            if self.held + count > self.capacity:
                raise HTTPException(503, f"server busy: {self.held:,} bytes of uploads being received; retry shortly",
                                    headers={"Retry-After": RETRY_AFTER_S})
            self.held += count
            taken[0] += count

        self.requests += 1
        try:
            yield take
        finally:
            self.held -= taken[0]
            self.requests -= 1


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    predictor.max_pixels = settings.max_pixels
    # Each row comes back as a trust.Assessment: calibrated probabilities, verdict, OOD score, breed set.
    batcher = MicroBatcher(predictor.assess, settings.max_batch, settings.max_wait_ms, settings.max_queue)
    admission = _Admission(settings.max_queue + settings.max_batch)
    reading = _ReadingBudget(settings.max_reading_bytes)
    decodes = asyncio.Semaphore(settings.decode_slots)  # binds to the server's loop on first use
    explainer_holder: dict = {"lock": threading.Lock()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="dogbreeds", version="1", lifespan=lifespan,
                  description="Tell a dog's breed from a photo. Upload an image to /v1/predict.")
    app.state.predictor, app.state.batcher, app.state.settings, app.state.admission = predictor, batcher, settings, admission
    app.state.reading, app.state.decodes = reading, decodes
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": predictor.backend.name, "backend": _backend_kind(predictor),
                "engine_choice": getattr(predictor.backend, "auto_choice", None),  # what "auto" measured (issue 13)
                "num_classes": len(predictor.classes), "in_flight": admission.in_flight, "reading": reading.requests,
                "queued": batcher.queued, "batcher": batcher.stats.to_dict()}

    @app.get("/v1/breeds")
    async def breeds():
        return {"model": predictor.backend.name, "breeds": predictor.classes.to_json()}

    @app.post("/v1/predict", openapi_extra=_IMAGE_BODY_DOC, responses=error_responses(408, 413, 415, 422, 503))
    async def predict(request: Request, top: int = Query(5, ge=1, description="how many breeds to return")):
        admission.check()  # already full: 503 before reading a byte
        name, data = await read_image_upload(request, settings.max_upload_bytes)
        with admission:  # taken once the whole body is here: a slow upload holds no slot
            async with decodes:
                inputs = await asyncio.to_thread(_decode_and_preprocess, predictor, data, name)
            try:
                answer = await batcher.submit(inputs)
            except Overloaded as exc:
                raise HTTPException(503, f"server busy: {exc}; retry shortly", headers={"Retry-After": RETRY_AFTER_S}) from None
            prediction = predictor.make_prediction(name, answer.probs, top, answer)
            result = prediction.to_dict()
            result["model"] = predictor.backend.name
            result["verdict_text"] = verdict_text(prediction.verdict, len(predictor.classes), prediction.top[0].breed,
                                                  [s.breed for s in prediction.breed_set])
            return result

    # Listed in the schema only where it works: a server of an .onnx file answers it with 501.
    @app.post("/v1/explain", openapi_extra=_IMAGE_BODY_DOC, response_class=Response,
              include_in_schema=_can_explain(predictor),
              responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay, the photo's size"},
                         **error_responses(408, 413, 415, 422, 501, 503)})
    async def explain(request: Request, breed: str | None = Query(None, description="breed name or id; default: the top one")):
        if not _can_explain(predictor):
            raise HTTPException(501, "Grad-CAM needs the PyTorch model; serve the run directory instead of the .onnx file")
        admission.check()
        name, data = await read_image_upload(request, settings.max_upload_bytes)
        with admission:
            async with decodes:
                explanation = await asyncio.to_thread(_explain, predictor, explainer_holder, data, name, breed)
            target, top1 = explanation.target, explanation.top[0]
            return Response(explanation.png_bytes(), media_type="image/png", headers={
                "X-Breed": _ascii(target.breed), "X-Breed-Prob": f"{target.prob:.6f}",
                "X-Top-Breed": _ascii(top1.breed), "Cache-Control": "no-store"})

    @app.exception_handler(ImageDecodeError)
    async def decode_error(request: Request, exc: ImageDecodeError):
        return JSONResponse({"detail": str(exc)}, status_code=decode_error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError):
        # One shape for every error ({"detail": message}), as the schema says (not FastAPI's array).
        return JSONResponse({"detail": validation_message(exc)}, status_code=422)

    return app


class ErrorMessage(BaseModel):
    detail: str


_ERROR_DESCRIPTIONS = {
    408: "the body did not arrive within --body-timeout (the connection then closes)",
    413: "the body is over --max-upload-mb, or the image is over the pixel limit (decompression bomb)",
    415: "not an image, or empty",
    422: "a corrupt or truncated image, a multipart body without an `image` file field, or a bad parameter",
    501: "Grad-CAM needs the PyTorch model: this server runs an .onnx file (serve the run directory)",
    503: "too many requests in flight, or too many upload bytes being received; retry after Retry-After seconds",
}


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` for the error statuses an endpoint returns, each {"detail": message}."""
    responses = {}
    for status in statuses:
        responses[status] = {"model": ErrorMessage, "description": _ERROR_DESCRIPTIONS[status]}
        if status == 503:
            responses[status]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
    return responses


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = " ".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" + (f" (got {error['input']!r})" if "input" in error else ""))
    return "; ".join(parts) or "invalid request"


def decode_error_status(exc: ImageDecodeError) -> int:
    if isinstance(exc, TooManyPixelsError):
        return 413
    if isinstance(exc, (NotAnImageError, EmptyImageError)):
        return 415
    return 422


async def read_image_upload(request: Request, limit: int) -> tuple[str, bytes]:
    """(name, bytes) of the uploaded image: the multipart field `image`, or the raw body.

    Bounded three ways, each answered at once: `limit` bytes (413), the app's body timeout
    (408, `ServeSettings.body_timeout_s`) and the bytes being received by all requests together
    (503, `ServeSettings.max_reading_bytes`). A client that disconnects mid-upload is logged in
    one line (no traceback)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"upload of {int(length):,} bytes exceeds the limit of {limit:,} bytes (--max-upload-mb)")
    settings = getattr(request.app.state, "settings", None)
    timeout_s = settings.body_timeout_s if settings is not None else None
    reading = getattr(request.app.state, "reading", None) or _ReadingBudget(limit)
    from starlette.requests import ClientDisconnect

    with reading.account() as take:
        try:
            return await _read_upload(request, _limited_stream(request, limit, timeout_s, take))
        except ClientDisconnect:
            client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            log.info("%s disconnected before its upload to %s was complete", client, request.url.path)
            raise HTTPException(400, "the client disconnected before the upload was complete") from None


async def _read_upload(request: Request, stream) -> tuple[str, bytes]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        from starlette.formparsers import MultiPartException, MultiPartParser
        from starlette.datastructures import UploadFile

        try:
            form = await MultiPartParser(request.headers, stream, max_files=1, max_fields=10).parse()
        except MultiPartException as exc:
            raise HTTPException(422, f"malformed multipart body: {exc.message}") from None
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "multipart upload needs a file field named 'image'")
            return upload.filename or "<upload>", await upload.read()
        finally:
            await form.close()
    chunks = [chunk async for chunk in stream]
    return "<body>", b"".join(chunks)


async def _limited_stream(request: Request, limit: int, timeout_s: float | None = None, take=None):
    # Content-Length can be absent (chunked) or wrong: count what actually arrives, and give
    # the whole body one deadline (a client sending a byte now and then never trips a per-chunk one).
    received = 0
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    chunks = request.stream().__aiter__()
    while True:
        try:
            if deadline is None:
                chunk = await chunks.__anext__()
            else:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the upload did not arrive within {timeout_s:g} s (--body-timeout); "
                                     "send the whole request at once", headers={"Connection": "close"}) from None
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"upload exceeds the limit of {limit:,} bytes (--max-upload-mb)")
        if take is not None:
            take(len(chunk))
        yield chunk


def _decode_and_preprocess(predictor: Predictor, data: bytes, name: str):
    """Decode no more pixels than the model's resize needs (a bounded decode: pixel bombs under
    the pixel limit stay cheap), then preprocess; freed heap memory goes back to the OS."""
    from ..data.decode import decode_image

    try:
        image = decode_image(data, max_pixels=predictor.max_pixels,
                             min_short_side=predictor.preprocessing.resize_size)
    except ImageDecodeError as exc:  # name the upload rather than "<bytes>"
        raise type(exc)(name, exc.reason) from None
    finally:
        release_freed_memory()
    return predictor.preprocess(image)


_LIBC = None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """glibc keeps freed heap memory for reuse, and a large decode's buffers would otherwise stay
    in the process's RSS; malloc_trim(0) hands the free pages back. No-op without glibc."""
    if _libc():
        _LIBC.malloc_trim(0)


def bound_native_memory(mmap_threshold: int = 4 * 1024 * 1024) -> None:
    """Once per server process (`dogbreeds serve` calls it before loading the model; it is
    process-wide, so the app itself does not). glibc serves big allocations by mmap and returns
    them when freed, but after the first big free it raises that threshold (up to 32 MB) and keeps
    such blocks in its per-thread heaps: a burst of pixel bombs then left ~30 MB of RSS behind for
    good. A fixed threshold keeps every block over `mmap_threshold` returnable. No-op without glibc."""
    if _libc():
        _LIBC.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))


def _explain(predictor: Predictor, holder: dict, data: bytes, name: str, breed: str | None):
    from ..errors import DogbreedsError

    with holder["lock"]:  # built on first use only (imports grad-cam, copies or loads the model)
        if "explainer" not in holder:
            holder["explainer"] = _make_explainer(predictor)
    try:
        return holder["explainer"].explain(data, breed=breed)
    except ImageDecodeError:
        raise
    except DogbreedsError as exc:  # e.g. an unknown breed name
        raise HTTPException(422, str(exc)) from None
    finally:
        release_freed_memory()


def _make_explainer(predictor: Predictor):
    """Grad-CAM on a PyTorch model that no prediction runs through (its hooks must see only the
    CAM's own passes): a copy of the backend's model, or the run's checkpoint behind any other
    backend, loaded now (onnxruntime holds no torch model)."""
    from ..infer.explain import Explainer

    if hasattr(predictor.backend, "model"):
        return Explainer(predictor, copy_model=True)
    torch_predictor = Predictor.from_run(predictor.backend.checkpoint, engine="torch", threshold=predictor.threshold,
                                         max_pixels=predictor.max_pixels)
    return Explainer(torch_predictor)  # private already: nothing else uses this model


def _can_explain(predictor: Predictor) -> bool:
    """A torch backend, or any backend built from a run's checkpoint; not an exported .onnx file."""
    return hasattr(predictor.backend, "model") or getattr(predictor.backend, "checkpoint", None) is not None


def _backend_kind(predictor: Predictor) -> str:
    """What /healthz reports: the engine the backend runs ('onnxruntime', 'torch', ...), or 'onnx'
    for an exported .onnx file (no run behind it)."""
    if not _can_explain(predictor):
        return "onnx"
    return getattr(predictor.backend, "kind", "") or type(predictor.backend).__name__


def _ascii(text: str) -> str:
    # HTTP headers are latin-1; breed names are ASCII in Stanford Dogs but may not be elsewhere.
    return text.encode("ascii", "replace").decode("ascii")


_IMAGE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                               "properties": {"image": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
