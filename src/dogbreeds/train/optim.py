"""What trains and how fast: freezing, AdamW with layer-wise lr decay, per-step cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DogbreedsError
from .recipe import Recipe, parse_freeze

# timm gives every block of a network its own layer-decay group, so a fixed per-group decay
# would shrink the stem's lr far more in ConvNeXt-B (37 groups) than in ConvNeXt-T (19) or
# atto (13). We rescale it so that `layer_decay` means "decay per twelfth of the depth":
# the stem always gets lr * layer_decay**12, whatever the model's size. Twelve is the depth
# the ConvNeXt and BEiT fine-tuning papers quote their layer-decay values for.
LAYER_DECAY_REFERENCE_DEPTH = 12


def stage_container(model: nn.Module) -> tuple[str, nn.Sequential]:
    """The model's sequence of stages: ConvNeXt `stages` (4 resolutions), MobileNetV2 `blocks`
    (7 groups of inverted residuals that share a width and stride)."""
    for name in ("stages", "blocks"):
        stages = getattr(model, name, None)
        if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) > 0:
            return name, stages
    raise DogbreedsError(
        f"freeze=last_n_stages:N needs a model with `stages` (ConvNeXt) or `blocks` (MobileNetV2, "
        f"EfficientNet); {type(model).__name__} has neither: use freeze=none or freeze=backbone"
    )


def resolve_freeze(model: nn.Module, recipe: Recipe) -> str:
    """The recipe's freeze for this model, 'auto' made concrete (Recipe.resolved_freeze)."""
    try:
        stage_container(model)
    except DogbreedsError:
        return recipe.resolved_freeze(has_stages=False)
    return recipe.resolved_freeze(has_stages=True)


def apply_freeze(model: nn.Module, freeze: str) -> list[nn.Module]:
    """Turn off gradients for the frozen part; return the frozen modules (keep them in eval mode,
    so BatchNorm statistics and drop_path stay those of the pretrained weights).

    'last_n_stages:N' trains the last N stages and everything after them (ConvNeXt: norm_pre and
    the head; MobileNetV2: conv_head, bn2 and the classifier). The stem and earlier stages freeze.
    'backbone' freezes everything but the classifier (`model.get_classifier()`).
    """
    mode, keep = parse_freeze(freeze)
    if mode == "none":
        return []
    if mode == "backbone":
        # Only the final linear layer trains (a head's own norm, e.g. ConvNeXt's head.norm, stays
        # frozen: it is part of the cached features).
        classifier = model.get_classifier()
        model.requires_grad_(False)
        classifier.requires_grad_(True)
        return [m for m in model.modules() if m is not model and not _contains(m, classifier)]
    container_name, stages = stage_container(model)
    if keep > len(stages):
        name = getattr(model, "dogbreeds_name", type(model).__name__)
        raise DogbreedsError(f"freeze={freeze!r}: {name} has only {len(stages)} stages "
                             f"({container_name}.0 .. {container_name}.{len(stages) - 1})")
    frozen = []
    for name, child in model.named_children():  # children registered before the stages: the stem
        if name == container_name:
            break
        frozen.append(child)
    frozen += list(stages[: len(stages) - keep])
    for module in frozen:
        module.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise DogbreedsError(f"freeze={freeze!r} leaves nothing to train")
    return frozen


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


def build_optimizer(net: nn.Module, recipe: Recipe, use_layer_decay: bool = True) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on norms and biases (timm's filter)."""
    from timm.optim import create_optimizer_v2

    layer_decay = recipe.layer_decay if use_layer_decay else None
    if layer_decay is not None and layer_decay < 1:
        layer_decay = layer_decay ** (LAYER_DECAY_REFERENCE_DEPTH / max(1, _deepest_layer(net)))
    return create_optimizer_v2(net, opt="adamw", lr=recipe.lr, weight_decay=recipe.weight_decay,
                               layer_decay=layer_decay)


def _deepest_layer(net: nn.Module) -> int:
    """Index of the head's group in timm's per-block layer grouping (= number of decay steps)."""
    if not hasattr(net, "group_matcher"):
        return LAYER_DECAY_REFERENCE_DEPTH  # timm falls back to one group per top-level child
    from timm.models import group_parameters

    layer_map = group_parameters(net, net.group_matcher(coarse=False), reverse=True)
    return max(layer_map.values()) if layer_map else 1


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Linear warmup then cosine to min_lr, updated every optimizer step (timm's scheduler,
    which also applies each group's layer-decay `lr_scale`)."""
    from timm.scheduler import CosineLRScheduler

    total = recipe.epochs * steps_per_epoch
    warmup = min(total - 1, int(math.ceil(recipe.warmup_epochs * steps_per_epoch)))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=recipe.min_lr,
        warmup_t=warmup,
        warmup_lr_init=recipe.lr * 1e-3 if warmup else recipe.lr,
        warmup_prefix=True,  # the cosine starts at full lr once warmup ends
        t_in_epochs=False,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's lr (the largest: layer decay only scales the others down)."""
    return max(group["lr"] for group in optimizer.param_groups)
