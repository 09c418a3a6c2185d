"""The roadmap models: step 11 is timm's convnext_tiny, step 0 is ResNet-50, every step runs."""
from __future__ import annotations

import importlib
import warnings
from dataclasses import fields, replace

import pytest
import timm
import torch

from dogbreeds.models.flops import count_gmacs, count_params_m, meta_model
from dogbreeds.roadmap import models as roadmap


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere: at init layer scale is 1e-6 (every block a no-op) and norms are
    weight 1 / bias 0, which would hide a wrong mapping or a missing layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in module.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=gen) * 0.1 + 0.05)
    return module.eval()


def test_step11_is_convnext_tiny_weights_and_logits():
    # Built on the meta device and materialised uninitialised: every value is overwritten anyway,
    # and skipping two 28M-parameter initialisations keeps the test quick.
    reference = _randomize(meta_model("convnext_tiny", num_classes=7).to_empty(device="cpu"))
    ours = meta_model("roadmap_step11", num_classes=7).to_empty(device="cpu").eval()
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    result = ours.load_state_dict(theirs, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.abs().max() > 1  # random weights: the logits are not trivially tiny
    assert (got - expected).abs().max().item() <= 1e-4


def test_step11_cost_equals_convnext_tiny():
    ours, reference = meta_model("roadmap_step11"), meta_model("convnext_tiny")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 28_589_128
    assert count_gmacs(ours) == pytest.approx(count_gmacs(reference), rel=1e-9)


def test_step0_is_resnet50():
    # Without layer scale (part of the recipe, not of ResNet) the parameters are ResNet-50's exactly.
    plain = meta_model("roadmap_step0", layer_scale_init_value=0)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in meta_model("resnet50").parameters())
    with_layer_scale = meta_model("roadmap_step0")
    assert count_params_m(with_layer_scale) == pytest.approx(25.6, abs=0.05)
    assert count_gmacs(with_layer_scale) == pytest.approx(4.1, abs=0.05)
    assert count_gmacs(with_layer_scale) == pytest.approx(count_gmacs(meta_model("resnet50")), rel=1e-3)


@pytest.mark.parametrize("step", range(roadmap.NUM_STEPS))
def test_every_step_trains_at_a_small_input(step):
    # Each step's exact design at 1/8 of the width: the same layers in the same order, 64x fewer
    # weights, so twelve real forward/backward passes fit the shared test machine. (The full-width
    # models run on the meta device in test_table.py, which checks every shape.)
    torch.manual_seed(step)
    config = roadmap.STEPS[step]
    config = replace(config, widths=tuple(w // 8 for w in config.widths))
    model = roadmap.RoadmapNet(config, num_classes=5, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval mode: drop path and BN statistics are fixed


def test_each_step_changes_one_design_choice():
    # Step 3 is the paper's "ResNeXt-ify": depthwise conv and the wider network together.
    expected = {1: {"depths"}, 2: {"stem"}, 3: {"depthwise", "widths"}, 4: {"block"}, 5: {"dw_position"},
                6: {"kernel_size"}, 7: {"act"}, 8: {"n_acts"}, 9: {"n_norms"}, 10: {"norm"}, 11: {"downsample"}}
    for step in range(1, roadmap.NUM_STEPS):
        before, after = roadmap.STEPS[step - 1], roadmap.STEPS[step]
        changed = {f.name for f in fields(before) if getattr(before, f.name) != getattr(after, f.name)}
        assert changed == expected[step], f"step {step}"


def _block(step: int) -> torch.nn.Module:
    return meta_model(roadmap.model_name(step)).stages[1].blocks[1]  # a block without shortcut conv


def test_micro_design_steps_keep_one_activation_and_one_norm():
    def count(module, kinds):
        return sum(isinstance(m, kinds) for m in module.modules())

    acts, norms = (torch.nn.ReLU, torch.nn.GELU), (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    assert (count(_block(7), acts), count(_block(7), norms)) == (3, 3)
    assert (count(_block(8), acts), count(_block(8), norms)) == (1, 3)
    assert (count(_block(9), acts), count(_block(9), norms)) == (1, 1)
    assert isinstance(_block(10).norm, torch.nn.LayerNorm) and isinstance(_block(9).norm, torch.nn.BatchNorm1d)
    # Inverted bottleneck: the depthwise conv works on the 4x wide layer until step 5 moves it up.
    assert _block(4).conv_dw.in_channels == 4 * 192 == _block(4).conv_dw.groups
    assert _block(5).conv_dw.in_channels == 192 == _block(5).conv_dw.groups
    assert _block(5).conv_dw.kernel_size == (3, 3) and _block(6).conv_dw.kernel_size == (7, 7)


def test_reachable_through_create_model():
    from dogbreeds.models.factory import create_model

    model = create_model("roadmap_step6", num_classes=20)
    assert model.get_classifier().out_features == 20
    assert model.preprocessing.input_size == 224 and model.preprocessing.interpolation == "bicubic"


def test_reimport_registers_again_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.reload(roadmap)
    assert sorted(timm.list_models("roadmap_step*")) == sorted(module.model_name(s) for s in range(module.NUM_STEPS))
    assert timm.create_model("roadmap_step2", num_classes=3).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_bad_requests_say_what_to_do():
    with pytest.raises(ValueError, match="roadmap_step4 has no pretrained weights"):
        timm.create_model("roadmap_step4", pretrained=True)
    with pytest.raises(ValueError, match="norm='group'.*'batch', 'layer'"):
        roadmap.RoadmapNet(roadmap.RoadmapConfig(norm="group"))
    with pytest.raises(ValueError, match="4 stage depths.*3 widths"):
        roadmap.RoadmapNet(roadmap.RoadmapConfig(widths=(64, 128, 256)))


def test_step11_takes_a_convnext_tiny_weights_file_through_create_model(tmp_path):
    from safetensors.torch import save_file

    from dogbreeds.models.factory import create_model

    reference = _randomize(meta_model("convnext_tiny").to_empty(device="cpu"), seed=3)
    path = tmp_path / "convnext_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = create_model("roadmap_step11", weights=path).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-4
