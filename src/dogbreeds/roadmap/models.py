"""The design journey of ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022, Sec. 2 and
Figure 2): ResNet-50 turned into ConvNeXt-T one design decision at a time.

One configurable network (`RoadmapNet`, built from `RoadmapConfig`) serves every step; each step
in `STEPS` is the previous step's config with one thing changed. Importing this module registers
`roadmap_step0` ... `roadmap_step11` with timm, so `timm.create_model("roadmap_step6",
num_classes=20)` and our `dogbreeds.create_model` build them.

Step 11 is timm's `convnext_tiny`, module for module: same names (stem.0/1, stages.N.downsample,
stages.N.blocks.M.conv_dw/norm/mlp.fc1/mlp.fc2/gamma, head.norm/fc) and shapes, so a
convnext_tiny state_dict loads into it with nothing missing or left over.

Every block keeps its 1x1 convolutions as `nn.Linear` on channels-last tensors (a 1x1 conv is a
matmul over channels). That is how ConvNeXt itself is written, and it lets step 11 share timm's
weight shapes; the price is a few permutes, each marked with the shapes on either side.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

NUM_STEPS = 12


@dataclass(frozen=True)
class RoadmapConfig:
    """Everything that changes between steps. Defaults are ResNet-50 (step 0)."""

    depths: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage; Swin-T's ratio is 1:1:3:1
    # The paper's "width" per stage: the narrow inner width of a bottleneck block (its output
    # is 4x wider), or the residual width of an inverted block (its inner MLP is 4x wider).
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = "resnet"  # "resnet": 7x7/2 conv + norm + act + 3x3/2 max-pool; "patchify": 4x4/4 conv
    block: str = "bottleneck"  # "bottleneck" (wide-narrow-wide) | "inverted" (narrow-wide-narrow)
    depthwise: bool = False  # spatial conv with one group per channel (ResNeXt taken to the limit)
    dw_position: str = "middle"  # where the spatial conv sits: "middle" (ResNet) | "top" (before the 1x1s)
    kernel_size: int = 3
    act: str = "relu"  # "relu" | "gelu"
    n_acts: int = 3  # 3: after each of the first two layers and after the residual sum; 1: after the first 1x1
    n_norms: int = 3  # 3: after every layer; 1: only after the block's first layer
    norm: str = "batch"  # "batch" | "layer"
    # "strided_block": the first block of stages 2-4 has stride 2 and a 1x1/2 conv shortcut (ResNet).
    # "separate": norm + 2x2/2 conv between stages, plus a norm after the stem and one after global
    # pooling -- the paper adds norms "wherever spatial resolution is changed" in the same step.
    downsample: str = "strided_block"
    # Layer scale (CaiT) multiplies each residual branch by a learned per-channel gain, started at
    # this value; 0 turns it off. The paper lists it among ConvNeXt's training settings (Sec. 3.1,
    # Table 5) and keeps one recipe for the whole journey (Sec. 2.1), so every step has it.
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0  # stochastic depth, raised linearly from 0 to this over the blocks

    def validate(self) -> None:
        choices = {
            "stem": ("resnet", "patchify"),
            "block": ("bottleneck", "inverted"),
            "dw_position": ("middle", "top"),
            "act": ("relu", "gelu"),
            "n_acts": (1, 3),
            "n_norms": (1, 3),
            "norm": ("batch", "layer"),
            "downsample": ("strided_block", "separate"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"RoadmapConfig.{name}={value!r} is not supported; use one of {allowed}")
        if len(self.depths) != len(self.widths):
            raise ValueError(
                f"RoadmapConfig has {len(self.depths)} stage depths {self.depths} but {len(self.widths)} "
                f"widths {self.widths}; give one width per stage"
            )
        if self.kernel_size % 2 != 1:
            raise ValueError(f"RoadmapConfig.kernel_size={self.kernel_size} must be odd so 'same' padding exists")


# The journey, one change per step (paper Sec. 2.2-2.6, Figure 2).
STEPS: list[RoadmapConfig] = [RoadmapConfig()] * NUM_STEPS  # each entry set below, from the one before
STEPS[0] = RoadmapConfig()  # ResNet-50 (torchvision layout), under the modern recipe
STEPS[1] = replace(STEPS[0], depths=(3, 3, 9, 3))  # stage compute ratio of Swin-T
STEPS[2] = replace(STEPS[1], stem="patchify")  # non-overlapping 4x4 patches, like a ViT
STEPS[3] = replace(STEPS[2], depthwise=True, widths=(96, 192, 384, 768))  # ResNeXt-ify, width 64 -> 96
STEPS[4] = replace(STEPS[3], block="inverted")  # MLP-like 4x expansion
STEPS[5] = replace(STEPS[4], dw_position="top")  # the spatial conv first, like attention before the MLP
STEPS[6] = replace(STEPS[5], kernel_size=7)  # large kernel (Swin's 7x7 window)
STEPS[7] = replace(STEPS[6], act="gelu")
STEPS[8] = replace(STEPS[7], n_acts=1)  # one GELU between the two 1x1 layers
STEPS[9] = replace(STEPS[8], n_norms=1)  # one norm, before the 1x1 layers
STEPS[10] = replace(STEPS[9], norm="layer")
STEPS[11] = replace(STEPS[10], downsample="separate")  # = ConvNeXt-T

STEP_TITLES = (
    "ResNet-50",
    "stage ratio 3:3:9:3",
    "patchify stem",
    "depthwise conv, width 96",
    "inverted bottleneck",
    "depthwise conv moved up",
    "kernel 7x7",
    "ReLU -> GELU",
    "fewer activations",
    "fewer norms",
    "BN -> LN",
    "separate downsampling (ConvNeXt-T)",
)


def model_name(step: int) -> str:
    return f"roadmap_step{step}"


# --- layers ----------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (same parameters as nn.LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


class BatchNormChannelsLast(nn.BatchNorm1d):
    """BatchNorm over the last dim of (..., C): statistics over every other dim, exactly what
    BatchNorm2d computes for NCHW, so the BN steps need no extra permutes around the 1x1 layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def make_norm(kind: str, dim: int, channels_last: bool) -> nn.Module:
    if kind == "layer":
        # eps 1e-6 as ConvNeXt (and its weights) use.
        return nn.LayerNorm(dim, eps=1e-6) if channels_last else LayerNorm2d(dim, eps=1e-6)
    return BatchNormChannelsLast(dim) if channels_last else nn.BatchNorm2d(dim)


