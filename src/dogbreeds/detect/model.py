"""The dog detector: torchvision's Faster R-CNN with a feature pyramid on a timm backbone.

    image -> timm backbone (features_only=True, the last three stages: strides 8, 16, 32)
          -> FeaturePyramidNetwork (+ a max-pooled level, stride 64)
          -> RPN -> RoIAlign -> two-layer box head -> one class, "dog"

The backbone starts from any weights `dogbreeds.create_model` loads (a pretrained tag, a
Keras / timm / torchvision / HF file, a dogbreeds run): the classifier is built first, then
its weights are moved into the features-only network (same tensors, timm's feature names).

Eval mode returns torchvision's detections: a list (one per image) of dicts with `boxes`
(N, 4 float, x0 y0 x1 y1 in the input image's pixels), `scores` (N,) and `labels` (N,, all
1 = dog). Train mode takes (images, targets) and returns the loss dict.

A trained detector is saved as one safetensors file (+ a JSON sidecar) whose metadata holds
the `DetectorConfig`; `load_detector(run)` rebuilds it from that alone.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..errors import DogbreedsError, WeightsError

log = logging.getLogger("dogbreeds")

FORMAT = "dogbreeds-detector"
VERSION = 1
METADATA_KEY = "dogbreeds_detector"
CLASS_NAMES = ("background", "dog")  # torchvision detection: label 0 is the background
DOG_LABEL = 1


MIN_RESIZE, MAX_RESIZE = 16, 4096  # the pixel range a config (read from a checkpoint or an export) may resize to


@dataclass
class DetectorConfig:
    """Everything that makes a detector run: the network (first block) and its training recipe.

    Saved as the run's config.yaml and inside every checkpoint; `load_detector` rebuilds the
    network from the first block alone."""

    # --- the network ---
    backbone: str = "mobilenetv2_100"
    weights: str | None = None          # where the backbone's first weights came from (provenance)
    min_size: int = 480                 # GeneralizedRCNNTransform: shorter side resized to this ...
    max_size: int = 800                 # ... unless the longer side would pass this
    infer_min_size: int | None = None   # at inference only (eval, predict, export): the resize's min_size / ...
    infer_max_size: int | None = None   # ... max_size, chosen on val (--choose-size); None: the training size
    out_indices: tuple[int, ...] | None = None  # backbone feature levels; None = the last three
    fpn_channels: int = 128
    representation_size: int = 512      # the box head's MLP width
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256)  # one per pyramid level (smallest first)
    anchor_scales: tuple[float, ...] = (1.0, 1.5)        # each size is also used times these
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    frozen_levels: int = 2              # backbone levels (from the stem) whose weights stay fixed
    channels_last: bool = True          # train and evaluate in NHWC (oneDNN convolutions: ~1.3x on this CPU)
    fast_layout: bool = True            # ConvNeXt with 1x1-conv MLPs (as breed runs: oneDNN, fast on AMD CPUs)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    box_score_thresh: float = 0.05      # detections kept at all (low: mAP needs the tail)
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 100
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    box_batch_size_per_image: int = 128
    roi_sampling_ratio: int = 2         # RoIAlign samples per bin side (its CPU backward is costly)
    score_threshold: float = 0.5        # a detection counts as a dog (counting, predict) from this score
    count_nms_iou: float = 1.0          # ... unless it overlaps a better one by IoU > this (1.0: off) ...
    count_containment: float = 1.0      # ... or covers / is covered by one by more than this of the smaller (infer.count_keep)
    crop_margin: float = 0.1            # each box grown by this of its size on every side before the breed run ...
    crop_square: bool = False           # ... as a square around it (infer.crop_dog); both chosen on val (--choose-margin)
    crop_mirror: bool = False           # the breed run's answer averaged over the crop and its mirror image (chosen too)

    # --- the training recipe ---
    data: str | None = None
    breeds: str = "top20"
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01                    # SGD, momentum 0.9, cosine to 1 % after a linear warm-up
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 10.0
    hflip: float = 0.5
    multi_dog_repeat: int = 1           # a photo with 2+ dogs appears this many times per epoch (repeat-factor sampling)
    mosaic: float = 0.0                 # each training sample is a mosaic of 2-4 photos with this probability (data.py)
    close_mosaic: int = 0               # ... except in the last this many epochs (Ultralytics' close_mosaic)
    workers: int = 2
    quick: bool = False
    out: str | None = None
    extra: dict = field(default_factory=dict)

    NETWORK_FIELDS = ("backbone", "min_size", "max_size", "out_indices", "fpn_channels", "representation_size",
                      "anchor_sizes", "anchor_scales", "aspect_ratios", "frozen_levels", "fast_layout", "mean", "std",
                      "box_score_thresh", "box_nms_thresh", "detections_per_img", "rpn_pre_nms_top_n_test",
                      "rpn_post_nms_top_n_test", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                      "box_batch_size_per_image", "roi_sampling_ratio")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k != "versions")
        if unknown:
            raise DogbreedsError(f"detector config has unknown fields {unknown}; was it written by a newer dogbreeds?")
        values = {}
        for key, value in d.items():
            if key not in known:
                continue
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        for key in ("min_size", "max_size", "infer_min_size", "infer_max_size"):  # read from files: bounded
            value = values.get(key)
            if value is None and key.startswith("infer_"):
                continue
            if key in values and (isinstance(value, bool) or not isinstance(value, int)
                                  or not MIN_RESIZE <= value <= MAX_RESIZE):
                raise DogbreedsError(f"detector config: {key} must be a whole number of pixels in "
                                     f"[{MIN_RESIZE}, {MAX_RESIZE}], got {value!r}; retrain, or restore the run")
        return cls(**values)

    def network_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in self.NETWORK_FIELDS}

    def inference_size(self) -> tuple[int, int]:
        """(min_size, max_size) of the resize at inference: the one chosen on the validation photos
        (`detect evaluate --choose-size`), else the training size. Training always uses min_size / max_size."""
        return (int(self.infer_min_size) if self.infer_min_size else int(self.min_size),
                int(self.infer_max_size) if self.infer_max_size else int(self.max_size))

    def apply_inference_size(self, model: nn.Module) -> nn.Module:
        """Set the eval-time resize of a torchvision detection `model` (its GeneralizedRCNNTransform,
        the same aspect logic: scale = min(min_size / short side, max_size / long side)) to
        `inference_size()`; the weights are unchanged. Returns the model."""
        min_size, max_size = self.inference_size()
        model.transform.min_size = (min_size,)
        model.transform.max_size = max_size
        return model


# --- the backbone ---

class TimmFPNBackbone(nn.Module):
    """timm features_only network + torchvision FeaturePyramidNetwork, as torchvision's
    GeneralizedRCNN expects: forward(images) -> OrderedDict of feature maps, `out_channels`."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _features_model(backbone: str, out_indices: tuple[int, ...] | None, fast_layout: bool):
    import timm

    arch = backbone.split(".")[0]
    if not timm.is_model(arch):
        from ..models.factory import _check_name

        _check_name(arch)  # raises with close names
    kwargs = {}
    if fast_layout:
        from ..train.session import fast_layout_kwargs

        kwargs = fast_layout_kwargs(arch)
    probe = timm.create_model(arch, features_only=True, pretrained=False, **kwargs)
    levels = len(probe.feature_info.channels())
    indices = tuple(out_indices) if out_indices else tuple(range(levels - 3, levels))
    if any(i < 0 or i >= levels for i in indices):
        raise DogbreedsError(f"out_indices {list(indices)} out of range for {arch}: it has feature levels 0..{levels - 1}")
    if indices == tuple(range(levels)):
        body = probe
    else:
        body = timm.create_model(arch, features_only=True, pretrained=False, out_indices=indices, **kwargs)
    return body, indices


