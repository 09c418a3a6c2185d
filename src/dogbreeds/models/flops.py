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


def count_gmacs(model: torch.nn.Module, input_size: int = 224) -> float:
    """Multiply-accumulates / 1e9 for one image of input_size x input_size, batch 1."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.empty(1, 3, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def count_training_gflop(model: torch.nn.Module, batch: torch.Tensor, target: torch.Tensor,
                         loss=torch.nn.functional.cross_entropy) -> float:
    """FLOPs / 1e9 of one training step's forward and backward on `batch` (the convolutions and
    matrix products of both, as FlopCounterMode counts them; the optimizer's elementwise update is
    not counted). The gradients it leaves are cleared."""
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            loss(model(batch), target).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with shapes only (no memory), for counting."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)
