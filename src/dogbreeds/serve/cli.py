"""`dogbreeds serve RUN_OR_MODEL`: the REST service and web page on uvicorn.

Imported at every CLI start: fastapi, uvicorn and the model load only inside the handler.
"""
from __future__ import annotations

import argparse
import sys

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def register(subparsers) -> None:
    from ..infer.cli import DEFAULT_THRESHOLD, add_engine_option, positive_int, probability
    from ..trust.fractions import fraction_type

    p = subparsers.add_parser(
        "serve", help="REST service + web page (POST /v1/predict, GET /docs, / in a browser)",
        description="Serve a model over HTTP. RUN_OR_MODEL is a run directory or a checkpoint (predictions on "
                    "--engine, default the onnxruntime fast path; Grad-CAM on the PyTorch model, loaded on the "
                    "first /v1/explain request), or an .onnx file (onnxruntime; no Grad-CAM). "
                    "Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=10.0,
                   help="how long a request waits for others to batch with (default 10)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting beyond the running batch; more are answered 503 (default 64)")
    p.add_argument("--max-upload-mb", type=positive_float, default=10.0, help="request body limit in MB (default 10)")
    p.add_argument("--header-timeout", type=positive_float, default=10.0,
                   help="seconds a client has to send the request line and headers; then 408 and the connection "
                        "closes (default 10)")
    p.add_argument("--body-timeout", type=positive_float, default=60.0,
                   help="seconds a client has to send the whole body once the headers are in; then 408 "
                        "(default 60: 10 MB at 1.4 Mbit/s)")
    p.add_argument("--max-decodes", type=positive_int, default=None,
                   help="images decoded at once (default: one per CPU core)")
    p.add_argument("--threshold", type=probability, default=DEFAULT_THRESHOLD,
                   help=f"low-confidence threshold (default {DEFAULT_THRESHOLD})")
    p.add_argument("--ood-threshold", type=fraction_type("ood threshold"), default=None,
                   help="OOD score above which a photo is not one of the known breeds, in (0, 1) "
                        "(default: the run's, chosen by `dogbreeds calibrate`; docs/trust.md)")
    p.add_argument("--coverage", type=fraction_type("coverage"), default=None,
                   help="how often the breed set holds the true breed, in (0, 1) (default: the run's, 0.9)")
    add_engine_option(p)
    from ..detect.predict_cli import add_detect_options  # issue 14: POST /v1/detect with --detect DETECTOR_RUN

    add_detect_options(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _serve(args) -> int:
    import uvicorn

    from ..infer.predictor import Predictor
    from .app import ServeSettings, bound_native_memory, create_app
    from .timeouts import timeout_protocol

    if args.host not in LOOPBACK:
        print(f"warning: binding {args.host}: the service will be reachable from other machines; it has no "
              "authentication. Put it behind a reverse proxy with TLS and auth, or use --host 127.0.0.1.",
              file=sys.stderr)
    bound_native_memory()  # big decodes' memory goes back to the OS (serve/app.py)
    predictor = Predictor.from_path(args.model, engine=args.engine, spinning=False, threshold=args.threshold,
                                    ood_threshold=args.ood_threshold, coverage=args.coverage)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
                             header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                             max_decodes=args.max_decodes or 0)
    app = create_app(predictor, settings)
    from .detect_routes import attach_detector

    detector = attach_detector(app, args)  # --detect: POST /v1/detect, boxes on the web page
    if detector is not None:
        print(f"detector {detector.name} ({detector.description}) on POST /v1/detect", file=sys.stderr)
    print(f"serving {predictor.backend.name} ({len(predictor.classes)} breeds, {_describe_backend(predictor)}) "
          f"on http://{args.host}:{args.port}/ "
          f"(API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                http=timeout_protocol(settings.header_timeout_s, settings.body_timeout_s),
                log_config=log_config(args.log_level))
    return 0


def log_config(level: str) -> dict:
    """uvicorn's logging setup, with the service's own logger ("dogbreeds", e.g. timeouts and
    disconnects) printed the same way at the same level."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["dogbreeds"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _describe_backend(predictor) -> str:
    return f"engine {predictor.backend.kind}: {predictor.backend.description}"
