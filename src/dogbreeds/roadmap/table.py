"""Each roadmap step's size and cost, measured, beside what the ConvNeXt paper reports.

Models are built on the meta device (shapes only, no memory, no arithmetic) and their
multiply-accumulates counted with torch's FlopCounterMode (`dogbreeds.models.flops`).
"""
from __future__ import annotations

from dataclasses import dataclass

# Liu et al., "A ConvNet for the 2020s", CVPR 2022, Figure 2 (ResNet-50 / Swin-T regime) and
# Sec. 2.1-2.6: GFLOPs and ImageNet-1K top-1 (%) after each step, all trained with the same
# modern recipe (300 epochs, AdamW, Mixup/CutMix, RandAugment, ...). Step 0 is ResNet-50 under
# that recipe (76.1 % with the original 90-epoch recipe). The paper's "FLOPs" are fvcore counts,
# which are multiply-accumulates: compare them with our GMACs, not with 2 x GMACs.
# Step 3 combines two of the figure's bars: depthwise conv alone (2.4 GFLOPs; about 78.3 %, as read
# off the figure, not checked against the text) and
# then width 64 -> 96 (5.3 GFLOPs, 80.5 %); the row holds the latter.
PAPER_FIGURE2: tuple[tuple[float, float], ...] = (
    # (GFLOPs, ImageNet-1K top-1 %)
    (4.1, 78.8),  # 0  ResNet-50
    (4.5, 79.4),  # 1  stage ratio
    (4.4, 79.5),  # 2  patchify stem
    (5.3, 80.5),  # 3  depthwise conv + width 96
    (4.6, 80.6),  # 4  inverted bottleneck
    (4.1, 79.9),  # 5  move the depthwise conv up
    (4.2, 80.6),  # 6  kernel 7x7
    (4.2, 80.6),  # 7  ReLU -> GELU
    (4.2, 81.3),  # 8  fewer activations
    (4.2, 81.4),  # 9  fewer norms
    (4.2, 81.5),  # 10 BN -> LN
    (4.5, 82.0),  # 11 separate downsampling = ConvNeXt-T
)

# How far our GMACs may sit from the paper's GFLOPs before the table flags a step: the paper
# prints one decimal, and fvcore also counts a little besides convs and matmuls.
GMACS_TOLERANCE = 0.3


@dataclass(frozen=True)
class RoadmapRow:
    step: int
    title: str
    model: str
    params_m: float
    gmacs: float
    input_size: int
    paper_gflops: float
    paper_imagenet_top1: float

    @property
    def gmacs_match(self) -> bool | None:
        """Within tolerance of the paper (only meaningful at the paper's 224x224 input)."""
        if self.input_size != 224:
            return None
        return abs(self.gmacs - self.paper_gflops) <= GMACS_TOLERANCE

    def to_dict(self) -> dict:
        return {
            "step": self.step, "title": self.title, "model": self.model,
            "params_m": round(self.params_m, 3), "gmacs": round(self.gmacs, 3), "input_size": self.input_size,
            "paper_gflops": self.paper_gflops, "paper_imagenet_top1": self.paper_imagenet_top1,
            "gmacs_match": self.gmacs_match,
        }


def measure_step(step: int, input_size: int = 224) -> RoadmapRow:
    from ..models.flops import count_gmacs, count_params_m, meta_model
    from .models import STEP_TITLES, model_name

    model = meta_model(model_name(step))  # 1000 classes, as in the paper
    gflops, top1 = PAPER_FIGURE2[step]
    return RoadmapRow(step, STEP_TITLES[step], model_name(step), count_params_m(model),
                      count_gmacs(model, input_size), input_size, gflops, top1)


def roadmap_rows(steps=None, input_size: int = 224) -> list[RoadmapRow]:
    from .models import NUM_STEPS

    return [measure_step(step, input_size) for step in (range(NUM_STEPS) if steps is None else steps)]


def format_table(rows: list[RoadmapRow]) -> str:
    """A markdown table (readable in a terminal too)."""
    size = rows[0].input_size if rows else 224
    lines = [
        f"| step | change | params (M) | GMACs @{size} | paper GFLOPs @224 | paper ImageNet top-1 (%) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r.gmacs_match in (None, True) else " (off)"
        lines.append(f"| {r.step} | {r.title} | {r.params_m:.1f} | {r.gmacs:.2f}{flag} | {r.paper_gflops:.1f} "
                     f"| {r.paper_imagenet_top1:.1f} |")
    return "\n".join(lines)
