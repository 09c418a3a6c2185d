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
    503  too many requests in flight (Retry-After says when to try again)

Predictions run on whatever backend the predictor has (infer/backend.py; for a run: onnxruntime
by default, `--engine torch` for PyTorch eager). Grad-CAM needs the PyTorch model, so /v1/explain
runs on a private PyTorch copy: the backend's own model when it has one, else the run's
checkpoint (`backend.checkpoint`) loaded on the first explain request. An .onnx file has no
checkpoint: 501.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

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

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class _Admission:
    """Counts requests being read, decoded, queued or computed. Bounding it bounds memory:
    at most (max_queue + max_batch) bodies of at most max_upload_mb each are ever held."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0

    def __enter__(self):
        if self.in_flight >= self.capacity:
            raise HTTPException(503, f"server busy: {self.in_flight} requests in flight; retry shortly",
                                headers={"Retry-After": RETRY_AFTER_S})
        self.in_flight += 1  # single event-loop thread: no lock needed

    def __exit__(self, *exc):
        self.in_flight -= 1


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    predictor.max_pixels = settings.max_pixels
    # Each row comes back as a trust.Assessment: calibrated probabilities, verdict, OOD score, breed set.
    batcher = MicroBatcher(predictor.assess, settings.max_batch, settings.max_wait_ms, settings.max_queue)
    admission = _Admission(settings.max_queue + settings.max_batch)
    explainer_holder: dict = {"lock": threading.Lock()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="dogbreeds", version="1", lifespan=lifespan,
                  description="Tell a dog's breed from a photo. Upload an image to /v1/predict.")
    app.state.predictor, app.state.batcher, app.state.settings, app.state.admission = predictor, batcher, settings, admission
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": predictor.backend.name, "backend": _backend_kind(predictor),
                "num_classes": len(predictor.classes), "in_flight": admission.in_flight,
                "queued": batcher.queued, "batcher": batcher.stats.to_dict()}

    @app.get("/v1/breeds")
    async def breeds():
        return {"model": predictor.backend.name, "breeds": predictor.classes.to_json()}

    @app.post("/v1/predict", openapi_extra=_IMAGE_BODY_DOC)
    async def predict(request: Request, top: int = Query(5, ge=1, description="how many breeds to return")):
        with admission:
            name, data = await read_image_upload(request, settings.max_upload_bytes)
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

    @app.post("/v1/explain", openapi_extra=_IMAGE_BODY_DOC, response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay, the photo's size"}})
    async def explain(request: Request, breed: str | None = Query(None, description="breed name or id; default: the top one")):
        if not _can_explain(predictor):
            raise HTTPException(501, "Grad-CAM needs the PyTorch model; serve the run directory instead of the .onnx file")
        with admission:
            name, data = await read_image_upload(request, settings.max_upload_bytes)
            explanation = await asyncio.to_thread(_explain, predictor, explainer_holder, data, name, breed)
            target, top1 = explanation.target, explanation.top[0]
            return Response(explanation.png_bytes(), media_type="image/png", headers={
                "X-Breed": _ascii(target.breed), "X-Breed-Prob": f"{target.prob:.6f}",
                "X-Top-Breed": _ascii(top1.breed), "Cache-Control": "no-store"})

    @app.exception_handler(ImageDecodeError)
    async def decode_error(request: Request, exc: ImageDecodeError):
        return JSONResponse({"detail": str(exc)}, status_code=decode_error_status(exc))

    return app


def decode_error_status(exc: ImageDecodeError) -> int:
    if isinstance(exc, TooManyPixelsError):
        return 413
    if isinstance(exc, (NotAnImageError, EmptyImageError)):
        return 415
    return 422


async def read_image_upload(request: Request, limit: int) -> tuple[str, bytes]:
    """(name, bytes) of the uploaded image: the multipart field `image`, or the raw body."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"upload of {int(length):,} bytes exceeds the limit of {limit:,} bytes (--max-upload-mb)")
    stream = _limited_stream(request, limit)
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


async def _limited_stream(request: Request, limit: int):
    # Content-Length can be absent (chunked) or wrong: count what actually arrives.
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"upload exceeds the limit of {limit:,} bytes (--max-upload-mb)")
        yield chunk


def _decode_and_preprocess(predictor: Predictor, data: bytes, name: str):
    return predictor.preprocess(predictor.decode(data, name))


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
