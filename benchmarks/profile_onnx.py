"""Where an ONNX export spends its time: onnxruntime's own profiler, per operator type, on a random
batch, with dogbreeds' tuned session options (every graph optimisation, sleeping worker threads).

Prints milliseconds per batch and the share of each operator type (over --runs runs after
onnxruntime's fusions, so the names are the fused kernels that really ran: e.g. DynamicQuantizeMatMul,
Gelu), and the operator counts of the optimised graph.

    nice -n 5 python benchmarks/profile_onnx.py RUN/export/model-<key>-fp32head-int8.onnx --batch 16
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

from dogbreeds.machine import load_average


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort

    print("load average at start:", load_average())
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(scratch, "profile")
        options.optimized_model_filepath = os.path.join(scratch, "optimised.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = args.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).random((args.batch, 3, args.size, args.size), dtype=np.float32)
        name = session.get_inputs()[0].name
        session.run(None, {name: batch})  # warm-up (also profiled; not counted below)
        with open(session.end_profiling()) as f:
            warmup = sum(1 for e in json.load(f) if e.get("cat") == "Node")
        session = None
        session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
        for _ in range(args.runs):
            session.run(None, {name: batch})
        with open(session.end_profiling()) as f:
            events = json.load(f)
        per_op: collections.Counter = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_op[event["args"]["op_name"]] += event["dur"]
        total = sum(per_op.values())
        print(f"{args.onnx}: batch {args.batch} at {args.size} px, {args.threads} threads, {args.runs} runs "
              f"({warmup} warm-up events dropped)")
        for op, micros in per_op.most_common():
            print(f"  {op:28s} {micros / args.runs / 1000:9.1f} ms/batch {micros / total:7.1%}")
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        print("optimised graph:", dict(collections.Counter(n.op_type for n in graph.node).most_common()))
    print("load average at end:", load_average())


if __name__ == "__main__":
    main()