def make_act(kind: str) -> nn.Module:
    return nn.GELU() if kind == "gelu" else nn.ReLU(inplace=True)


def has_bias(norm_follows: bool, norm: str) -> bool:
    """A bias right before BatchNorm is cancelled by its mean subtraction (ResNet has none);
    LayerNorm normalises across channels, so a per-channel bias survives it (ConvNeXt keeps it)."""
    return not (norm_follows and norm == "batch")


class RoadmapBlock(nn.Module):
    """A residual block that is every step's block: three layers -- a k x k spatial conv
    (`conv_dw`) and two 1x1 convs (`mlp.fc1`, `mlp.fc2`) -- in the order, widths, norms and
    activations the step asks for.

    dw_first=False (ResNet): fc1 (in -> hidden), conv_dw (hidden), fc2 (hidden -> out)
    dw_first=True (ConvNeXt): conv_dw (in), fc1 (in -> hidden), fc2 (hidden -> out)

    A bottleneck has hidden = out / 4; an inverted bottleneck has hidden = 4 * out.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        stride: int = 1,
        kernel_size: int = 7,
        depthwise: bool = True,
        dw_first: bool = True,
        act: str = "gelu",
        n_acts: int = 1,
        n_norms: int = 1,
        norm: str = "layer",
        layer_scale_init_value: float = 1e-6,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.dw_first = dw_first
        spatial_dim = in_dim if dw_first else hidden_dim
        widths_after = (in_dim, hidden_dim, out_dim) if dw_first else (hidden_dim, hidden_dim, out_dim)
        norm_after = (True, n_norms == 3, n_norms == 3)
        # With one activation it sits after fc1, between the two 1x1 layers (paper Sec. 2.6).
        fc1_position = 1 if dw_first else 0
        act_after = [n_acts == 3, n_acts == 3]
        if n_acts == 1:
            act_after[fc1_position] = True
        bias = [has_bias(n, norm) for n in norm_after]
        spatial_bias, fc1_bias = (bias[0], bias[1]) if dw_first else (bias[1], bias[0])

        self.conv_dw = nn.Conv2d(
            spatial_dim, spatial_dim, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=spatial_dim if depthwise else 1, bias=spatial_bias,
        )  # named as in ConvNeXt; a full (groups=1) conv before step 3
        # A plain container so that step 11's parameters are named `mlp.fc1`/`mlp.fc2` like timm's.
        self.mlp = nn.ModuleDict({
            "fc1": nn.Linear(in_dim, hidden_dim, bias=fc1_bias),
            "fc2": nn.Linear(hidden_dim, out_dim, bias=bias[2]),
        })
        # Norms and activations after the block's first, second and third layer.
        self.norm = make_norm(norm, widths_after[0], channels_last=True) if norm_after[0] else nn.Identity()
        self.norm2 = make_norm(norm, widths_after[1], channels_last=True) if norm_after[1] else nn.Identity()
        self.norm3 = make_norm(norm, widths_after[2], channels_last=True) if norm_after[2] else nn.Identity()
        self.act1 = make_act(act) if act_after[0] else nn.Identity()
        self.act2 = make_act(act) if act_after[1] else nn.Identity()
        self.act_out = make_act(act) if n_acts == 3 else nn.Identity()  # ResNet's ReLU after the sum
        self.gamma = nn.Parameter(torch.full((out_dim,), layer_scale_init_value)) if layer_scale_init_value > 0 else None

        if stride != 1 or in_dim != out_dim:
            # ResNet's projection shortcut: 1x1 conv (strided when the block downsamples) + norm.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=has_bias(True, norm)),
                make_norm(norm, out_dim, channels_last=False),
            )
        else:
            self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        if self.dw_first:
            x = self.conv_dw(x)
            x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C): norms and 1x1s act on the last dim
            x = self.act1(self.norm(x))
            x = self.act2(self.norm2(self.mlp["fc1"](x)))
        else:
            x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
            x = self.act1(self.norm(self.mlp["fc1"](x)))
            x = x.permute(0, 3, 1, 2)  # (N, H, W, hidden) -> (N, hidden, H, W) for the spatial conv
            x = self.conv_dw(x)
            x = x.permute(0, 2, 3, 1)  # (N, hidden, H, W) -> (N, H, W, hidden)
            x = self.act2(self.norm2(x))
        x = self.norm3(self.mlp["fc2"](x))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return self.act_out(shortcut + self.drop_path(x))


class RoadmapStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, norm: str | None, drop_rate: float = 0.0):
        super().__init__()
        # After pooling the tensor is (N, C): channels are last.
        self.norm = make_norm(norm, in_dim, channels_last=True) if norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((2, 3)))  # global average pool: (N, C, H, W) -> (N, C)
        return x if pre_logits else self.fc(self.drop(x))


# --- network ---------------------------------------------------------------------------------


class RoadmapNet(nn.Module):
    def __init__(
        self,
        config: RoadmapConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,  # overrides config.drop_path_rate (timm's kwarg name)
        layer_scale_init_value: float | None = None,  # overrides config.layer_scale_init_value
    ):
        super().__init__()
        if drop_path_rate is not None:
            config = replace(config, drop_path_rate=drop_path_rate)
        if layer_scale_init_value is not None:
            config = replace(config, layer_scale_init_value=layer_scale_init_value)
        config.validate()
        self.config = config
        c = config
        separate = c.downsample == "separate"

        if c.stem == "resnet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, c.widths[0], 7, stride=2, padding=3, bias=has_bias(True, c.norm)),
                make_norm(c.norm, c.widths[0], channels_last=False),
                make_act(c.act),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            stem_norm = [make_norm(c.norm, c.widths[0], channels_last=False)] if separate else []
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, c.widths[0], 4, stride=4, bias=has_bias(bool(stem_norm), c.norm)),
                *stem_norm,
            )

        n_blocks = sum(c.depths)
        drop_rates = [c.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        stages, in_dim, block_index = [], c.widths[0], 0
        for i, (depth, width) in enumerate(zip(c.depths, c.widths)):
            out_dim, hidden_dim = (4 * width, width) if c.block == "bottleneck" else (width, 4 * width)
            stride = 2 if (i > 0 and not separate) else 1
            if i > 0 and separate:
                downsample = nn.Sequential(
                    make_norm(c.norm, in_dim, channels_last=False),
                    nn.Conv2d(in_dim, out_dim, 2, stride=2, bias=True),
                )
                in_dim = out_dim
            else:
                downsample = nn.Identity()
            blocks = []
            for j in range(depth):
                blocks.append(RoadmapBlock(
                    in_dim if j == 0 else out_dim, out_dim, hidden_dim,
                    stride=stride if j == 0 else 1,
                    kernel_size=c.kernel_size,
                    depthwise=c.depthwise,
                    dw_first=c.dw_position == "top",
                    act=c.act,
                    n_acts=c.n_acts,
                    n_norms=c.n_norms,
                    norm=c.norm,
                    layer_scale_init_value=c.layer_scale_init_value,
                    drop_path=drop_rates[block_index],
                ))
                block_index += 1
            stages.append(RoadmapStage(downsample, blocks))
            in_dim = out_dim
        self.stages = nn.Sequential(*stages)
        self.num_features = in_dim
        self.head = ClassifierHead(in_dim, num_classes, c.norm if separate else None, drop_rate)
        self.num_classes = num_classes
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"roadmap models only pool by average; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head.fc)


def _init_weights(module: nn.Module) -> None:
    # One initialisation (ConvNeXt's) for every step, so that the init is not what changes.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --- timm registration -----------------------------------------------------------------------

# timm reads `default_cfgs` of the registering module: preprocessing metadata, no weights.
default_cfgs = generate_default_cfgs({
    model_name(step): {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.0", "classifier": "head.fc",
    }
    for step in range(NUM_STEPS)
})


def _make_entrypoint(step: int):
    name = model_name(step)

    def entrypoint(
        pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
        device=None, dtype=None, **kwargs,
    ) -> RoadmapNet:
        if pretrained:
            raise ValueError(
                f"{name} has no pretrained weights of its own; build it with pretrained=False and load a "
                "state_dict (step 11 takes a timm convnext_tiny state_dict as it is)"
            )
        # device="meta" builds a weightless model, enough for counting parameters and FLOPs.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = RoadmapNet(STEPS[step], **kwargs)
        if dtype is not None:
            model = model.to(dtype)
        cfg = get_pretrained_cfg(name).to_dict()
        cfg.update(pretrained_cfg_overlay or {})
        cfg["num_classes"] = model.num_classes
        model.pretrained_cfg = model.default_cfg = cfg
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Roadmap step {step}: {STEP_TITLES[step]} (ConvNeXt paper, Figure 2)."
    return entrypoint


for _step in range(NUM_STEPS):
    with warnings.catch_warnings():
        # Re-importing (importlib.reload, notebooks) re-registers the same names: timm warns that it
        # overwrites them, which is exactly what we want, so that warning is expected and silenced.
        warnings.filterwarnings("ignore", message=f"Overwriting {model_name(_step)} in registry")
        globals()[model_name(_step)] = register_model(_make_entrypoint(_step))


def config_dict(step: int) -> dict:
    """The step's config as plain data (for tables, run dirs and docs)."""
    return asdict(STEPS[step])
