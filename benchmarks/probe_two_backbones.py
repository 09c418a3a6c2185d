"""Would a second, frozen backbone's features help issue 11's OOD score? A probe on cached features.

    python benchmarks/probe_two_backbones.py runs/trust_default runs/trust_frozen

Both runs must have `RUN/trust_measure.npz` (`python benchmarks/measure_trust.py RUN` writes it) over the
same photos in the same order (the same data root, seed and breeds; checked by path). The probe reports,
with `measure_trust.report` as shipped (everything fitted on fitting photos only, reported on the rest):
  - the first run alone;
  - the first run with its pooled features replaced by [normalise(first), normalise(second)] / sqrt(2)
    (cosine similarity on it is the mean of the two backbones' cosine similarities), logits unchanged.
The choice between them is to be made on the fitting photos' cross-validated figure (`ood_head.cv_auroc`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_trust import report  # noqa: E402

GROUPS = ("train", "val", "test", "unknown", "wild_cats", "wild_dogs")


def concatenated(first: dict, second: dict) -> dict:
    """`first` with each group's features joined to `second`'s (both L2-normalised, then / sqrt 2)."""
    from dogbreeds.trust.scores import normalise

    out = dict(first)
    for group in GROUPS:
        if not np.array_equal(first[f"{group}_paths"], second[f"{group}_paths"]):
            raise ValueError(f"the two runs' {group} photos differ; measure two runs of the same data root, seed "
                             "and breeds")
        joined = np.concatenate([normalise(first[f"{group}_x"]), normalise(second[f"{group}_x"])], axis=1)
        out[f"{group}_x"] = (joined / np.sqrt(2.0)).astype(np.float32)
    return out


def summary(result: dict) -> dict:
    shipped = result["shipped_with_not_dogs"]
    return {"fitting_cv": shipped["ood_head"], "unknown_vs_known": shipped["unknown_vs_known"],
            "cats_vs_test_dogs": shipped["cats_vs_test_dogs"], "verdicts": shipped["verdicts"],
            "top1_after": shipped["top1_after"], "ece_after": shipped["ece_after"], "coverage": shipped["coverage"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the breed run (its logits and features)")
    parser.add_argument("reference", help="the run whose features are added (e.g. a --freeze backbone run)")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    caches = [Path(r) / "trust_measure.npz" for r in (args.run, args.reference)]
    for cache in caches:
        if not cache.is_file():
            print(f"probe_two_backbones.py: {cache}: no such file; run `python benchmarks/measure_trust.py "
                  f"{cache.parent}` first", file=sys.stderr)
            return 2
    first, second = (dict(np.load(cache, allow_pickle=False)) for cache in caches)
    try:
        joined = concatenated(first, second)
    except ValueError as exc:
        print(f"probe_two_backbones.py: {caches[0]} and {caches[1]}: {exc}", file=sys.stderr)
        return 2
    result = {"alone": summary(report(first)), "two_backbones": summary(report(joined))}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
