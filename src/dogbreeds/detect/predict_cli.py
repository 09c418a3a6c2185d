"""`dogbreeds predict RUN photo.jpg --detect DETECTOR_RUN`: every dog in the photo, a breed per dog.

Imported by infer/cli.py at every CLI start: nothing heavy at module level (no numpy, torch,
onnxruntime). With a breed .onnx file and a detector .onnx file (or runs whose exports are
cached) the whole path runs on onnxruntime alone.
"""
from __future__ import annotations

import json
import sys


def add_detect_options(parser) -> None:
    parser.add_argument("--detect", metavar="DETECTOR_RUN",
                        help="find every dog first (a detector run of `dogbreeds detect train`, or its exported "
                             ".onnx file) and give a breed per dog: one {\"image\", \"dogs\": [{\"box\", \"score\", "
                             "\"top\", ...}]} per photo (a photo without dogs: \"dogs\": []; boxes a calibrated "
                             "breed run calls not a dog: \"not_dogs\")")
    parser.add_argument("--detect-threshold", type=_unit, default=None, metavar="SCORE",
                        help="with --detect: a detection counts as a dog from this score on "
                             "(default: the detector run's, 0.5)")


def detector_engine(engine: str) -> str:
    """The detector's engine for a breed --engine: PyTorch for the torch engines, else the default
    (onnxruntime on the detector's export; int8 is a breed-model option only)."""
    return "torch" if engine.startswith("torch") else "auto"


def _unit(text: str) -> float:
    import argparse

    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def predict_dogs(args) -> int:
    """The --detect branch of `dogbreeds predict`: exit 0 all photos answered, 1 some unreadable."""
    from ..infer.predictor import Predictor, collect_images_or_fail
    from .infer import Detector, detect_breeds

    predictor = Predictor.from_path(args.model, engine=args.engine, threshold=args.threshold,
                                    ood_threshold=args.ood_threshold, coverage=args.coverage)
    detector = Detector.from_path(args.detect, engine=detector_engine(args.engine), score_threshold=args.detect_threshold)
    if predictor.calibration is None and not args.json:
        from ..trust import UNCALIBRATED_NOTE

        print(f"note: {UNCALIBRATED_NOTE}", file=sys.stderr)
    images = collect_images_or_fail(args.images, str(args.images))  # left-out files listed on stderr
    failed = 0
    for image in images:
        result = detect_breeds(detector, predictor, image, top_k=args.top, name=str(image))
        failed += "error" in result
        if args.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            _print_human(result)
    if failed:
        print(f"{failed} of {len(images)} images could not be read (see above)", file=sys.stderr)
    return 1 if failed else 0


def _print_human(result: dict) -> None:
    name = result["image"]
    if "error" in result:
        print(f"{name}: error: {result['error']}", flush=True)
        return
    dogs = result["dogs"]
    print(f"{name}: {len(dogs)} dog{'s' if len(dogs) != 1 else ''}")
    for i, dog in enumerate(dogs, 1):
        x0, y0, x1, y1 = dog["box"]
        best = dog["top"][0]
        words = f"  #{i} box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) dog score {dog['score']:.2f}: " \
                f"{best['breed']} {best['prob']:.1%}"
        others = ", ".join(f"{s['breed']} {s['prob']:.1%}" for s in dog["top"][1:3])
        if others:
            words += f" (then {others})"
        if dog.get("verdict") and dog["verdict"] != "breed":
            words += f" [verdict: {dog['verdict'].replace('_', ' ')}]"
        print(words)
    for dog in result.get("not_dogs", []):
        x0, y0, x1, y1 = dog["box"]
        print(f"  (box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) detector score {dog['score']:.2f}: the breed run "
              "says not a dog)")
    sys.stdout.flush()
