"""Why photos are counted wrong: every true dog of a wrongly counted photo, and every extra dog, by cause.

    python benchmarks/diagnose_counts.py RUN --data ../shared/data/stanford-dogs-mini --split val \
        [--with-other-breeds] [--breeds-run BREED_RUN] [--json out.json]

The detector run's model NMS, score threshold and count rule are the ones in its checkpoint (those
`detect evaluate --choose-count` chose), the photos those `detect evaluate` would use. For each photo
whose counted dogs differ from its true ones, each true dog that no counted box matches (IoU >= 0.5,
greedy by score) gets one cause:

- ``below_threshold``: the model has a box on it (IoU >= 0.5) but the best one scores under the threshold;
- ``dropped_by_rule``: a box on it scores over the threshold and the count rule dropped it as a duplicate;
- ``merged``: no box of its own, and a counted box holds most of it (>= 70 % of its area) together
  with another true dog (one box around two dogs);
- ``no_box``: nothing else: the model has no box on it.

and each counted box that matches no true dog: ``merged_box`` (holds >= 70 % of two or more true dogs),
``duplicate`` (overlaps a matched box: IoU > 0.2 or half of the smaller box inside the other) or
``elsewhere``. With ``--breeds-run``, each true dog of the multi-dog photos that have a known breed
also gets where its breed was won or lost (`breed_causes`): ``right`` (a counted box at IoU >= 0.5 has the
breed as top-1, what `breed_accuracy` counts), ``in_top3``, ``wrong`` or ``no_box``. It also gives the
quartiles of the scores involved (missed dogs' best boxes, extra boxes), which tell whether a change of
post-processing could fix a case, or only a better model.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from dogbreeds.detect.evaluate import MATCH_IOU  # what breed_accuracy and the matching of detect evaluate use

HOLDS = 0.7


def holds(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(len(outer), len(inner)): the share of each inner box's area inside each outer box."""
    o, i = outer.reshape(-1, 4)[:, None, :], inner.reshape(-1, 4)[None, :, :]
    wx = np.clip(np.minimum(o[..., 2], i[..., 2]) - np.maximum(o[..., 0], i[..., 0]), 0, None)
    wy = np.clip(np.minimum(o[..., 3], i[..., 3]) - np.maximum(o[..., 1], i[..., 1]), 0, None)
    area = np.clip(i[..., 2] - i[..., 0], 0, None) * np.clip(i[..., 3] - i[..., 1], 0, None)
    return np.where(area > 0, wx * wy / np.where(area > 0, area, 1), 0.0)


