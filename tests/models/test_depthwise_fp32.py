"""models/depthwise.py: keep_depthwise_fp32 turns exactly the depthwise convolutions of a model into ones that
compute in fp32 inside a bf16 autocast region, without touching parameters, state-dict keys or what the model
does outside autocast."""
from __future__ import annotations

import torch
from torch import nn

from dogbreeds.models.depthwise import Fp32DepthwiseConv2d, depthwise_convs, keep_depthwise_fp32
from dogbreeds.models.factory import create_model

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_only_the_depthwise_convolutions_change_and_the_weights_stay():
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert keep_depthwise_fp32(model) == 12  # one 7x7 per block: 2 + 2 + 6 + 2
    changed = [m for m in convs if type(m) is Fp32DepthwiseConv2d]
    assert len(changed) == 12 and all(m.groups == m.in_channels == m.out_channels for m in changed)
    assert all(type(m) is nn.Conv2d for m in convs if m.groups == 1)  # stem and downsampling untouched
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert keep_depthwise_fp32(model) == 12 and len(depthwise_convs(model)) == 12  # idempotent

    mobilenet = create_model("mobilenetv2_050", num_classes=3)
    assert keep_depthwise_fp32(mobilenet) == 17  # the 3x3 depthwise of the stem block and of each inverted residual


def test_under_autocast_it_computes_in_fp32_and_its_gradients_are_fp32_ones():
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    kept = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    kept.load_state_dict(plain.state_dict())
    keep_depthwise_fp32(kept)
    x = torch.randn(2, 8, 12, 12)
    grad = torch.randn(2, 8, 12, 12)
    reference = plain(x)  # fp32, no autocast
    reference.backward(grad)
    want = plain.weight.grad.clone()
    plain.weight.grad = None

    with torch.autocast(**BF16):
        y_bf16, y_kept = plain(x), kept(x.bfloat16())  # a bf16 input too (after a bf16 layer)
    assert y_bf16.dtype == torch.bfloat16 and y_kept.dtype == torch.float32
    assert torch.allclose(y_kept, plain(x.bfloat16().float()), atol=1e-6)
    with torch.autocast(**BF16):
        y_kept = kept(x)
    assert torch.equal(y_kept, reference)
    y_kept.backward(grad)
    y_bf16.float().backward(grad)
    err_kept = (kept.weight.grad - want).abs().max() / want.abs().max()
    err_bf16 = (plain.weight.grad - want).abs().max() / want.abs().max()
    assert kept.weight.grad.dtype == torch.float32 and err_kept < 1e-5 < err_bf16
    assert torch.equal(kept(x), reference)  # outside autocast: the plain convolution


def test_a_model_under_autocast_stays_closer_to_fp32():
    """The last stage's features (before the bf16 classifier rounds everything alike) move less from fp32's."""
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=5).eval()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):  # layer scale 1e-6 at init would hide every block's branch
            p.data.fill_(1.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_features(x)
        with torch.autocast(**BF16):
            all_bf16 = model.forward_features(x).float()
        keep_depthwise_fp32(model)
        with torch.autocast(**BF16):
            kept = model.forward_features(x).float()
        assert torch.equal(model.forward_features(x), want)
    assert (kept - want).abs().mean() < (all_bf16 - want).abs().mean()
