"""ConvNeXt MLP layouts: Linear (O, I) weights and 1x1-convolution (O, I, 1, 1) weights load
into a model of either layout (timm conv_mlp=True is what training uses for ConvNeXt-T)."""
from __future__ import annotations

import pytest
import timm
import torch

from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import WeightsError
from dogbreeds.models.checkpoint_format import read_checkpoint_meta, save_model_checkpoint
from dogbreeds.models.factory import create_model, load_run

TOL = 1e-5
CLASSES = ClassInfo(("n02085620-Chihuahua", "n02085936-Maltese_dog", "n02099601-golden_retriever"))


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def conv_mlp_flags(model) -> set:
    return {block.use_conv_mlp for block in model.modules() if hasattr(block, "use_conv_mlp")}


def assert_same_logits(ours, reference):
    diff = (ours - reference).abs().max().item()
    assert diff <= TOL, f"max |diff| {diff:.3g} > {TOL}"
    assert reference.std() > 1e-3, "reference logits are flat: the comparison would prove nothing"


@pytest.mark.parametrize("file_layout, model_layout", [(False, True), (True, False)])
def test_timm_checkpoint_loads_into_the_other_mlp_layout(file_layout, model_layout, photo, tmp_path, randomize):
    source = randomize(timm.create_model("convnext_atto", conv_mlp=file_layout, num_classes=7), seed=11)
    assert source.stages[0].blocks[0].mlp.fc1.weight.ndim == (4 if file_layout else 2)
    path = tmp_path / "atto.pth"
    torch.save(source.state_dict(), path)

    ours = create_model("convnext_atto", conv_mlp=model_layout, weights=path)
    assert conv_mlp_flags(ours) == {model_layout} and ours.dogbreeds_kwargs == {"conv_mlp": model_layout}
    assert ours.stages[3].blocks[1].mlp.fc2.weight.ndim == (4 if model_layout else 2)
    assert_same_logits(logits(ours, photo), logits(source, photo))


def test_own_conv_mlp_checkpoint_loads_both_ways(photo, tmp_path, randomize):
    conv = randomize(create_model("convnext_atto", num_classes=3, conv_mlp=True), seed=12)
    path = save_model_checkpoint(conv, tmp_path / "run" / "checkpoints" / "best.safetensors", CLASSES)
    assert read_checkpoint_meta(path)["model_kwargs"] == {"conv_mlp": True}
    expected = logits(conv, photo)

    loaded = load_run(tmp_path / "run")  # rebuilt from the sidecar's model_kwargs: conv MLPs
    assert conv_mlp_flags(loaded.model) == {True}
    assert torch.equal(logits(loaded.model, photo), expected)

    linear = create_model("convnext_atto", conv_mlp=False, weights=path)  # the caller's kwargs win
    assert conv_mlp_flags(linear) == {False} and linear.stages[0].blocks[0].mlp.fc1.weight.ndim == 2
    assert_same_logits(logits(linear, photo), expected)

    # and back: a Linear own checkpoint into a conv-MLP model
    path2 = save_model_checkpoint(linear, tmp_path / "linear.safetensors", CLASSES)
    again = create_model("convnext_atto", conv_mlp=True, weights=path2)
    assert conv_mlp_flags(again) == {True}
    assert_same_logits(logits(again, photo), expected)


def test_a_real_shape_mismatch_is_still_refused(tmp_path, randomize):
    """Reshaping is only for layouts that differ by size-1 dims; other shapes stay errors."""
    sd = timm.create_model("convnext_atto", conv_mlp=False, num_classes=7).state_dict()
    sd["stages.0.blocks.0.mlp.fc1.weight"] = torch.zeros(160, 20, 2)  # same count, not a layout change
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"mis-shaped .*stages\.0\.blocks\.0\.mlp\.fc1\.weight"):
        create_model("convnext_atto", conv_mlp=True, weights=path)