def _classifier_weights(backbone: str, weights, pretrained: bool):
    """(state dict, Preprocessing) of the classifier `create_model` makes from these weights."""
    from ..models.factory import create_model

    if weights is not None:
        arch = backbone.split(".")[0]
        model = create_model(arch, num_classes=0, weights=weights)
    elif "." in backbone or pretrained:
        model = create_model(backbone, num_classes=0, pretrained=True)
    else:
        return None, None
    return model.state_dict(), getattr(model, "preprocessing", None)


def _load_into_features(body: nn.Module, state: dict, source: str) -> None:
    """Move a classifier's weights into timm's features-only network of the same architecture.
    FeatureListNet flattens the top-level Sequential ('stem.0' -> 'stem_0'); the rest of
    each name is unchanged. Every tensor of the features network must be found, of the same shape."""
    target = body.state_dict()
    loaded, missing, misshaped = {}, [], []
    for key, like in target.items():
        candidates = (key, key.replace("_", ".", 1))
        found = next((c for c in candidates if c in state), None)
        if found is None:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        value = state[found]
        if value.shape != like.shape and value.numel() == like.numel():
            value = value.reshape(like.shape)  # (C,1,1) vs (C,) layer scales, as create_model does
        if value.shape != like.shape:
            misshaped.append(f"{key} {tuple(value.shape)} vs {tuple(like.shape)}")
            continue
        loaded[key] = value
    if missing or misshaped:
        raise WeightsError(f"{source}: weights do not fit the detector's backbone: "
                           f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                           f"mis-shaped {misshaped[:5]}. Pass --backbone with the weights' own architecture")
    body.load_state_dict(loaded, strict=False)


