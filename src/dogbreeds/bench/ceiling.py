"""The machine's ceilings: GFLOP/s of a large matrix product per precision (fp32, bf16, int8),
with the benchmark's threads, measured in the same run as the paths they are compared with.

Each precision is measured with every library available that computes in it, and its ceiling
is the fastest of them (the most this machine gave to that arithmetic in this run):

    fp32  torch matmul, onnxruntime MatMul (MLAS), OpenVINO MatMul (f32 hint)
    bf16  torch matmul on bf16 tensors (oneDNN), OpenVINO MatMul with the bf16 hint, counted
          only where OpenVINO reports that it really computes in bf16
    int8  onnxruntime MatMulInteger (u8 x s8 -> s32), torch._int_mm (s8 x s8 -> s32)

Products are timed at `size` x `size`, unless one call there would take longer than `call_s`:
then the size is halved until it fits (one call is timed at each size tried, starting from 256
and doubling). That bounds the cost of a precision this CPU does not have natively (bf16 and
int8 products are emulated, often 50-100x slower than fp32), which is still measured, at the
size that fits. The benchmark takes one sample of each probe per round, between the models'
timings, so the ceilings see the same load from other processes as the models do.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

MATMUL_SIZE = 2048
MIN_SIZE = 64
START_SIZE = 256
CALL_S = 1.0  # at most this long for one product (bounds emulated precisions)
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass
class Probe:
    precision: str
    library: str
    size: int
    run: Callable[[], object]
    note: str = ""
    samples: list[float] = field(default_factory=list)  # GFLOP/s

    @property
    def flop(self) -> float:
        return 2.0 * self.size ** 3

    def time_once(self) -> float:
        start = time.perf_counter()
        self.run()
        return self.flop / (time.perf_counter() - start) / 1e9


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _fit(make: Callable[[int], Callable[[], object]], size: int, call_s: float) -> tuple[int, Callable[[], object], str]:
    """The largest n <= `size` (from START_SIZE, doubling or halving) whose n x n product takes at
    most `call_s`, its runner (warmed up) and a note saying why, when n < size."""
    n = min(size, START_SIZE)
    run = make(n)
    run()  # warm-up (kernels, allocations)
    seconds = _timed(run)
    while n > MIN_SIZE and seconds > call_s:
        n //= 2
        run = make(n)
        run()
        seconds = _timed(run)
    while n < size and seconds * 8 <= call_s:  # doubling n costs about 8x
        n = min(size, n * 2)
        run = make(n)
        seconds = _timed(run)  # this first call also warms it up
    note = "" if n == size else f"timed at {n}x{n}: a {2 * n}x{2 * n} product would take over {call_s:g} s"
    return n, run, note


def _torch_probe(precision: str, size: int, call_s: float) -> Probe:
    import torch

    def make(n: int):
        gen = torch.Generator().manual_seed(0)
        if precision == "int8":
            a = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
            b = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)

            def run():
                with torch.inference_mode():
                    return torch._int_mm(a, b)
            return run
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)

        def run():
            with torch.inference_mode():
                return torch.matmul(a, b)
        return run
    n, run, note = _fit(make, size, call_s)
    library = "torch._int_mm" if precision == "int8" else "torch matmul"
    return Probe(precision, library, n, run, note)


def _onnx_matmul(n: int, op: str):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op == "MatMul":
        a_type, b = TensorProto.FLOAT, rng.standard_normal((n, n), dtype=np.float32)
        out_type, a = TensorProto.FLOAT, rng.standard_normal((n, n), dtype=np.float32)
    else:
        a_type, b = TensorProto.UINT8, rng.integers(-128, 127, (n, n), dtype=np.int8)
        out_type, a = TensorProto.INT32, rng.integers(0, 255, (n, n), dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["C"])], "matmul",
        [helper.make_tensor_value_info("A", a_type, [n, n])],
        [helper.make_tensor_value_info("C", out_type, [n, n])],
        [numpy_helper.from_array(b, "B")])
    # IR version 9 (onnx 1.16+ defaults to a newer one than onnxruntime may read)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model, a


def _ort_probe(precision: str, size: int, call_s: float, threads: int) -> Probe:
    import onnxruntime as ort

    op = "MatMul" if precision == "fp32" else "MatMulInteger"

    def make(n: int):
        model, a = _onnx_matmul(n, op)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"A": a})
    n, run, note = _fit(make, size, call_s)
    return Probe(precision, f"onnxruntime {op}", n, run, note)


def openvino_precision(compiled) -> str:
    """What an OpenVINO compiled model really computes in ("bf16", "f32", ...), as it reports it."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return str(getattr(value, "type_name", None) or value).lower().replace("float32", "f32").replace("bfloat16", "bf16")