def greedy_match(boxes: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """{true dog index: box index}, boxes taken best first (they come sorted), IoU >= MATCH_IOU."""
    from dogbreeds.detect.evaluate import box_iou

    iou = box_iou(boxes, truth)
    matched: dict[int, int] = {}
    for b in range(len(boxes)):
        free = [t for t in range(len(truth)) if t not in matched and iou[b, t] >= MATCH_IOU]
        if free:
            matched[max(free, key=lambda t: iou[b, t])] = b
    return matched


def diagnose_photo(pred: dict, truth: np.ndarray, threshold: float, rule: tuple[float, float]) -> dict:
    from dogbreeds.detect.evaluate import box_iou
    from dogbreeds.detect.infer import count_keep

    boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
    kept = count_keep(boxes, scores, threshold, *rule)
    counted = boxes[kept]
    out = {"truth": len(truth), "counted": len(kept), "missed": [], "extra": []}
    if len(kept) == len(truth):
        return out
    matched = greedy_match(counted, truth)
    iou_all = box_iou(boxes, truth)
    held = holds(counted, truth) if len(counted) else np.zeros((0, len(truth)))
    for t in range(len(truth)):
        if t in matched:
            continue
        on_it = np.flatnonzero(iou_all[:, t] >= MATCH_IOU)
        best = float(scores[on_it].max()) if len(on_it) else None
        if best is not None and best < threshold:
            cause = "below_threshold"
        elif best is not None:
            cause = "dropped_by_rule"
        elif len(counted) and any(held[b, t] >= HOLDS and (held[b] >= HOLDS).sum() >= 2 for b in range(len(counted))):
            cause = "merged"
        else:
            cause = "no_box"
        out["missed"].append({"cause": cause, "best_score": best})
    matched_boxes = counted[sorted(matched.values())] if matched else np.zeros((0, 4))
    for b in range(len(counted)):
        if b in matched.values():
            continue
        if (held[b] >= HOLDS).sum() >= 2:
            cause = "merged_box"
        elif len(matched_boxes) and (box_iou(counted[b:b + 1], matched_boxes).max() > 0.2
                                     or max(holds(counted[b:b + 1], matched_boxes).max(),
                                            holds(matched_boxes, counted[b:b + 1]).max()) > 0.5):
            cause = "duplicate"
        else:
            cause = "elsewhere"
        out["extra"].append({"cause": cause, "score": float(scores[kept[b]])})
    return out


def breed_causes(counted: np.ndarray, tops: list[list[str]], truth: np.ndarray, breed: str) -> list[str]:
    """For each true dog: right / in_top3 / wrong over the counted boxes on it (IoU >= 0.5), or no_box;
    tops[b] is the breed run's top-k for counted box b, best first."""
    from dogbreeds.detect.evaluate import box_iou

    iou = box_iou(counted.reshape(-1, 4), truth) if len(counted) else np.zeros((0, len(truth)))
    out = []
    for t in range(len(truth)):
        on_it = [tops[b] for b in np.flatnonzero(iou[:, t] >= MATCH_IOU)]
        if not on_it:
            out.append("no_box")
        elif any(top[:1] == [breed] for top in on_it):
            out.append("right")
        elif any(breed in top for top in on_it):
            out.append("in_top3")
        else:
            out.append("wrong")
    return out


def multi_dog_breeds(predictor, records, predictions, cfg) -> dict:
    """breed_causes over the multi-dog photos whose breed the breed run knows, each counted box cropped as
    predict crops it."""
    from dogbreeds.data.decode import decode_image
    from dogbreeds.detect.evaluate import counted_crop_tops

    known, causes = set(predictor.classes.breed_ids), Counter()
    rule = (cfg.count_nms_iou, cfg.count_containment)
    for record, pred in zip(records, predictions):
        if record.count < 2 or record.breed_id not in known:
            continue
        counted, tops = counted_crop_tops(predictor, decode_image(record.path), pred, cfg.score_threshold, rule,
                                          cfg.crop_margin, cfg.crop_square, top_k=3)
        causes.update(breed_causes(counted, tops, record.boxes, record.breed_id))
    return dict(causes)


def summarise(rows: list[dict], threshold: float) -> dict:
    multi = [r for r in rows if r["truth"] >= 2]
    wrong = [r for r in rows if r["counted"] != r["truth"]]
    wrong_multi = [r for r in multi if r["counted"] != r["truth"]]
    missed = Counter(m["cause"] for r in wrong_multi for m in r["missed"])
    extra = Counter(e["cause"] for r in wrong for e in r["extra"])
    below = [m["best_score"] for r in wrong_multi for m in r["missed"] if m["cause"] == "below_threshold"]
    return {
        "threshold": threshold, "photos": len(rows), "multi_dog_photos": len(multi),
        "wrong": len(wrong), "wrong_multi": len(wrong_multi),
        "multi_under": sum(r["counted"] < r["truth"] for r in wrong_multi),
        "multi_over": sum(r["counted"] > r["truth"] for r in wrong_multi),
        "single_over": sum(r["counted"] > r["truth"] for r in wrong if r["truth"] < 2),
        "single_under": sum(r["counted"] < r["truth"] for r in wrong if r["truth"] < 2),
        "multi_missed_dogs_by_cause": dict(missed),
        "extra_boxes_by_cause": dict(extra),
        "below_threshold_scores_quartiles": [float(q) for q in np.quantile(below, (0.25, 0.5, 0.75))] if below else None,
        "extra_scores_quartiles": ([float(q) for q in np.quantile([e["score"] for r in wrong for e in r["extra"]], (0.25, 0.5, 0.75))]
                                   if extra else None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--with-other-breeds", action="store_true")
    parser.add_argument("--breeds-run", help="also say where the multi-dog photos' dogs lose their breed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from dogbreeds.detect.evaluate import detector_and_photos, predict_records

    model, cfg, records, _, origin = detector_and_photos(args.run, args.data, args.split, args.with_other_breeds)
    print(f"diagnosing {len(records)} photos ({origin}); model NMS {cfg.box_nms_thresh}, score >= {cfg.score_threshold}, "
          f"count NMS {cfg.count_nms_iou}, contained {cfg.count_containment}", file=sys.stderr, flush=True)
    predictions = predict_records(model, records)
    rule = (cfg.count_nms_iou, cfg.count_containment)
    rows = [diagnose_photo(p, r.boxes, cfg.score_threshold, rule) for p, r in zip(predictions, records)]
    summary = summarise(rows, cfg.score_threshold)
    if args.breeds_run:
        from dogbreeds.infer.predictor import Predictor

        summary["multi_dog_breeds"] = multi_dog_breeds(Predictor.from_run(args.breeds_run), records, predictions, cfg)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "photos": [
            {"image": Path(r.path).name, **row} for r, row in zip(records, rows)]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