def _freeze(body: nn.Module, levels: int) -> None:
    """Fix the weights of the stem and the first `levels` feature levels (every parameter
    registered up to the last one of level levels-1's module), and every BatchNorm everywhere
    (statistics and affine: detection batches are too small to estimate them)."""
    from timm.layers import freeze_batch_norm_2d

    frozen_bn = freeze_batch_norm_2d(body)
    assert frozen_bn is body  # timm converts the children in place for a non-BN root
    if levels <= 0:
        return
    names = [n.replace(".", "_", 1) if not any(k.startswith(n + ".") for k, _ in body.named_parameters()) else n
             for n in body.feature_info.module_name()]
    params = list(body.named_parameters())
    last = -1
    for prefix in names[:levels]:
        for i, (key, _) in enumerate(params):
            if key.startswith(prefix + "."):
                last = max(last, i)
    for i, (_, p) in enumerate(params):
        if i <= last:
            p.requires_grad_(False)


# --- the detector ---

def build_detector(backbone: str, weights: str | os.PathLike | None = None, *, min_size: int, max_size: int,
                   pretrained_backbone: bool = False, config: DetectorConfig | None = None) -> nn.Module:
    """A torchvision Faster R-CNN (FPN) for one class, dog, on a timm backbone.

    backbone:  a timm name (`mobilenetv2_100`, `convnext_atto`, ..., optionally with a pretrained tag).
    weights:   anything `create_model(weights=...)` reads (a Keras .h5, a timm file, a dogbreeds run);
               None with no tag and pretrained_backbone=False: a randomly initialised backbone.
    min_size / max_size: the resize of torchvision's GeneralizedRCNNTransform.
    config:    the other network settings (DetectorConfig's first block); its backbone, min_size and
               max_size are overridden by the arguments. The mean/std come from the weights when
               they say theirs (a Keras MobileNetV2 expects [-1, 1] input), else from `config`.

    The returned model has `.detector_config` (the DetectorConfig that rebuilds it).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    base = config.to_dict() if config is not None else {}
    cfg = DetectorConfig.from_dict({**base, "backbone": backbone, "min_size": int(min_size), "max_size": int(max_size)})
    body, indices = _features_model(backbone, cfg.out_indices, cfg.fast_layout)
    cfg.out_indices = indices
    state, preprocessing = _classifier_weights(backbone, weights, pretrained_backbone)
    if state is not None:
        _load_into_features(body, state, str(weights) if weights is not None else backbone)
        cfg.weights = str(weights) if weights is not None else backbone
        if preprocessing is not None:
            cfg.mean, cfg.std = tuple(float(v) for v in preprocessing.mean), tuple(float(v) for v in preprocessing.std)
    _freeze(body, cfg.frozen_levels)

    channels = body.feature_info.channels()
    net = TimmFPNBackbone(body, list(channels), cfg.fpn_channels)
    levels = len(indices) + 1  # + the max-pooled level
    sizes = list(cfg.anchor_sizes)
    while len(sizes) < levels:
        sizes.append(sizes[-1] * 2)
    anchor_sizes = tuple(tuple(int(round(s * k)) for k in cfg.anchor_scales) for s in sizes[:levels])
    anchors = AnchorGenerator(anchor_sizes, (tuple(cfg.aspect_ratios),) * levels)
    pooler = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(len(indices))], output_size=7,
                                sampling_ratio=cfg.roi_sampling_ratio)
    head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)
    model = FasterRCNN(
        net, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(cfg.mean), image_std=list(cfg.std),
        rpn_anchor_generator=anchors, box_roi_pool=pooler, box_head=head,
        box_predictor=FastRCNNPredictor(cfg.representation_size, len(CLASS_NAMES)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img, box_batch_size_per_image=cfg.box_batch_size_per_image,
    )
    model.detector_config = cfg
    return model


def detector_from_config(cfg: DetectorConfig, weights=None, pretrained_backbone: bool = False) -> nn.Module:
    return build_detector(cfg.backbone, weights, min_size=cfg.min_size, max_size=cfg.max_size,
                          pretrained_backbone=pretrained_backbone, config=cfg)


# --- checkpoints ---

def save_detector(model: nn.Module, path, config: DetectorConfig, extra: dict | None = None) -> Path:
    """Write the detector's weights to `path` (.safetensors, atomically) with the config in its
    metadata, and the same JSON as a sidecar next to it."""
    from safetensors.torch import save_file

    from ..rundir import atomic_write, atomic_write_text

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DogbreedsError(f"checkpoint path must end in .safetensors, got {path}")
    meta = {"format": FORMAT, "version": VERSION, "classes": list(CLASS_NAMES[1:]),
            "config": config.to_dict(), "extra": extra or {}}
    text = json.dumps(meta, indent=2, default=str) + "\n"
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    def write(tmp: Path) -> None:
        mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata={"format": FORMAT, METADATA_KEY: text})
        tmp.chmod(mode)  # safetensors re-creates the file owner-only; keep the mode atomic_write gave it

    atomic_write(path, write)
    atomic_write_text(path.with_suffix(".json"), text)
    return path


def read_detector_meta(path) -> dict:
    from ..models.checkpoint_format import safetensors_metadata
    from ..models.safety import parse_json

    path = Path(path)
    metadata = safetensors_metadata(path, "detector checkpoint")
    if metadata.get("format") != FORMAT or METADATA_KEY not in metadata:
        raise WeightsError(f"{path} is not a dogbreeds detector checkpoint (written by `dogbreeds detect train`); "
                           "a breed run is given with --breeds-run, a detector run as the RUN")
    meta = parse_json(metadata[METADATA_KEY], f"{path} (metadata entry {METADATA_KEY!r})", "detector metadata")
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: detector metadata is a JSON {type(meta).__name__}, not an object; retrain or restore it")
    if meta.get("version") != VERSION:
        raise WeightsError(f"{path}: detector checkpoint version {meta.get('version')}, this dogbreeds reads {VERSION}")
    return meta


def load_detector(run_dir) -> tuple[nn.Module, DetectorConfig]:
    """(detector in eval mode, its DetectorConfig) from a `dogbreeds detect train` run folder, its
    checkpoints folder or a checkpoint file (best, else last)."""
    from safetensors.torch import load_file

    from ..rundir import RunDir

    run = RunDir.locate(run_dir)
    checkpoint = run.checkpoint()
    meta = read_detector_meta(checkpoint)
    cfg = DetectorConfig.from_dict(meta["config"])
    model = detector_from_config(cfg, weights=None)
    state = load_file(str(checkpoint))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{checkpoint}: does not fit the detector its config describes "
                           f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    cfg.apply_inference_size(model)  # the size chosen on val, if any (a run without one: its training size)
    model.eval()
    return model, cfg
