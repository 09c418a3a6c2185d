"""Freezing, layer-wise lr decay, the lr schedule, and the precision rule."""
from __future__ import annotations

import math

import pytest
import torch

from dogbreeds.errors import DogbreedsError
from dogbreeds.models.factory import create_model
from dogbreeds.train import session
from dogbreeds.train.optim import apply_freeze, build_optimizer, build_scheduler, set_train_mode
from dogbreeds.train.recipe import Recipe


def _scales(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("name, stem", [("convnext_atto", "stem.0.weight"), ("convnext_tiny", "stem.0.weight"),
                                        ("mobilenetv2_050", "conv_stem.weight")])
def test_layer_decay_gives_every_size_the_same_head_to_stem_ratio(name, stem):
    model = create_model(name, num_classes=5)
    scales = _scales(build_optimizer(model, Recipe(layer_decay=0.8)), model)
    head = "head.fc.weight" if name.startswith("convnext") else "classifier.weight"
    assert scales[head] == pytest.approx(1.0)
    # ~0.8**12 whatever the depth (timm alone would give 0.8**13 for atto and 0.8**19 for tiny)
    assert scales[stem] == pytest.approx(0.8 ** 12, rel=1e-6)
    deeper = [scales[n] for n in scales if n.startswith(("stages.3", "blocks.6"))]
    shallower = [scales[n] for n in scales if n.startswith(("stages.0", "blocks.0"))]
    assert min(deeper) > max(shallower)


def test_no_layer_decay_means_one_lr_and_no_decay_on_norms():
    model = create_model("convnext_atto", num_classes=5)
    optimizer = build_optimizer(model, Recipe(layer_decay=None, weight_decay=0.05))
    assert {g.get("lr_scale", 1.0) for g in optimizer.param_groups} == {1.0}
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(model.head.norm.weight)] == 0 and decays[id(model.head.fc.weight)] == 0.05


def test_last_n_stages_convnext_freezes_stem_and_early_stages():
    model = create_model("convnext_atto", num_classes=5)
    frozen = apply_freeze(model, "last_n_stages:1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("stages.3", "head")) for n in trainable)
    assert any(n.startswith("stages.3") for n in trainable) and "head.fc.weight" in trainable
    assert model.stem in frozen and model.stages[2] in frozen
    optimizer = build_optimizer(model, Recipe())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_last_n_stages_mobilenet_keeps_batchnorm_statistics_of_frozen_blocks():
    model = create_model("mobilenetv2_050", num_classes=5)
    frozen = apply_freeze(model, "last_n_stages:2")
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}
    set_train_mode(model, frozen)
    before = model.blocks[0][0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.blocks[0][0].bn1.running_mean, before)
    assert model.blocks[6].training and not model.bn1.training


def test_backbone_freeze_trains_only_the_classifier():
    model = create_model("convnext_atto", num_classes=5)
    apply_freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}


def test_too_many_stages_is_an_error():
    with pytest.raises(DogbreedsError, match="only 4 stages"):
        apply_freeze(create_model("convnext_atto", num_classes=5), "last_n_stages:5")


def test_schedule_warms_up_then_follows_cosine_to_min_lr():
    model = torch.nn.Linear(4, 2)
    recipe = Recipe(lr=1e-3, min_lr=1e-5, epochs=10, warmup_epochs=1, layer_decay=None)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=10)
    lrs = []
    for step in range(1, 101):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[4] < lrs[8] < 1e-3  # warming up over the first 10 steps
    assert lrs[9] == pytest.approx(1e-3)
    middle = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90))
    assert lrs[54] == pytest.approx(middle, rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_precision_auto_uses_bf16_on_cpu_only_with_amx(monkeypatch):
    cpu = torch.device("cpu")
    assert session.autocast_dtype("fp32", cpu) is None
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: None)
    assert session.autocast_dtype("auto", cpu) is None
    with pytest.raises(DogbreedsError, match="no native bf16"):
        session.autocast_dtype("bf16", cpu)
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: "avx512_bf16")
    assert session.autocast_dtype("auto", cpu) is None  # no faster than fp32: keep fp32
    assert session.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: "amx")
    assert session.autocast_dtype("auto", cpu) is torch.bfloat16


def test_this_machine_trains_in_fp32_by_default():
    """autocast_dtype alone (the rule without a probe) keeps fp32 on a CPU without AMX; train/precision_probe.py times
    bf16 against fp32 where the CPU has AVX512-BF16 (tests/train/test_precision_probe.py)."""
    if session.cpu_bf16_support() == "amx":
        pytest.skip("this CPU has AMX: bf16 is the right default")
    assert session.autocast_dtype("auto", torch.device("cpu")) is None
