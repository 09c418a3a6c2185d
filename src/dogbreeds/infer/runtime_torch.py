"""The PyTorch runtime: one backend class for every way PyTorch runs the model.

"torch" runs the model in eager mode in the layout that runs fastest on CPU: channels_last
memory and ConvNeXt MLPs as 1x1 convolutions (`inference_layout`, which checks that the numbers
do not change). It is the reference path, and the one Grad-CAM needs (`TorchBackend.model`).
"torch-compile" compiles the same model with inductor and freezing; it compiles on the first
batch of each shape (minutes for ConvNeXt-T on 2 cores; `compile_seconds` says how long).

"torch-bf16" (and "-compile") runs the same under bf16 autocast on the CPU: fast where the CPU
has bf16 matrix units (AMX-BF16, AVX512-BF16), emulated and slow elsewhere (infer/auto.py only
probes it where machine.py finds native bf16). "cuda", "cuda-bf16" (and "cuda-bf16-compile")
run on the first CUDA GPU, channels_last, in fp32 or bf16 autocast; they say so when torch sees
no GPU (or one without bf16) instead of running somewhere else.

torch is imported inside the functions only: the registry imports this module at startup.
"""
from __future__ import annotations

import copy
import functools
import time
from pathlib import Path

import numpy as np

from ..errors import DogbreedsError
from .backend import Backend, ModelInfo, Runtime, info_for_model, register

EAGER, COMPILED = "torch", "torch-compile"
BF16, BF16_COMPILED = "torch-bf16", "torch-bf16-compile"
CUDA, CUDA_BF16, CUDA_BF16_COMPILED = "cuda", "cuda-bf16", "cuda-bf16-compile"
# engine -> (device, bf16 autocast, torch.compile)
SPECS = {EAGER: ("cpu", False, False), COMPILED: ("cpu", False, True),
         BF16: ("cpu", True, False), BF16_COMPILED: ("cpu", True, True),
         CUDA: ("cuda", False, False), CUDA_BF16: ("cuda", True, False), CUDA_BF16_COMPILED: ("cuda", True, True)}


def check_device(kind: str) -> None:
    """An error saying what is missing when `kind` needs a CUDA GPU (with bf16) that torch does not see."""
    import torch

    device, bf16, _ = SPECS[kind]
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise DogbreedsError(f"engine {kind!r} needs a CUDA GPU, and torch {torch.__version__} sees none "
                             f"(built for CUDA {torch.version.cuda}); use --engine auto or --engine torch")
    if bf16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        raise DogbreedsError(f"engine {kind!r} needs bf16 on the GPU, and {name} has none (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))} < 8.0); use --engine cuda")


def logits_and_features(model, x):
    """(logits, pooled pre-logit features) in one pass through the backbone: timm's interface
    (forward_features, forward_head with pre_logits), which timm models and the roadmap models
    have. The logits equal model(x): timm's forward is forward_head(forward_features(x))."""
    features = model.forward_features(x)
    return model.forward_head(features), model.forward_head(features, pre_logits=True)


def check_timm_interface(model) -> None:
    missing = [m for m in ("forward_features", "forward_head") if not callable(getattr(model, m, None))]
    if missing:
        name = getattr(model, "dogbreeds_name", None) or type(model).__name__
        raise DogbreedsError(f"model {name} has no {' / '.join(missing)} (timm's interface), so its pooled features "
                             "cannot be computed; build it with timm or dogbreeds.create_model")


