"""Train every roadmap step on dogs under one recipe and one split: the paper's Figure 2, on dogs.

Each step gets its own run directory (OUT/step00 ... OUT/step11) written by the project's
`train(recipe)`, then its best checkpoint is scored on the test split (`evaluate_run`). Running
the same command again skips finished steps and resumes an interrupted one, so a long sweep can
be done in pieces. The summary is OUT/roadmap.md, OUT/roadmap.json and OUT/roadmap.png.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DogbreedsError
from ..rundir import RunDir
from .models import NUM_STEPS, STEP_TITLES, model_name
from .table import PAPER_FIGURE2


@dataclass(frozen=True)
class RoadmapTraining:
    """The one recipe every step trains under. Defaults fit a CPU: small images, from scratch."""

    data: str
    out: str = "runs/roadmap"
    steps: tuple[int, ...] = tuple(range(NUM_STEPS))
    input_size: int = 64  # the paper trains at 224; 64 keeps a CPU sweep in minutes, not hours
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # AdamW from scratch (fine-tuning uses ~10x less)
    weight_decay: float = 0.05
    breeds: str = "top20"
    seed: int = 0  # the same seed gives every step the same split, init stream and batch order
    workers: int = 2
    device: str = "auto"
    augment: str = "quick"  # crops and flips: RandAugment/mixup hurt a few-epoch run from scratch
    extra: dict = field(default_factory=dict)  # any other Recipe field, the same for every step

    def validate(self) -> None:
        bad = [s for s in self.steps if not 0 <= s < NUM_STEPS]
        if bad:
            raise DogbreedsError(f"roadmap steps {bad} do not exist; steps are 0 to {NUM_STEPS - 1} (e.g. --steps 0,3,11)")
        if not self.steps:
            raise DogbreedsError("no roadmap steps chosen; give e.g. --steps 0,3,11 or leave --steps out for all")

    def run_dir(self, step: int) -> Path:
        return Path(self.out).expanduser() / f"step{step:02d}"

    def recipe(self, step: int):
        from ..data.transforms import AugmentConfig
        from ..train.recipe import Recipe

        return Recipe(
            model=model_name(step), weights=None, drop_path=0.0, input_size=self.input_size,
            data=str(self.data), breeds=self.breeds, seed=self.seed,
            augment=AugmentConfig.preset(self.augment), workers=self.workers,
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, min_lr=self.lr / 100,
            weight_decay=self.weight_decay,
            warmup_epochs=min(1.0, self.epochs / 5),  # a 1-epoch run must not spend it all warming up
            layer_decay=None,  # layer-wise decay protects pretrained layers; there are none here
            ema_decay=None,  # an EMA needs far more steps than a short sweep takes
            device=self.device, out=str(self.run_dir(step)),
        ).with_overrides(**self.extra)


def parse_steps(text: str | None) -> tuple[int, ...]:
    """'0,3,11' or '0-4,11' -> (0, 3, 11) / (0, 1, 2, 3, 4, 11); None -> every step."""
    if not text:
        return tuple(range(NUM_STEPS))
    steps: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                steps.extend(range(low, high + 1))
            elif part:
                steps.append(int(part))
    except ValueError:
        raise DogbreedsError(f"--steps {text!r} is not a list of step numbers; write e.g. 0,3,11 or 0-4,11") from None
    return tuple(sorted(set(steps)))


def _is_finished(plan: RoadmapTraining, step: int) -> bool:
    """True when the step's run is complete under this very recipe and tested; an error when it used another."""
    run = RunDir(plan.run_dir(step))
    return run.is_finished(plan.recipe(step), strict=True) and run.eval_file("test").is_file()


def train_roadmap(plan: RoadmapTraining, log=print) -> list[dict]:
    """Train and test each chosen step (skipping finished ones); write the summary; return its rows."""
    from ..evaluate.report import evaluate_run
    from ..train.loop import train

    plan.validate()
    Path(plan.out).expanduser().mkdir(parents=True, exist_ok=True)
    for step in plan.steps:
        run_dir = plan.run_dir(step)
        if _is_finished(plan, step):
            log(f"step {step} ({STEP_TITLES[step]}): finished earlier in {run_dir}, skipped")
            continue
        log(f"step {step} ({STEP_TITLES[step]}): training {model_name(step)} into {run_dir}")
        train(plan.recipe(step))
        result = evaluate_run(run_dir, plan.data, split="test", log=log)
        log(f"step {step}: test top-1 {100 * result['top1']:.1f}% on {result['n_images']} images")
    rows = collect_results(plan)
    write_summary(plan, rows)
    return rows


