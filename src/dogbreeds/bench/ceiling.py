"""The machine's ceiling: GFLOP/s of a large fp32 matrix product, with the benchmark's threads.

Measured with both libraries the inference paths use, because they differ a lot on AMD CPUs:
torch's matmul goes through MKL, onnxruntime's through its own MLAS kernels. The ceiling is
the faster of the two (the most this machine gave to fp32 arithmetic in this run). The
benchmark takes one sample of each per round, between the models' timings, so the ceiling
sees the same load from other processes as the models do.
"""
from __future__ import annotations

import time

import numpy as np

MATMUL_SIZE = 2048


class MatmulCeiling:
    def __init__(self, size: int = MATMUL_SIZE):
        import onnx
        import onnxruntime as ort
        import torch
        from onnx import TensorProto, helper, numpy_helper

        self.size = size
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        self._torch_a, self._torch_b = torch.from_numpy(a), torch.from_numpy(b)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [size, size])],
            [helper.make_tensor_value_info("C", TensorProto.FLOAT, [size, size])],
            [numpy_helper.from_array(b, "B")])
        # IR version 9 (onnx 1.16+ defaults to a newer one than onnxruntime may read)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._a = a
        self.samples: dict[str, list[float]] = {"torch (MKL)": [], "onnxruntime (MLAS)": []}
        self.samples_best: list[float] = []  # per sample, the faster library's GFLOP/s
        self.sample()  # warm up both

        for values in self.samples.values():
            values.clear()
        self.samples_best.clear()

    @property
    def flop(self) -> float:
        return 2.0 * self.size ** 3

    def sample(self) -> None:
        """Time one product with each library; store GFLOP/s."""
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            torch.matmul(self._torch_a, self._torch_b)
            self.samples["torch (MKL)"].append(self.flop / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        self._session.run(None, {"A": self._a})
        self.samples["onnxruntime (MLAS)"].append(self.flop / (time.perf_counter() - start) / 1e9)
        self.samples_best.append(max(v[-1] for v in self.samples.values()))

    def medians(self) -> dict[str, float]:
        return {name: float(np.median(v)) for name, v in self.samples.items() if v}

    @property
    def gflops(self) -> float:
        """The ceiling: the faster library's median GFLOP/s."""
        return max(self.medians().values())
