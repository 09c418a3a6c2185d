"""Model cost: parameters and multiply-accumulates, counted by torch itself.

torch's FlopCounterMode counts 2 FLOPs per multiply-accumulate for convolutions and matrix
products (and nothing for norms/activations, like fvcore, which the ConvNeXt paper used), so
MACs = FLOPs / 2. It also runs on `meta` tensors: a model built on the meta device costs no
memory and no arithmetic, which keeps ConvNeXt-XL (350M parameters) instant to measure.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params_m(model: torch.nn.Module) -> float:
    """Parameters in millions (buffers such as BatchNorm statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def forward_flops(model: torch.nn.Module, batch: torch.Tensor, train: bool = False) -> int:
    """FLOPs of one forward on `batch` (convolutions and matrix products), in eval or train mode;
    the model's mode is restored."""
    was_training = model.training
    model.train(train)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def count_gmacs(model: torch.nn.Module, input_size: int = 224) -> float:
    """Multiply-accumulates / 1e9 for one image of input_size x input_size, batch 1."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return forward_flops(model, torch.empty(1, 3, input_size, input_size, device=device)) / 2 / 1e9


def count_training_gflop(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """FLOPs / 1e9 of one training step on `batch` by the usual convention: 3x the forward's
    convolutions and matrix products (the forward, then the gradients of the inputs and of the
    weights, each as costly as the forward; the first layer's input gradient, which is never
    computed, is counted too, and the optimizer's elementwise update is not). The forward is
    counted in train mode. Not FlopCounterMode over the backward: torch 2.14's counter takes a
    grouped (depthwise) convolution's backward for a dense one (ConvNeXt-T: 51.9 GFLOP per image
    where the whole forward is 8.9)."""
    return 3 * forward_flops(model, batch, train=True) / 1e9


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with shapes only (no memory), for counting."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)
