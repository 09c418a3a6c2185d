"""Does compiling for a fixed input shape speed OpenVINO up? The `openvino-bf16` engine (which
compiles each of its first shapes fixed) against the same export compiled with a dynamic shape
(what the engine did before), the bench's peer (the plain timm export, OpenVINO's bf16 hint and
its defaults, dynamic) and that peer reshaped to the fixed shape. One process, 2 threads,
interleaved rounds (bench_int8_static_matmul.interleaved: the order reversed every other round,
a settle pause before each timed call); random-init weights, 1000 classes, 224 px.

Printed per batch: each path's median ms per batch and its ratio against the peer.

    python benchmarks/bench_openvino_shapes.py mobilenetv2_100
    python benchmarks/bench_openvino_shapes.py convnext_tiny
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SIZE = 224


def main() -> None:
    import torch

    from bench_int8_static_matmul import interleaved  # benchmarks/ is sys.path[0]
    from dogbreeds import create_model
    from dogbreeds.infer.backend import build_backend
    from dogbreeds.infer.export import write_onnx
    from dogbreeds.infer.runtime_openvino import openvino_core
    from dogbreeds.machine import load_average

    name = sys.argv[1] if len(sys.argv) > 1 else "mobilenetv2_100"
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print("load average at start:", load_average(), flush=True)
    model = create_model(name, num_classes=1000).eval()
    scratch = Path(tempfile.mkdtemp(prefix="dogbreeds-ov-shapes-"))
    engine = build_backend(model, engine="openvino-bf16", cache_dir=scratch)
    plain = scratch / f"{name}-plain.onnx"
    write_onnx(model, plain, input_size=SIZE)  # as the bench's peer: the timm model as is
    core = openvino_core()

    def compiled(path: Path, config: dict, shape: list[int] | None = None):
        graph = core.read_model(str(path))
        if shape:
            graph.reshape({graph.inputs[0]: shape})
        request = core.compile_model(graph, "CPU", config).create_infer_request()
        return lambda x: request.infer({0: x})

    hint = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 2}
    for batch in (1, 16):
        shape = [batch, 3, SIZE, SIZE]
        paths = {"engine now (fixed shape)": engine.forward,
                 "engine before (dynamic)": compiled(engine.path, dict(hint, PERFORMANCE_HINT="LATENCY")),
                 "peer (defaults, dynamic)": compiled(plain, hint),
                 "peer, fixed shape": compiled(plain, hint, shape)}
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        # warm-up (and the engine's fixed-shape compile), then the rounds
        times = interleaved({k: SimpleNamespace(forward=run) for k, run in paths.items()}, x, 15 if batch == 1 else 7)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        peer = med["peer (defaults, dynamic)"]
        for k, ms in med.items():
            print(f"{name} batch {batch}: {k}: {ms:.1f} ms ({peer / ms:.2f}x the peer)", flush=True)
    print("load average at end:", load_average(), flush=True)


if __name__ == "__main__":
    main()
