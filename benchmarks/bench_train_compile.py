"""Does torch.compile speed up a CPU training step? One timm model (random init, 20 classes,
channels_last), forward + label-smoothed cross-entropy + backward + gradient clipping + AdamW,
eager against `torch.compile(model)` (inductor, default mode; the optimizer stays eager); --bf16
runs forward and loss of both under bf16 autocast.

Printed: the compile (the first compiled step) in seconds, both first losses (the same
initial weights and batch, so they must agree), then the median step time of each over --rounds
interleaved rounds (the order reversed every other round) and eager / compiled.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_train_compile.py --model mobilenetv2_100 --size 160 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

from dogbreeds.machine import load_average


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_100")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--bf16", action="store_true", help="forward and loss under bf16 autocast in both loops "
                                                        "(what train does on a CPU with native bf16)")
    args = p.parse_args()

    import timm
    import torch

    torch.set_num_threads(args.threads)
    print("load average at start:", load_average(), flush=True)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 20, (args.batch,))

    def make():
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=20).train().to(memory_format=torch.channels_last)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(model, optimizer) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    eager, compiled = make(), make()
    compiled = (torch.compile(compiled[0]), compiled[1])
    start = time.perf_counter()
    first = step(*compiled)
    print(f"compile + first step {time.perf_counter() - start:.1f} s; first losses: compiled {first:.4f}, "
          f"eager {step(*eager):.4f}", flush=True)
    step(*compiled)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            start = time.perf_counter()
            step(*(eager if name == "eager" else compiled))
            times[name].append(time.perf_counter() - start)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"{args.model} {args.size} px batch {args.batch}, {args.threads} thread(s), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}: eager {e:.3f} s/step, "
          f"compiled {c:.3f} s/step: compiled {e / c:.2f}x eager")
    print("load average at end:", load_average())


if __name__ == "__main__":
    main()
