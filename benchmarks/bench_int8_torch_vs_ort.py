"""int8 in PyTorch or in onnxruntime? ConvNeXt-T (random init, 20 classes, 224 px), side by side:

    timm eager NCHW (fp32)            the baseline
    timm channels_last (fp32)
    torch int8: torch.ao.quantization.quantize_dynamic on every nn.Linear (fbgemm / x86), channels_last
    dogbreeds' "int8" engine          onnxruntime, dynamic int8 MatMuls (infer/backend.build_backend)
    dogbreeds' "onnxruntime" engine   fp32

After one warm-up call each, --rounds rounds call every path once (the order reversed every other
round); each path's median time is kept. Also printed: the largest |logit| difference and top-1
agreement of torch int8 against fp32 on the batch. The load average is printed before and after.

    nice -n 5 python benchmarks/bench_int8_torch_vs_ort.py --threads 2 --batch 16 --rounds 4
"""
from __future__ import annotations

import argparse
import statistics
import time

from dogbreeds.machine import load_average


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    import timm
    import torch

    from dogbreeds.infer.backend import build_backend

    torch.set_num_threads(args.threads)
    print("load average at start:", load_average(), flush=True)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    base = timm.create_model("convnext_tiny", num_classes=20).eval()
    channels_last = timm.create_model("convnext_tiny", num_classes=20).eval()
    channels_last.load_state_dict(base.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in engines else "x86"
    quantised = torch.ao.quantization.quantize_dynamic(base, {torch.nn.Linear}, dtype=torch.qint8)
    quantised = quantised.to(memory_format=torch.channels_last)
    ort_int8 = build_backend(base, engine="int8", threads=args.threads)
    ort_fp32 = build_backend(base, engine="onnxruntime", threads=args.threads)
    x_cl, x_np = x.contiguous(memory_format=torch.channels_last), x.numpy()
    paths = {"timm eager NCHW": lambda: base(x), "timm channels_last": lambda: channels_last(x_cl),
             "torch int8 (quantize_dynamic) + channels_last": lambda: quantised(x_cl),
             "dogbreeds int8 (onnxruntime)": lambda: ort_int8.forward(x_np),
             "dogbreeds onnxruntime fp32": lambda: ort_fp32.forward(x_np)}
    with torch.inference_mode():
        reference, low = base(x), quantised(x_cl)
        print(f"torch int8 vs fp32: max |logit diff| {(reference - low).abs().max().item():.3g}, top-1 agreement "
              f"{(reference.argmax(1) == low.argmax(1)).float().mean().item():.1%} on {args.batch} random inputs")
        for call in paths.values():
            call()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                start = time.perf_counter()
                paths[name]()
                times[name].append(time.perf_counter() - start)
    eager = statistics.median(times["timm eager NCHW"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:48s} {args.batch / median:7.2f} images/s  {eager / median:5.2f}x timm eager")
    print("load average at end:", load_average())


if __name__ == "__main__":
    main()