def _openvino_probe(precision: str, size: int, call_s: float, threads: int) -> Probe:
    import openvino as ov
    import openvino.opset13 as ops

    from ..infer.runtime_openvino import openvino_core

    core = openvino_core()  # one per process (infer/runtime_openvino.py: a Core each crashed it later)
    hint = "f32" if precision == "fp32" else "bf16"
    actual = []

    def make(n: int):
        rng = np.random.default_rng(0)
        param = ops.parameter([n, n], ov.Type.f32, name="A")
        model = ov.Model([ops.matmul(param, ops.constant(rng.standard_normal((n, n), dtype=np.float32)), False, False)],
                         [param], "matmul")
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads})
        actual[:] = [openvino_precision(compiled)]
        request = compiled.create_infer_request()
        a = rng.standard_normal((n, n), dtype=np.float32)
        return lambda: request.infer({0: a})
    if precision == "bf16":  # compile once at a small size to learn whether bf16 is used at all
        make(MIN_SIZE)
        if actual[0] != "bf16":
            raise RuntimeError(f"OpenVINO computes in {actual[0]} here when asked for bf16")
    n, run, note = _fit(make, size, call_s)
    return Probe(precision, "OpenVINO MatMul", n, run, note)


class Ceilings:
    """Per-precision matmul ceilings (see the module doc). A library that is missing or fails is
    left out, with the reason in `skipped`."""

    def __init__(self, size: int = MATMUL_SIZE, threads: int | None = None, call_s: float = CALL_S, log=print):
        import torch

        from .inference import peer_installed

        self.size, self.call_s = size, call_s
        threads = threads or torch.get_num_threads()
        makers = [("fp32", "torch matmul", lambda: _torch_probe("fp32", size, call_s)),
                  ("fp32", "onnxruntime MatMul", lambda: _ort_probe("fp32", size, call_s, threads)),
                  ("bf16", "torch matmul", lambda: _torch_probe("bf16", size, call_s)),
                  ("int8", "onnxruntime MatMulInteger", lambda: _ort_probe("int8", size, call_s, threads)),
                  ("int8", "torch._int_mm", lambda: _torch_probe("int8", size, call_s))]
        if peer_installed("openvino"):
            makers += [("fp32", "OpenVINO MatMul", lambda: _openvino_probe("fp32", size, call_s, threads)),
                       ("bf16", "OpenVINO MatMul", lambda: _openvino_probe("bf16", size, call_s, threads))]
        else:
            log("  ceiling: OpenVINO is not installed; its products are not measured")
        self.probes: list[Probe] = []
        self.skipped: dict[str, str] = {}
        for precision, library, make in makers:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    probe = make()
            except Exception as exc:  # an unsupported op or a runtime's failure: reported, not fatal
                self.skipped[f"{precision} {library}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log(f"  ceiling {precision} {library}: skipped ({self.skipped[f'{precision} {library}']})")
                continue
            self.probes.append(probe)
        # per sample() call, the fastest library of each precision
        self.best: dict[str, list[float]] = {p: [] for p in PRECISIONS if any(q.precision == p for q in self.probes)}
        if "fp32" not in self.best:
            raise RuntimeError(f"no fp32 matrix product could be timed: {self.skipped}")

    def sample(self) -> None:
        """Time one product with each probe; store GFLOP/s."""
        for precision in self.best:
            values = []
            for probe in self.probes:
                if probe.precision == precision:
                    probe.samples.append(probe.time_once())
                    values.append(probe.samples[-1])
            self.best[precision].append(max(values))

    @property
    def rounds(self) -> int:
        return len(self.best["fp32"])

    def medians(self) -> dict[str, dict[str, float]]:
        """{precision: {library: median GFLOP/s}}."""
        out: dict[str, dict[str, float]] = {}
        for probe in self.probes:
            if probe.samples:
                out.setdefault(probe.precision, {})[probe.library] = float(np.median(probe.samples))
        return out

    def gflops(self, precision: str = "fp32") -> float | None:
        """The ceiling of `precision`: its fastest library's median GFLOP/s (None: not measured)."""
        values = self.medians().get(precision)
        return max(values.values()) if values else None

    def since(self, precision: str, first: int) -> float | None:
        """The ceiling of `precision` over the samples taken from index `first` on (the rounds of one
        group of paths, which saw the same load); the whole run's where there are none."""
        values = self.best.get(precision, [])[first:]
        return float(np.median(values)) if values else self.gflops(precision)

    def to_dict(self) -> dict:
        return {"medians": self.medians(), "gflops": {p: self.gflops(p) for p in self.best},
                "sizes": {f"{q.precision} {q.library}": q.size for q in self.probes},
                "notes": {f"{q.precision} {q.library}": q.note for q in self.probes if q.note},
                "samples": {f"{q.precision} {q.library}": q.samples for q in self.probes},
                "skipped": self.skipped, "size": self.size, "call_s": self.call_s}