def collect_results(plan: RoadmapTraining) -> list[dict]:
    """One row per chosen step that has a tested run: dogs accuracy beside the paper's numbers."""
    rows = []
    for step in plan.steps:
        run_dir = plan.run_dir(step)
        run = RunDir(run_dir)
        test = run.read_eval("test")
        if test is None:
            continue
        metrics = run.read_metrics()
        gflops, imagenet_top1 = PAPER_FIGURE2[step]
        rows.append({
            "step": step,
            "title": STEP_TITLES[step],
            "model": model_name(step),
            "dogs_test_top1": round(100 * test["top1"], 2),
            "dogs_test_top5": round(100 * test["top5"], 2),
            "dogs_best_val_top1": round(100 * max((m["val_top1"] for m in metrics), default=0.0), 2),
            "test_images": test["n_images"],
            "num_classes": len(test["classes"]),
            "epochs": len(metrics),
            "train_minutes": round(sum(m.get("epoch_time", 0.0) for m in metrics) / 60, 2),
            "paper_gflops": gflops,
            "paper_imagenet_top1": imagenet_top1,
            "run_dir": str(run_dir),
        })
    return rows


def format_results(rows: list[dict], plan: RoadmapTraining) -> str:
    chance = 100 / rows[0]["num_classes"] if rows else float("nan")
    lines = [
        f"Dogs: {plan.breeds} breeds, {plan.input_size}x{plan.input_size} px, {plan.epochs} epoch(s) from scratch, "
        f"batch {plan.batch_size}, AdamW lr {plan.lr:g}, '{plan.augment}' augmentation, seed {plan.seed}; "
        f"chance is {chance:.1f}%.",
        "",
        "| step | change | dogs test top-1 (%) | dogs best val top-1 (%) | train min | paper ImageNet top-1 (%) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['step']} | {r['title']} | {r['dogs_test_top1']:.1f} | {r['dogs_best_val_top1']:.1f} "
                     f"| {r['train_minutes']:.1f} | {r['paper_imagenet_top1']:.1f} |")
    return "\n".join(lines)


def write_summary(plan: RoadmapTraining, rows: list[dict]) -> None:
    out = Path(plan.out).expanduser()
    (out / "roadmap.json").write_text(json.dumps({"plan": asdict(plan), "rows": rows}, indent=2) + "\n")
    (out / "roadmap.md").write_text(format_results(rows, plan) + "\n")
    if rows:
        plot_roadmap(rows, out / "roadmap.png",
                     subtitle=f"dogs: {plan.breeds}, {plan.input_size}px, {plan.epochs} epoch(s) from scratch")


def plot_roadmap(rows: list[dict], path: str | Path, subtitle: str = "") -> Path:
    """Two panels over the same steps: dogs test top-1 (ours) above, ImageNet top-1 (paper) below."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    all_steps = list(range(NUM_STEPS))
    fig, (ax_dogs, ax_imagenet) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                               gridspec_kw={"height_ratios": [1, 1]})
    steps = [r["step"] for r in rows]
    dogs = [r["dogs_test_top1"] for r in rows]
    # Error bars: one binomial standard error of the test accuracy, so noise is not read as a trend.
    errors = [100 * math.sqrt(max(d / 100 * (1 - d / 100), 1e-12) / r["test_images"]) if r.get("test_images") else 0.0
              for d, r in zip(dogs, rows)]
    ax_dogs.errorbar(steps, dogs, yerr=errors, fmt="o", color="tab:blue", capsize=3,
                     label="dogs test top-1 (this project), ±1 standard error")
    for (s0, d0), (s1, d1) in zip(zip(steps, dogs), zip(steps[1:], dogs[1:])):
        if s1 == s0 + 1:  # join neighbours only: a line over untrained steps would invent values
            ax_dogs.plot([s0, s1], [d0, d1], color="tab:blue")
    for s, value in zip(steps, dogs):
        ax_dogs.annotate(f"{value:.1f}", (s, value), textcoords="offset points", xytext=(7, -3), ha="left", fontsize=8)
    chance = 100 / rows[0]["num_classes"]
    ax_dogs.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0f}%)")
    ax_dogs.set_ylabel("dogs top-1 (%)")
    ax_dogs.set_ylim(0, max(max(dogs) + max(errors) + 5, 2 * chance))
    ax_dogs.set_title(f"ResNet-50 -> ConvNeXt-T, step by step ({subtitle})", fontsize=10)
    ax_dogs.legend(loc="upper left", fontsize=8)
    ax_dogs.grid(alpha=0.3)

    imagenet = [PAPER_FIGURE2[s][1] for s in all_steps]
    ax_imagenet.plot(all_steps, imagenet, "s-", color="tab:orange", label="ImageNet-1K top-1 (paper, Figure 2)")
    for s, value in zip(all_steps, imagenet):
        ax_imagenet.annotate(f"{value:.1f}", (s, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax_imagenet.set_ylabel("ImageNet top-1 (%)")
    ax_imagenet.set_ylim(min(imagenet) - 0.7, max(imagenet) + 0.7)
    ax_imagenet.legend(loc="upper left", fontsize=8)
    ax_imagenet.grid(alpha=0.3)
    ax_imagenet.set_xticks(all_steps)
    ax_imagenet.set_xticklabels([f"{s}: {STEP_TITLES[s]}" for s in all_steps], rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
