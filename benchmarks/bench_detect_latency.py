"""Latency of "every dog in the photo": decode + detect + a breed per dog, one photo at a time.

    python benchmarks/bench_detect_latency.py --detector runs/detect_mnv2_quick --breeds runs/trust_default \
        [--engine auto] [--photos PHOTO_OR_FOLDER ...] [--multi-dog] [--count 40] [--repeats 3] [--json out.json]

Both models run on `--engine` (default "auto": onnxruntime on their cached ONNX exports, the
default path of `dogbreeds predict --detect` and `dogbreeds serve --detect`). Photos: the ones
given, else the detector run's test photos (the mini data: 224x224; with --multi-dog only those
whose annotation has two or more dogs) and, as a second set, real photos at their own sizes (../shared/data/cats-and-dogs/dogs, mostly about 500x375). Each photo
is answered once to warm up, then `--repeats` times; per photo the best repeat counts (the
machine is shared; the best repeat is the least disturbed), and the summary gives the median,
90th percentile and max over photos of the total (decode + detect + crops + breeds) and of
the detector and breed steps alone, with the number of dogs found.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def split_photos(run: Path, part: str = "test", multi_dog: bool = False) -> list[Path]:
    """The run's `part` photos (with multi_dog: only those with 2+ annotated dogs)."""
    from dogbreeds.detect.data import annotation_path, read_annotation
    from dogbreeds.rundir import RunDir

    located = RunDir.locate(run)
    if not located.split_file.is_file():
        return []
    split = located.read_split()
    root = Path(split.get("root", located.path))
    photos = [root / f for f in split.get("files", {}).get(part, []) if (root / f).is_file()]
    if multi_dog:
        def dogs(photo: Path) -> int:
            xml = annotation_path(root, photo)
            boxes = read_annotation(xml, None)[0] if xml.is_file() else None
            return 0 if boxes is None else len(boxes)

        photos = [p for p in photos if dogs(p) >= 2]
    return photos


def measure(detector, predictor, photos: list[Path], repeats: int) -> dict:
    rows = []
    for photo in photos:
        best = None
        for attempt in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            rgb = predictor.decode(photo)
            decoded = time.perf_counter()
            dogs = detector.detect(rgb)
            detected = time.perf_counter()
            if dogs:
                predictor.predict([detector.crop(rgb, d.box) for d in dogs], mirror=detector.crop_mirror)  # as detect_breeds
            done = time.perf_counter()
            timing = {"total": done - start, "decode": decoded - start, "detect": detected - decoded,
                      "breeds": done - detected, "dogs": len(dogs), "size": list(rgb.shape[:2])}
            if attempt and (best is None or timing["total"] < best["total"]):
                best = timing
        rows.append({"photo": str(photo), **best})
    summary = {"photos": len(rows)}
    for key in ("total", "decode", "detect", "breeds"):
        values = sorted(r[key] * 1000 for r in rows)
        summary[f"{key}_ms"] = {"median": round(statistics.median(values), 1),
                                "p90": round(values[int(0.9 * (len(values) - 1))], 1), "max": round(values[-1], 1)}
    summary["dogs"] = {str(n): sum(r["dogs"] == n for r in rows) for n in sorted({r["dogs"] for r in rows})}
    return {"summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", required=True, help="detector run (dogbreeds detect train) or its .onnx file")
    parser.add_argument("--breeds", required=True, help="breed run or .onnx file")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--photos", nargs="+", help="photos or folders (default: the detector run's test split, "
                                                    "then real photos at their own sizes)")
    parser.add_argument("--multi-dog", action="store_true",
                        help="the detector run's test photos with two or more dogs only")
    parser.add_argument("--split-of", help="take the test photos from this run's split.json (default: --detector; "
                                           "use it when --detector is an .onnx file)")
    parser.add_argument("--count", type=int, default=40, help="photos per set (default 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the summaries and per-photo rows here")
    args = parser.parse_args(argv)

    from dogbreeds.detect.infer import Detector
    from dogbreeds.detect.predict_cli import detector_engine
    from dogbreeds.infer.predictor import Predictor, collect_images

    started = time.perf_counter()
    detector = Detector.from_path(args.detector, engine=detector_engine(args.engine))
    predictor = Predictor.from_path(args.breeds, engine=args.engine)
    print(f"detector: {detector.description} (score threshold {detector.score_threshold}); breeds: "
          f"{predictor.backend.description}; opened in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.photos:
        sets = {"given": collect_images(args.photos)[:args.count]}
    else:
        split_run = Path(args.split_of or args.detector)
        name = "detector test photos with 2+ dogs" if args.multi_dog else "detector test photos"
        sets = {name: split_photos(split_run, multi_dog=args.multi_dog)[:args.count],
                "real photos at their own size": sorted((SHARED / "data" / "cats-and-dogs" / "dogs").glob("*.jpg"))[:args.count]}
    report = {"detector": detector.description, "breeds": predictor.backend.description, "engine": args.engine,
              "sets": {}}
    for name, photos in sets.items():
        if not photos:
            print(f"{name}: no photos found, skipped", file=sys.stderr)
            continue
        result = measure(detector, predictor, photos, args.repeats)
        report["sets"][name] = result
        s = result["summary"]
        sizes = sorted({tuple(r["size"]) for r in result["rows"]})
        print(f"{name} ({s['photos']} photos, {len(sizes)} sizes, e.g. {sizes[0][1]}x{sizes[0][0]}): "
              f"total median {s['total_ms']['median']} ms, p90 {s['total_ms']['p90']} ms, max {s['total_ms']['max']} ms "
              f"| decode {s['decode_ms']['median']} | detect {s['detect_ms']['median']} | breeds {s['breeds_ms']['median']} "
              f"(medians, ms) | dogs found per photo: {s['dogs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
