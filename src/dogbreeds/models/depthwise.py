"""Depthwise convolutions computed in fp32 inside a bf16-autocast region (training on CPUs with bf16 units).

Under `torch.autocast(dtype=torch.bfloat16)` every convolution runs in bf16. On a 2-core Intel Xeon with
AMX-BF16 (torch 2.14, oneDNN, channels_last) that made ConvNeXt's 7x7 depthwise convolutions train 2.2-2.5x
slower than in fp32: their weight gradient, not their forward, was 103 ms in bf16 against 41 ms in fp32 for
one stage-1 convolution at batch 16 (96 channels, 56 x 56), and the depthwise backward took 47 % of a whole
ConvNeXt-T training step (torch profiler; docs/performance.md). Depthwise convolutions do few FLOPs per byte,
so bf16's matrix units buy them nothing. `keep_depthwise_fp32(model)` makes each depthwise `nn.Conv2d` of a
model run with autocast off and its input in fp32 (its output is fp32; the LayerNorm / BatchNorm after it
computes in fp32 under autocast anyway), everything else as autocast decides. The module keeps its class's
parameters and state-dict keys: checkpoints, EMA copies and exports are unaffected; outside autocast it is
the plain convolution.

Whether it pays is measured per machine, not assumed (train/depthwise_probe.py).
"""
from __future__ import annotations

import torch
from torch import nn


class Fp32DepthwiseConv2d(nn.Conv2d):
    """An nn.Conv2d (depthwise) that computes in fp32 even inside an autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def is_depthwise(module: nn.Module) -> bool:
    """A plain nn.Conv2d with one group per input channel (timm's ConvNeXt conv_dw, MobileNetV2's 3x3 ones)."""
    return type(module) in (nn.Conv2d, Fp32DepthwiseConv2d) and 1 < module.groups == module.in_channels


def depthwise_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if is_depthwise(m)]


def keep_depthwise_fp32(model: nn.Module) -> int:
    """Make every depthwise convolution of `model` compute in fp32 under autocast (in place); returns how many.
    Idempotent. Only exact nn.Conv2d modules are changed (a subclass with its own forward is left alone)."""
    found = depthwise_convs(model)
    for conv in found:
        conv.__class__ = Fp32DepthwiseConv2d
    return len(found)
