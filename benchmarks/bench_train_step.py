"""Training-step speed.

Default: ConvNeXt-T training step images/s, plain timm loop vs dogbreeds' settings, interleaved; the
same as `dogbreeds bench --parts training`; extra arguments are passed on (e.g. --quick, --out -).

--settings: train's setup with each of its settings changed alone (channels_last on/off, ConvNeXt's
conv_mlp on/off, torch AdamW default / foreach / fused, in bf16 the depthwise convolutions in bf16 / fp32)
against the plain timm fp32 loop, interleaved
step by step (bench.training.measure_settings), at the thread count train uses (torch's default)
unless --threads; one JSON object per (model, size) on stdout, and a log on stderr:

    python benchmarks/bench_train_step.py --settings --models convnext_tiny,mobilenetv2_100 \
        --batch 8 --sizes 224 --rounds 3
"""
import argparse
import json
import sys

from dogbreeds.cli import main


def settings(argv: list[str]) -> int:
    from dogbreeds.bench.training import measure_settings, setting_variants
    from dogbreeds.machine import describe, machine_profile

    p = argparse.ArgumentParser(prog="bench_train_step.py --settings")
    p.add_argument("--models", default="convnext_tiny,mobilenetv2_100")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", default="224", help="comma list of input sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, as train)")
    p.add_argument("--only", default=None, help="comma list of setting labels to time (default: all of "
                   "bench.training.setting_variants), e.g. 'train default,conv_mlp off'; matched by prefix")
    args = p.parse_args(argv)
    machine = describe(machine_profile())
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            variants = setting_variants(name)
            if args.only:
                wanted = [w.strip() for w in args.only.split(",")]
                variants = {k: v for k, v in variants.items() if any(k.startswith(w) for w in wanted)}
            result = measure_settings(name, args.batch, size, args.rounds, args.threads, variants=variants,
                                      log=lambda line: print(line, file=sys.stderr, flush=True))
            result["machine"] = machine
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if "--settings" in sys.argv[1:]:
        sys.exit(settings([a for a in sys.argv[1:] if a != "--settings"]))
    sys.exit(main(["bench", "--parts", "training", *sys.argv[1:]]))
