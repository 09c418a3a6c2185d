"""`dogbreeds predict | explain | export`. Parse, call, print.

Imported by `dogbreeds.cli` at every start, so nothing heavy is imported at module level:
`dogbreeds predict model.onnx photo.jpg` must answer on onnxruntime alone, without torch.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..trust.fractions import fraction_type

DEFAULT_THRESHOLD = 0.3  # same as predictor.DEFAULT_LOW_CONFIDENCE_THRESHOLD (reason there)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def engine_help() -> str:
    from .backend import engine_descriptions

    return ("what runs a run or checkpoint (an .onnx file always runs on onnxruntime): "
            + "; ".join(f"'{name}' = {what}" for name, what in engine_descriptions().items()))


def add_engine_option(parser) -> None:
    """--engine NAME, shared by predict and serve (evaluate has its own wording): every engine
    the registry knows (infer/backend.py), default 'auto'."""
    from .backend import DEFAULT_ENGINE, engine_names

    parser.add_argument("--engine", choices=engine_names(), default=DEFAULT_ENGINE, help=engine_help())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="top breeds for photos (files, folders, globs)",
        description="Predict dog breeds. MODEL is a run directory, a .safetensors checkpoint, or an exported "
                    ".onnx file (runs on onnxruntime alone). Exit status: 0 all images answered, "
                    "1 some images could not be read (each is reported, the others still answered), "
                    "2 the model or arguments are wrong.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files, folders (searched recursively) or globs")
    p.add_argument("--top", type=positive_int, default=5, help="how many breeds per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per image")
    p.add_argument("--threshold", type=probability, default=DEFAULT_THRESHOLD,
                   help="flag an answer as low confidence ('not sure — maybe not a dog') when the top "
                        f"breed's probability is below this (default {DEFAULT_THRESHOLD})")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--ood-threshold", type=fraction_type("ood threshold"), default=None,
                   help="OOD score above which a photo is not one of the known breeds, in (0, 1) "
                        "(default: the run's, chosen by `dogbreeds calibrate`; docs/trust.md)")
    p.add_argument("--coverage", type=fraction_type("coverage"), default=None,
                   help="how often the breed set holds the true breed, in (0, 1) (default: the run's, 0.9)")
    p.add_argument("--tta", choices=("flip",), default=None,
                   help="flip: average each photo's answer with its mirror image's (the features and logits, before "
                        "the verdict; twice the computation; measured in docs/detection.md). With --detect the detector "
                        "run's own choice applies (crop_mirror, chosen on val by `detect evaluate --choose-margin`)")
    add_engine_option(p)
    p.add_argument("--verbose", action="store_true",
                   help="say on stderr which engine runs and, for 'auto', what it measured on this machine")
    from ..detect.predict_cli import add_detect_options  # issue 14: --detect DETECTOR_RUN

    add_detect_options(p)
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("explain", help="Grad-CAM heat map: where the evidence for a breed is",
                              description="Overlay a Grad-CAM heat map on the photo (PNG, the photo's size).")
    p.add_argument("model", metavar="RUN", help="run directory or .safetensors checkpoint (not .onnx)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--breed", help="breed to explain (name or breed id); default: the top prediction")
    p.add_argument("--layer", help="target layer name; default: chosen by architecture")
    p.set_defaults(func=_explain)

    p = subparsers.add_parser("export", help="export a run's model to ONNX (logits and features out, metadata inside)")
    p.add_argument("model", metavar="RUN", help="run directory or .safetensors checkpoint")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check-images", nargs="+", metavar="PHOTO",
                   help="real photos (files or folders) to compare ONNX with PyTorch on; default: the run's test photos")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |probability difference| (default 1e-4)")
    p.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy",
                   help="torch.onnx exporter (default legacy: one self-contained file at the requested opset)")
    p.set_defaults(func=_export)


def _predict(args) -> int:
    if getattr(args, "detect", None):  # every dog in the photo, a breed per dog
        if getattr(args, "tta", None):
            from ..errors import DogbreedsError

            raise DogbreedsError(f"--tta {args.tta}: with --detect the detector run decides whether each crop is averaged "
                                 "with its mirror image (crop_mirror, chosen on val by `dogbreeds detect evaluate --split "
                                 "val --choose-margin`); leave --tta out")
        from ..detect.predict_cli import predict_dogs

        return predict_dogs(args)
    from .predictor import Predictor, collect_images_or_fail

    predictor = Predictor.from_path(args.model, engine=args.engine, threshold=args.threshold,
                                    ood_threshold=args.ood_threshold, coverage=args.coverage)
    if getattr(args, "verbose", False):
        from .auto import summary

        backend = predictor.backend
        print(f"engine: {backend.kind} ({backend.description}); {summary(backend.auto_choice)}", file=sys.stderr)
    if predictor.calibration is None and not args.json:
        from ..trust import UNCALIBRATED_NOTE

        print(f"note: {UNCALIBRATED_NOTE}", file=sys.stderr)
    images = collect_images_or_fail(args.images, str(args.images))  # left-out files listed on stderr
    failed = 0
    if not args.json:
        print(f"{'IMAGE':<40} {'#':>2}  {'BREED':<32} {'PROB':>6}")
    # One batch at a time, printed as soon as it is answered.
    for start in range(0, len(images), args.batch_size):
        for prediction in predictor.predict(images[start:start + args.batch_size], top_k=args.top,
                                            batch_size=args.batch_size, mirror=getattr(args, "tta", None) == "flip"):
            failed += not prediction.ok
            if args.json:
                print(json.dumps(prediction.to_dict(), ensure_ascii=False), flush=True)
            else:
                _print_human(prediction, len(predictor.classes))
    if failed:
        print(f"{failed} of {len(images)} images could not be read (see above)", file=sys.stderr)
    return 1 if failed else 0


def _print_human(prediction, num_breeds: int | None = None) -> None:
    name = _shorten(prediction.image, 40)
    if not prediction.ok:
        print(f"{name:<40}  error: {prediction.error}")
        return
    for rank, score in enumerate(prediction.top, 1):
        print(f"{name if rank == 1 else '':<40} {rank:>2}  {_shorten(score.breed, 32):<32} {score.prob:>6.1%}")
    if prediction.low_confidence:  # kept: derived from the top-1 probability (see the verdict below)
        from .predictor import LOW_CONFIDENCE_MESSAGE

        print(f"{'':<40}     ({LOW_CONFIDENCE_MESSAGE})")
    if prediction.verdict is not None:
        from ..trust.present import verdict_text

        words = verdict_text(prediction.verdict, num_breeds or 0, prediction.top[0].breed,
                             [s.breed for s in prediction.breed_set])
        print(f"{'':<40}     => {words} (OOD score {prediction.ood_score:.3f})")
    sys.stdout.flush()


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _explain(args) -> int:
    from .explain import Explainer, save_png
    from .predictor import Predictor

    # Grad-CAM runs backward through the PyTorch model, so a run is loaded in torch; an .onnx file
    # is loaded as such, for Explainer's own error.
    engine = "auto" if str(args.model).lower().endswith(".onnx") else "torch"
    explainer = Explainer(Predictor.from_path(args.model, engine=engine), layer=args.layer)
    explanation = explainer.explain(args.image, breed=args.breed)
    save_png(explanation.overlay, args.out)
    target = explanation.target
    print(f"{args.out}: Grad-CAM for {target.breed} (p={target.prob:.1%}); "
          f"top breed: {explanation.top[0].breed} (p={explanation.top[0].prob:.1%})")
    return 0


def _export(args) -> int:
    from .export import export_onnx

    report = export_onnx(args.model, args.out, opset=args.opset, check_images=args.check_images,
                         tolerance=args.tolerance, exporter=args.exporter)
    print(report.summary())
    return 0