class TorchBackend(Backend):
    """A torch model as a backend. fast=True (what the engines build): the inference layout and
    channels_last; fast=False: the model exactly as given (the reference `dogbreeds export`
    checks against). The model is used as it is (not copied): pass a copy to keep yours as is."""

    def __init__(self, model, info: ModelInfo | None = None, kind: str = EAGER, threads: int | None = None,
                 fast: bool = True):
        import torch

        info = info or info_for_model(model)
        super().__init__(info, info.checkpoint)
        if kind not in SPECS:
            raise ValueError(f"unknown torch engine {kind!r}; choose one of {', '.join(SPECS)}")
        check_device(kind)
        self.device, self.bf16, compiled = SPECS[kind]
        if threads:
            torch.set_num_threads(threads)
        model = model.eval()
        if fast:
            model = inference_layout(model).to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        self.kind = kind
        self._fast = fast
        self.compile_seconds: dict[tuple, float] = {}
        if compiled:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # fold weights into the graph: inference only
            # one compiled graph gives both outputs: forward takes the logits of it
            self._embed = torch.compile(functools.partial(logits_and_features, self.model), backend="inductor",
                                        dynamic=False)
            self._forward = lambda x: self._embed(x)[0]
        else:
            self._forward, self._embed = self.model, lambda x: logits_and_features(self.model, x)
        layout = "channels_last" if fast else "as loaded"
        where = (f"{torch.cuda.get_device_name(0)}" if self.device == "cuda" else f"{torch.get_num_threads()} threads")
        precision = "bf16 autocast" if self.bf16 else "fp32"
        self.description = f"torch {torch.__version__} {kind}, {precision}, {layout}, {where}"

    @classmethod
    def from_loaded(cls, loaded, kind: str = EAGER, threads: int | None = None, fast: bool = True) -> "TorchBackend":
        """A run's model read by `load_run` (used as it is, not copied)."""
        from .backend import info_for_loaded

        return cls(loaded.model, info_for_loaded(loaded), kind=kind, threads=threads, fast=fast)

    def _tensor(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self._fast else x

    def _timed(self, call, batch: np.ndarray):
        import contextlib

        import torch

        x = self._tensor(batch)
        first = SPECS[self.kind][2] and tuple(x.shape) not in self.compile_seconds
        autocast = (torch.autocast(self.device, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext())
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            out = call(x)
            if first and self.device == "cuda":
                torch.cuda.synchronize()
        if first:  # the first call of a shape compiles: remember how long that took
            self.compile_seconds[tuple(x.shape)] = time.perf_counter() - start
        return out

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self._timed(self._forward, batch).float().cpu().numpy()

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_timm_interface(self.model)
        logits, features = self._timed(self._embed, batch)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()


def _from_model(model, kind: str, info: ModelInfo, cache_dir: Path | None, threads: int | None) -> TorchBackend:
    check_device(kind)  # before copying a model there is no GPU for
    fast = inference_layout(model)
    # a copy, so that converting to channels_last does not change the caller's model
    return TorchBackend(copy.deepcopy(fast) if fast is model else fast, info, kind=kind, threads=threads)


register(Runtime(
    engines={EAGER: "PyTorch eager (channels_last, ConvNeXt MLPs as 1x1 convolutions)",
             COMPILED: "PyTorch inductor with freezing; compiles on the first batch of each shape (minutes)",
             BF16: "PyTorch eager under bf16 autocast, channels_last: fast on CPUs with AMX-BF16/AVX512-BF16 only; "
                   "changes the numbers",
             BF16_COMPILED: "torch-bf16 compiled with inductor (freezing); compiles on the first batch of each shape",
             CUDA: "PyTorch on the first CUDA GPU, fp32, channels_last",
             CUDA_BF16: "PyTorch on the first CUDA GPU under bf16 autocast (compute capability >= 8.0), channels_last",
             CUDA_BF16_COMPILED: "cuda-bf16 compiled with inductor; compiles on the first batch of each shape"},
    from_model=_from_model,
))


# --- the inference layout ----------------------------------------------------------------------

def inference_layout(model):
    """The same network in the layout that runs fastest on CPU.

    timm's default ConvNeXt block permutes to NHWC, runs LayerNorm + two Linear layers, and
    permutes back; the same block with `conv_mlp=True` holds the same weights (shaped
    (out, in, 1, 1)) and runs as convolutions that onnxruntime blocks for its NCHWc kernels,
    with no transposes in between. ConvNeXt blocks with Linear MLPs are rebuilt so; a model that
    has them already (built with conv_mlp=True, as training does for ConvNeXt-T) and any other
    model come back unchanged. The rebuilt model is checked against the original on a random
    batch and an error is raised if they differ.
    """
    return _convnext_mlp_layout(model, conv_mlp=True)


def linear_layout(model):
    """The reverse of `inference_layout`: ConvNeXt MLPs as Linear layers (timm's default for
    ConvNeXt-T), for the int8 export, whose dynamic quantisation speeds up matrix products
    (MatMul/Gemm) but not 1x1 convolutions. Other models come back unchanged."""
    return _convnext_mlp_layout(model, conv_mlp=False)


def _convnext_mlp_layout(model, conv_mlp: bool):
    import timm
    import torch
    from timm.models.convnext import ConvNeXt

    if not isinstance(model, ConvNeXt) or all(getattr(b, "use_conv_mlp", conv_mlp) == conv_mlp for b in model.modules()
                                               if type(b).__name__ == "ConvNeXtBlock"):
        return model
    arch = model.pretrained_cfg.get("architecture") or getattr(model, "dogbreeds_name", None)
    kwargs = {k: v for k, v in getattr(model, "dogbreeds_kwargs", {}).items() if k != "conv_mlp"}
    rebuilt = timm.create_model(arch, pretrained=False, num_classes=model.num_classes, conv_mlp=conv_mlp, **kwargs).eval()
    target = rebuilt.state_dict()
    source = model.state_dict()
    layout = "1x1-convolution" if conv_mlp else "Linear"
    if set(source) != set(target):
        raise DogbreedsError(f"cannot give {arch} {layout} MLPs: parameter names differ "
                             f"({sorted(set(source) ^ set(target))[:4]}); use engine='torch' for this model")
    rebuilt.load_state_dict({k: v.reshape(target[k].shape) for k, v in source.items()})
    for attr in ("preprocessing", "dogbreeds_name", "dogbreeds_kwargs", "pretrained_cfg", "default_cfg"):
        if hasattr(model, attr):
            setattr(rebuilt, attr, getattr(model, attr))
    size = getattr(getattr(model, "preprocessing", None), "input_size", 224)
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        diff = (model(probe) - rebuilt(probe)).abs().max().item()
    model.train(was_training)
    if not diff <= 1e-4:
        raise DogbreedsError(f"the {layout} layout of {arch} differs from the original by {diff:.3g}; "
                             "use engine='torch' and report the model name")
    return rebuilt
