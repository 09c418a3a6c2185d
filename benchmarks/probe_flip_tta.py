"""Would a mirrored second look find the dogs the detector misses? Flip test-time augmentation, measured.

    python benchmarks/probe_flip_tta.py RUN --data ../shared/data/stanford-dogs-mini --split val \
        --with-other-breeds --breeds-run BREED_RUN [--iou 0.55] [--json out.json]

The detector runs on each photo and on its mirror image (boxes mirrored back); the two sets of boxes
are fused by weighted boxes fusion (`ensemble_boxes.weighted_boxes_fusion`, Solovyev et al.: boxes of
the two views at IoU > --iou become one, its score the mean over both views, so a box seen once keeps
half its score). Both ways, the plain detections and the fused ones, get the same treatment in the same
run: the score threshold and count rule chosen on these photos (`best_counting`, the objective `detect
evaluate` uses), then `score_detections` (mAP, counts) and, with --breeds-run, end-to-end breed accuracy
on the run's own photos with the run's crop. So the two columns differ only by the second look; the
choice is made on the photos it is reported on (a probe for a decision on val, not a test figure).
Needs `pip install ensemble-boxes` (not a dependency of dogbreeds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def fuse(plain: dict, mirrored: dict, size: tuple[int, int], iou: float) -> dict:
    """Weighted boxes fusion of the two views' boxes of a photo of `size` (width, height), in
    coordinates normalised for the library."""
    from ensemble_boxes import weighted_boxes_fusion

    scale = np.asarray(list(size) * 2, dtype=np.float64)
    boxes = [np.clip(np.asarray(p["boxes"], np.float64).reshape(-1, 4) / scale, 0, 1) for p in (plain, mirrored)]
    scores = [np.asarray(p["scores"], np.float64) for p in (plain, mirrored)]
    if not sum(len(s) for s in scores):
        return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)}
    fused, fused_scores, _ = weighted_boxes_fusion(boxes, scores, [np.zeros(len(s)) for s in scores],
                                                   iou_thr=iou, skip_box_thr=0.0, conf_type="avg")
    order = np.argsort(-fused_scores, kind="stable")
    return {"boxes": (fused[order] * scale).astype(np.float32), "scores": fused_scores[order].astype(np.float32)}


def measure(name, predictions, records, own, predictor, cfg, objective) -> dict:
    from dogbreeds.detect.evaluate import best_counting, breed_scores, score_detections

    gts = [r.boxes for r in records]
    threshold, nms_iou, containment = best_counting(predictions, gts, objective=objective)
    row = {"way": name, "count_threshold": threshold, "count_nms_iou": nms_iou, "count_containment": containment,
           **score_detections(predictions, gts, threshold, (nms_iou, containment))}
    if predictor is not None:
        breed, _ = breed_scores(predictor, records[:own], predictions[:own], threshold, False, (nms_iou, containment),
                                cfg.crop_margin, whole=False, square=cfg.crop_square)
        row.update(breed_accuracy=breed["breed_accuracy"], breed_accuracy_single=breed["breed_accuracy_single"],
                   breed_dogs=breed["breed_dogs"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--with-other-breeds", action="store_true")
    parser.add_argument("--breeds-run")
    parser.add_argument("--iou", type=float, default=0.55, help="fusion IoU (ensemble_boxes' default)")
    parser.add_argument("--objective", default=None, help="count objective (default: detect evaluate's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from dogbreeds.detect.evaluate import DEFAULT_COUNT_OBJECTIVE, detector_and_photos, predict_records

    model, cfg, records, own, origin = detector_and_photos(args.run, args.data, args.split, args.with_other_breeds)
    objective = args.objective or DEFAULT_COUNT_OBJECTIVE
    print(f"{len(records)} photos ({origin}); model NMS {cfg.box_nms_thresh}, crop margin {cfg.crop_margin} "
          f"square {cfg.crop_square}; count objective {objective}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    plain = predict_records(model, records)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    mirrored = predict_records(model, records, mirror=True)
    mirror_s = time.perf_counter() - started
    fused = [fuse(p, m, Image.open(r.path).size, args.iou) for p, m, r in zip(plain, mirrored, records)]
    predictor = None
    if args.breeds_run:
        from dogbreeds.infer.predictor import Predictor

        predictor = Predictor.from_run(args.breeds_run)
    rows = [measure("plain", plain, records, own, predictor, cfg, objective),
            measure(f"flip + WBF (IoU {args.iou})", fused, records, own, predictor, cfg, objective)]
    rows[0]["detect_seconds"], rows[1]["detect_seconds"] = plain_s, plain_s + mirror_s
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"photos": origin, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
