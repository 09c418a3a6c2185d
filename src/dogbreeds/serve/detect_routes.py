"""`POST /v1/detect`: every dog in the photo with a breed per dog (issue 14), for
`dogbreeds serve RUN --detect DETECTOR_RUN`.

    GET  /v1/detector   the detector being served (the web page asks it: 404 = no detector)
    POST /v1/detect     an image (multipart field `image`, or the raw body) ->
                        {"image", "width", "height", "model", "detector",
                         "dogs": [{"box": [x0, y0, x1, y1], "score", "top", "verdict", "verdict_text", ...}]
                         [, "not_dogs": [...]: boxes a calibrated breed run calls "not_a_dog"]}

The same limits and statuses as /v1/predict (serve/app.py: the upload is read by its
`read_image_upload`, the request holds one of its admission slots, decoding takes one of its
decode slots). The photo is decoded at full size (boxes are in its own pixels, after EXIF
orientation), the detector runs in a worker thread, and each dog's crop joins the service's
micro-batcher like any /v1/predict photo, so crops of one photo and other requests share
forward passes. A photo without dogs answers "dogs": [].
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, HTTPException, Query, Request

from ..detect.infer import Detector, dog_entry, split_dogs
from ..trust.present import verdict_text
from .app import RETRY_AFTER_S, read_image_upload
from .batcher import Overloaded

_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                           "properties": {"image": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}}
DETECT_RESPONSES = {
    200: {"description": "the dogs found, best first, each with its box (photo pixels), score and breeds; "
                         "boxes a calibrated breed run calls not a dog are in not_dogs"},
    408: {**_ERROR, "description": "the upload did not arrive in time"},
    413: {**_ERROR, "description": "upload over --max-upload-mb, or an image over the pixel limit"},
    415: {**_ERROR, "description": "not an image, or an empty body"},
    422: {**_ERROR, "description": "a corrupt or truncated image, a missing 'image' field, or a bad query value"},
    503: {**_ERROR, "description": "server busy: retry after the Retry-After header's seconds"},
}


def add_detect_routes(app: FastAPI, detector: Detector, margin: float | None = None) -> None:
    """Add GET /v1/detector and POST /v1/detect to an app made by `serve.app.create_app`."""
    predictor, settings = app.state.predictor, app.state.settings
    admission, batcher = app.state.admission, app.state.batcher
    app.state.detector = detector

    @app.get("/v1/detector")
    async def detector_info():
        return {"detector": detector.name, "engine": detector.kind, "score_threshold": detector.score_threshold}

    @app.post("/v1/detect", openapi_extra={"requestBody": _IMAGE_BODY}, responses=DETECT_RESPONSES)
    async def detect(request: Request, top: int = Query(5, ge=1, description="how many breeds per dog"),
                     threshold: float | None = Query(None, ge=0, le=1, description="a detection counts as a dog "
                                                     "from this score on (default: the detector's)")):
        check = getattr(admission, "check", None)
        if check is not None:
            check()  # already full: 503 before reading a byte
        name, data = await read_image_upload(request, settings.max_upload_bytes)
        with admission:
            async with (getattr(app.state, "decodes", None) or _NoLimit()):
                rgb = await asyncio.to_thread(predictor.decode, data, name)
            detector.check_size(rgb, name)  # too thin to resize: 422, like an unreadable image
            detections = await asyncio.to_thread(detector.detect, rgb, threshold)
            inputs = await asyncio.to_thread(lambda: [predictor.preprocess(detector.crop(rgb, d.box, margin))
                                                      for d in detections])
            try:
                answers = await asyncio.gather(*(batcher.submit(x) for x in inputs))
            except Overloaded as exc:
                raise HTTPException(503, f"server busy: {exc}; retry shortly", headers={"Retry-After": RETRY_AFTER_S}) from None
            entries = []
            for found, answer in zip(detections, answers):
                prediction = predictor.make_prediction(name, answer.probs, top, answer)
                entry = dog_entry(found, prediction.to_dict())
                entry["verdict_text"] = verdict_text(prediction.verdict, len(predictor.classes), prediction.top[0].breed,
                                                     [s.breed for s in prediction.breed_set])
                entries.append(entry)
            return {"image": name, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                    "model": predictor.backend.name, "detector": detector.name, **split_dogs(entries)}


class _NoLimit:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def attach_detector(app: FastAPI, args) -> Detector | None:
    """`dogbreeds serve ... --detect DETECTOR_RUN`: open the detector and add its routes (None without --detect)."""
    if not getattr(args, "detect", None):
        return None
    from ..detect.predict_cli import detector_engine

    detector = Detector.from_path(args.detect, engine=detector_engine(args.engine),
                                  score_threshold=getattr(args, "detect_threshold", None))
    add_detect_routes(app, detector)
    return detector

