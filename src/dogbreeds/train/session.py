"""Everything one training run holds: data, model, optimizer, EMA, position; and how it saves.

Built in a fixed order so a resumed run is the same object as the one that was interrupted:
seed -> data -> model -> freeze -> optimizer/scheduler/EMA -> (resume state) -> per-rank RNG.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DogbreedsError
from ..rundir import RunDir
from .checkpoint import (load_resume_state, restore_rng_state, rng_states_of_all_ranks, save_resume_state,
                         write_metrics)
from .distributed import DistContext, ShardedSampler
from .optim import apply_freeze, build_optimizer, build_scheduler, resolve_freeze
from .recipe import Recipe, environment_versions, parse_freeze
from ..data.listing import shown_path


def cpu_bf16_support() -> str | None:
    """'amx' (AMX tiles: bf16 matmuls several times faster than fp32), 'avx512_bf16' (bf16 dot
    products only), or None (oneDNN would emulate bf16, slower than fp32)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32.

    'auto' picks bf16 on CUDA GPUs that support it and on CPUs with AMX. AVX512-BF16 alone gives
    fp32 here: on one such CPU (AMD EPYC, convnext_atto, batch 16 at 96 px) a training step took the
    same time in bf16 as in fp32, on another ConvNeXt-T at 224 px trained 2.55x as fast in bf16, so
    `train` times both there (train/precision_probe.py) and this rule is its fallback without a probe.
    'bf16' asks for it wherever the hardware has any native bf16.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        preferred = native = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        support = cpu_bf16_support()
        preferred, native = support == "amx", support is not None
    else:
        preferred = native = False
    if precision == "bf16":
        if not native:
            raise DogbreedsError(f"precision=bf16 on {device}: this device has no native bf16 "
                                 "(it would be emulated, slower than fp32); use --precision fp32 or auto")
        return torch.bfloat16
    return torch.bfloat16 if preferred else None


def fast_layout_kwargs(name: str) -> dict:
    """{"conv_mlp": True} for timm ConvNeXt models whose blocks use Linear MLPs by default
    (convnext_tiny and larger), else {}.

    The 1x1-convolution MLP holds the same weights, shaped (out, in, 1, 1); its convolutions run
    on oneDNN while the Linear layers' matrix products go through MKL, which is slow on AMD CPUs.
    Measured per training step (docs/training.md "Speed"): ConvNeXt-T 1.52x at 224 px, 1.16x at
    64 px. The small ConvNeXts (atto .. nano) already default to conv_mlp=True in timm, so they
    are left as timm builds them; other families (MobileNetV2, roadmap_step*) have no such switch.
    """
    import timm
    from timm.models.convnext import ConvNeXt

    from ..models.formats.arch import meta_model

    arch = name.split(".")[0]
    if not arch.startswith("convnext_") or not timm.is_model(arch):  # convnextv2 (GRN) is not measured
        return {}
    model = meta_model(arch)  # on the meta device: shapes only, no memory or init cost
    if not isinstance(model, ConvNeXt):
        return {}
    linear = any(not block.use_conv_mlp for block in model.modules() if hasattr(block, "use_conv_mlp"))
    return {"conv_mlp": True} if linear else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _yaml_keys(path: Path) -> set:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return set(data) if isinstance(data, dict) else set()


@torch.no_grad()
def evaluate(net, batches, device, autocast, channels_last: bool) -> dict:
    """Plain cross-entropy (no smoothing) and top-1 / top-5 accuracy over `batches`."""
    was_training = net.training
    net.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for inputs, labels in batches:
        inputs, labels = inputs.to(device), labels.to(device)
        if channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = net(inputs)
        logits = logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, logits.shape[-1])
        ranked = logits.topk(k, dim=-1).indices
        top1 += int((ranked[:, 0] == labels).sum())
        top5 += int((ranked == labels[:, None]).any(-1).sum())
        seen += len(labels)
    net.train(was_training)
    if not seen:  # loss 0 keeps metrics.jsonl valid JSON; "count" says there was nothing to measure
        return {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0}
    return {"loss": loss_sum / seen, "top1": top1 / seen, "top5": top5 / seen, "count": seen}


class Session:
    def __init__(self, recipe: Recipe, ctx: DistContext):
        self.recipe, self.ctx = recipe, ctx
        self.run = RunDir(recipe.out)
        self.run_dir = self.run.path
        self.progress = ctx.is_main and sys.stderr.isatty()
        self.epoch, self.micro_done, self.step = 0, 0, 0
        self.partial, self.best, self.history = None, None, []
        world = ctx.world_size * recipe.accum_steps
        if recipe.batch_size % world:
            raise DogbreedsError(f"--batch-size {recipe.batch_size} must be divisible by processes x accum-steps "
                                 f"= {ctx.world_size} x {recipe.accum_steps}")
        self.micro_batch = recipe.batch_size // world

        saved = self._saved_state()
        recipe = self.recipe  # _saved_state may keep an older run's model layout
        if recipe.deterministic:
            # cuBLAS needs this workspace setting for deterministic matmuls (read when it initialises).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not recipe.deterministic
        seed_everything(recipe.seed)  # same on every rank: identical initial weights

        from ..data.sources import load_dataset
        from ..models.factory import create_model, set_preprocessing

        self.dataset = load_dataset(recipe.data, breeds=recipe.breeds, seed=recipe.seed,
                                    val_fraction=recipe.val_fraction, test_fraction=recipe.test_fraction)
        self.classes = self.dataset.classes
        if len(self.classes) < 2:
            raise DataError(f"{recipe.data} with --breeds {recipe.breeds!r} gives {len(self.classes)} breed(s); "
                            "a classifier needs at least two")
        self.outliers, self.outlier_summary = [], None
        self.outlier_loader, self.outlier_cache = None, None
        if recipe.outlier_exposure:  # before the run files: split.json records them
            from .outliers import outlier_records

            self.outliers, self.outlier_summary = outlier_records(recipe, self.dataset)
        # always passed, 0.0 included: weights from a run carry that run's drop_path_rate, which would
        # otherwise train this run with it while its config.yaml says recipe.drop_path
        model_kwargs = {"drop_path_rate": recipe.drop_path}
        # precision: autocast_dtype's rule, or, on an AVX512-BF16 CPU without AMX, a probe (train/precision_probe.py;
        # not for a frozen backbone: its features are computed once, in fp32 as at prediction time)
        saved_config = self.run.config if saved is not None else None
        if recipe.freeze == "backbone":
            dtype, self.precision_record = autocast_dtype(recipe.precision, ctx.device), None
        else:
            from .precision_probe import precision_for_run

            dtype, self.precision_record = precision_for_run(recipe, ctx.device, saved_config, ctx.world_size)
        self.layout = None  # fast_layout: the MLP layout timed faster on this machine (train/layout_probe.py)
        if recipe.fast_layout:
            from .layout_probe import layout_for_run

            self.layout = layout_for_run(recipe, ctx.device, dtype, saved_config, ctx.world_size)
            model_kwargs.update(self.layout["model_kwargs"] if self.layout else {})
        self.model = create_model(recipe.model, num_classes=len(self.classes), weights=recipe.weights, **model_kwargs)
        self.preprocessing = self.model.preprocessing
        if recipe.input_size:
            self.preprocessing = self.preprocessing.with_input_size(recipe.input_size)
            set_preprocessing(self.model, self.preprocessing)  # the checkpoint must say the size it trained at
        self._shrink_new_head()
        self.freeze = resolve_freeze(self.model, recipe)  # 'auto' -> what this model and start need
        if ctx.is_main and recipe.freeze == "auto":
            print(f"freeze=auto: {self.freeze} ({'pretrained' if recipe.starts_pretrained else 'random'} weights)", flush=True)
        self.frozen = apply_freeze(self.model, self.freeze)
        self.model.to(ctx.device)
        self.channels_last = recipe.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.head_only = parse_freeze(self.freeze)[0] == "backbone"  # trains on cached fp32 features
        # bf16 training: depthwise convolutions in fp32 where that was timed faster (train/depthwise_probe.py)
        from .depthwise_probe import CHOICE, depthwise_for_run

        self.depthwise = None if self.head_only else depthwise_for_run(
            recipe, self.model, ctx.device, dtype, self.layout["model_kwargs"] if self.layout else {}, saved_config,
            ctx.world_size)
        fp32_depthwise = bool(self.depthwise and self.depthwise[CHOICE])
        if fp32_depthwise:
            from ..models.depthwise import keep_depthwise_fp32

            keep_depthwise_fp32(self.model)
        if dtype is None:
            self.autocast = contextlib.nullcontext
        else:
            self.autocast = lambda: torch.autocast(ctx.device.type, dtype=dtype)
        self.precision = ("bf16" if dtype else "fp32") + (", depthwise fp32" if fp32_depthwise else "")
        if ctx.is_main:
            self._write_run_files()

        if self.head_only:
            if self.outliers:
                raise DogbreedsError("outlier exposure trains the features; freeze=backbone keeps them fixed (and "
                                     "trains on cached features): drop --outlier-exposure or choose another --freeze")
            self._setup_features()
        else:
            self._setup_images(saved)
        self.trainable = [p for p in self.net_unwrapped.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.net_unwrapped, recipe, use_layer_decay=not self.head_only)
        self.scheduler = build_scheduler(self.optimizer, recipe, self.steps_per_epoch)
        self.ema = None
        if recipe.ema_decay and ctx.is_main:  # only rank 0 evaluates and saves, so only it keeps an EMA
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.net_unwrapped, decay=recipe.ema_decay, use_warmup=True)
        if saved is not None:
            self._restore(saved)
        else:
            seed_everything(recipe.seed * 1000 + ctx.rank + 1)  # ranks draw different drop_path / mixup
        if ctx.is_main:
            write_metrics(self.run.metrics_file, self.history)
            print(f"{'resuming' if saved else 'training'} {recipe.model} ({self.precision}, {ctx.device}, "
                  f"{ctx.world_size} process(es)) on {len(self.dataset.train)} train / {len(self.dataset.val)} val "
                  f"images, {len(self.classes)} breeds, {self.steps_per_epoch} steps/epoch"
                  + (f", outlier exposure: {len(self.outliers)} outlier photos ({len(self.outlier_summary['breeds'])} "
                     f"other breeds, {len(self.outlier_summary['photos'])} given), {self.oe_micro * self.ctx.world_size} "
                     f"per micro-batch, weight {recipe.oe_weight}" if self.outliers else "")
                  + (f", from epoch {self.epoch} step {self.step}" if saved else ""), flush=True)

    def _shrink_new_head(self) -> None:
        """Scale a head that create_model made new on pretrained weights by recipe.head_init_scale
        (timm ConvNeXt's `head_init_scale`, for every model). A resumed run loads its own head after."""
        scale, head = self.recipe.head_init_scale, self.model.get_classifier()
        if scale == 1 or not self.recipe.starts_pretrained or not getattr(self.model, "dogbreeds_new_head", False):
            return
        if isinstance(head, torch.nn.Linear):
            with torch.no_grad():
                head.weight.mul_(scale)
                if head.bias is not None:
                    head.bias.mul_(scale)

    # --- the two ways to feed the loop ---

    def _setup_images(self, saved: dict | None) -> None:
        from ..data.loaders import make_loader
        from ..data.transforms import build_eval_transform, build_mixup, build_train_transform, mix_batch

        recipe, ctx = self.recipe, self.ctx
        pin = ctx.device.type == "cuda"
        cache = self._image_cache(self.dataset.train + self.dataset.val, saved)
        self.sampler = ShardedSampler(len(self.dataset.train), ctx, recipe.seed)
        self.train_loader = make_loader(self.dataset.train, build_train_transform(self.preprocessing, recipe.augment),
                                        self.micro_batch, shuffle=False, seed=recipe.seed, workers=recipe.workers,
                                        drop_last=True, sampler=self.sampler, pin_memory=pin, cache=cache)
        self.val_loader = make_loader(self.dataset.val, build_eval_transform(self.preprocessing), self.micro_batch,
                                      shuffle=False, seed=recipe.seed, workers=recipe.workers, pin_memory=pin,
                                      cache=cache)
        self.mixup = build_mixup(recipe.augment, len(self.classes))
        self.mix = lambda images, labels: mix_batch(self.mixup, images, labels)
        if self.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.criterion = SoftTargetCrossEntropy()  # Mixup's soft targets already carry the smoothing
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.augment.label_smoothing)
        self.net_unwrapped = self.model
        self.net = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        self._set_steps(len(self.sampler) // self.micro_batch, f"{len(self.sampler)} training images per process")
        if self.outliers:
            self._setup_outliers(cache, saved, pin)

    def _setup_outliers(self, cache, saved: dict | None, pin: bool) -> None:
        """The outlier photos' loader (train/outliers.py): the breed photos' augmentation, its own
        seeded order, `oe_batch_size` photos per optimizer step. Photos of the data root read from the
        prepared cache when the breed photos are (and it holds them all), the --outliers files decoded."""
        from ..data.loaders import make_loader
        from ..data.transforms import build_train_transform
        from .outliers import SEED_SALT, OutlierSampler, PartialCache

        recipe, ctx = self.recipe, self.ctx
        world = ctx.world_size * recipe.accum_steps
        if recipe.oe_batch_size % world:
            raise DogbreedsError(f"--oe-batch-size {recipe.oe_batch_size} must be divisible by processes x accum-steps "
                                 f"= {ctx.world_size} x {recipe.accum_steps}")
        self.oe_micro = recipe.oe_batch_size // world
        from_root = [r.path for r in self.outliers if r.breed_id != "outlier_photo"]
        used_before = saved.get("outlier_image_cache", "unknown") if saved is not None else "unknown"
        outlier_cache = None
        if cache is not None and from_root and used_before in ("unknown", str(cache.directory)):
            if all(cache.is_fresh(path) for path in from_root):
                outlier_cache = PartialCache(cache, from_root)
                if ctx.is_main:
                    print(f"outliers: {len(from_root)} photos of other breeds from the prepared cache {shown_path(cache.directory)}, "
                          f"{len(self.outliers) - len(from_root)} given photos decoded from files", flush=True)
            elif ctx.is_main:
                print(f"outliers: decoding the other breeds' photos from files ({shown_path(cache.directory)} does not hold "
                      "them all)", flush=True)
        self.outlier_cache = None if outlier_cache is None else str(cache.directory)
        self.oe_sampler = OutlierSampler(len(self.outliers), self.oe_micro, self.steps_per_epoch * recipe.accum_steps,
                                         recipe.seed, ctx.rank)
        self.outlier_loader = make_loader(self.outliers, build_train_transform(self.preprocessing, recipe.augment),
                                          self.oe_micro, shuffle=False, seed=recipe.seed + SEED_SALT,
                                          workers=recipe.workers // 2, sampler=self.oe_sampler, pin_memory=pin,
                                          cache=outlier_cache)

    def _setup_features(self) -> None:
        from ..data.transforms import BoxCropped, build_eval_transform
        from .features import FeatureBatches, cached_features, extract_features, feature_cache_key

        recipe, ctx = self.recipe, self.ctx
        if ctx.distributed:
            raise DogbreedsError("freeze=backbone trains only the head on cached features, in seconds: "
                                 "run it as one process (without torchrun)")
        box_crop = recipe.augment.crop_to_box
        if ctx.is_main:
            print("freeze=backbone: features come from the eval transform, computed once; augmentation, "
                  "mixup/cutmix, drop_path and layer decay do not apply (label smoothing does"
                  + (f"; so does crop_to_box={box_crop}: train photos cut to their dogs, val photos whole)"
                     if box_crop else ")"), flush=True)
        splits = {"train": self.dataset.train, "val": self.dataset.val}
        preprocessing = self.preprocessing.to_dict()
        if box_crop:  # other features: another key (runs without the crop keep theirs)
            preprocessing["train_crop_to_box"] = [box_crop, recipe.augment.box_margin]
        key = feature_cache_key(recipe.model, recipe.weights, preprocessing, splits)
        transform = build_eval_transform(self.preprocessing)
        transforms = {"train": BoxCropped(transform, box_crop, recipe.augment.box_margin) if box_crop else transform,
                      "val": transform}

        def compute() -> dict:
            # The eval transform reads a prepared cache's rows as they are: the same pixels, so the
            # same features, whether or not it is used (the feature key need not know). A box crop
            # is cut from the photo itself (a cached row is a smaller copy).
            cache = self._image_cache(self.dataset.train + self.dataset.val, None)
            out = {}
            for name, records in splits.items():
                x, y, skipped = extract_features(self.model, records, transforms[name], self.micro_batch,
                                                 recipe.workers, recipe.seed, ctx.device, self.autocast,
                                                 self.channels_last, self.progress,
                                                 cache=None if box_crop and name == "train" else cache)
                out.update({f"{name}_x": x, f"{name}_y": y, f"{name}_skipped": skipped})
            return out

        self.image_cache = None
        self.features = cached_features(self.run.features_dir, key, compute)
        self.train_features = FeatureBatches(self.features["train_x"], self.features["train_y"], self.micro_batch,
                                             recipe.seed, shuffle=True)
        self.val_features = FeatureBatches(self.features["val_x"], self.features["val_y"], self.micro_batch,
                                           recipe.seed, shuffle=False)
        self.mixup = None
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.augment.label_smoothing)
        self.net = self.net_unwrapped = self.model.get_classifier()
        self._set_steps(len(self.train_features), f"{len(self.features['train_y'])} training images")

    def _set_steps(self, micro_batches: int, what: str) -> None:
        self.steps_per_epoch = micro_batches // self.recipe.accum_steps
        if self.steps_per_epoch < 1:
            raise DataError(f"{what} do not fill one optimizer step of --batch-size {self.recipe.batch_size}: "
                            "lower --batch-size (or add images)")

    def train_batches(self, epoch: int, start: int):
        """(inputs, labels, outlier inputs or None) micro-batches of `epoch`, from micro-batch `start` on."""
        if self.head_only:
            for inputs, labels in self.train_features.batches(epoch, start):
                yield inputs, labels, None
            return
        self.train_loader.set_epoch(epoch)
        self.sampler.start = start * self.micro_batch
        if self.outlier_loader is None:
            for batch in self.train_loader:
                yield batch.images, batch.labels, None
            return
        self.outlier_loader.set_epoch(epoch)
        self.oe_sampler.start = start
        outlier_batches = iter(self.outlier_loader)
        for batch in self.train_loader:
            extra = next(outlier_batches, None)
            yield batch.images, batch.labels, None if extra is None else extra.images

    def outlier_skipped(self) -> list[dict]:
        """The outlier files of this epoch that could not be decoded."""
        if self.outlier_loader is None:
            return []
        return [{"path": s.path, "reason": s.reason} for s in self.outlier_loader.skipped]

    def epoch_skipped(self) -> list[dict]:
        if self.head_only:
            return list(self.features["train_skipped"])
        return [{"path": s.path, "reason": s.reason} for s in self.train_loader.skipped]

    def val_skipped(self) -> list[dict]:
        """The validation files the last `evaluate` could not decode (path and reason)."""
        if self.head_only:
            return list(self.features.get("val_skipped", []))
        return [{"path": s.path, "reason": s.reason} for s in self.val_loader.skipped]

    def gather_skipped(self, skipped: list[dict]) -> list[dict]:
        if not self.ctx.distributed:
            return skipped
        import torch.distributed as dist

        everyone = [None] * self.ctx.world_size
        dist.all_gather_object(everyone, skipped)
        return sorted({item["path"]: item for part in everyone for item in part}.values(), key=lambda i: i["path"])

    def evaluate(self, net) -> dict:
        if self.head_only:
            batches = self.val_features.batches(0)
        else:
            batches = ((b.images, b.labels) for b in self.val_loader)
        return evaluate(net, batches, self.ctx.device, self.autocast, self.channels_last)

    def _image_cache(self, records: list, saved: dict | None):
        """The prepared cache of `dogbreeds data prepare` for this data and input size, when it holds
        every record unchanged; logged either way. A resumed run keeps the choice it started with:
        cached rows are resized copies, so random crops of them differ from crops of the photos."""
        from ..data.cache import find_prepared_cache

        cache, message = find_prepared_cache(self.dataset.root, self.preprocessing, records)
        used_before = saved.get("image_cache") if saved is not None else None
        if saved is not None and used_before is None and cache is not None:
            message = (f"decoding images from files as before the stop, although {shown_path(cache.directory)} is there now: "
                       "the resumed run stays the same as an unbroken one")
            cache = None
        elif used_before is not None and cache is None:
            message += (f"; note: the run started with the prepared cache {used_before}, so the result will "
                        "differ slightly from an unbroken run")
        self.image_cache = None if cache is None else str(cache.directory)
        if self.ctx.is_main and message:
            print(message, flush=True)
        return cache

    # --- saving and resuming ---

    def _write_run_files(self) -> None:
        run = self.run
        run.path.mkdir(parents=True, exist_ok=True)
        extra = {"versions": environment_versions(), "world_size": self.ctx.world_size}
        from . import depthwise_probe, layout_probe, precision_probe

        for key, record in ((layout_probe.CONFIG_KEY, self.layout), (precision_probe.CONFIG_KEY, self.precision_record),
                            (depthwise_probe.CONFIG_KEY, self.depthwise)):
            if record is not None:
                extra[key] = layout_probe.config_record(record)
        run.write_text(run.config, self.recipe.to_yaml(extra))
        run.write_json(run.classes_file, self.classes.to_json(), indent=2)
        summary = self.dataset.split_summary()
        if self.outlier_summary is not None:
            from .outliers import SPLIT_KEY

            summary[SPLIT_KEY] = self.outlier_summary  # calibration and measure_trust.py follow this record
        run.write_json(run.split_file, summary, indent=1)

    def _saved_state(self) -> dict | None:
        path = self.run.resume_file
        if not path.is_file():
            return None
        config = self.run.config
        if not config.is_file():
            raise DogbreedsError(f"{path} exists but {config} is missing: the run cannot be checked; "
                                 "use a new --out, or delete the checkpoints folder to start over")
        saved_recipe = Recipe.from_yaml(config)
        if "fast_layout" not in _yaml_keys(config):
            # The run started before fast_layout existed, with timm's default (Linear) MLPs: its
            # resume.pt holds 2-D MLP weights and optimizer moments. Keep that layout, so the
            # resumed run is the same network and stays bit-identical to an unbroken one.
            saved_recipe = replace(saved_recipe, fast_layout=False)
            if self.recipe.fast_layout:
                print(f"note: {config} predates the fast_layout setting: resuming with fast_layout=False "
                      "(the layout the run started with)", file=sys.stderr)
                self.recipe = replace(self.recipe, fast_layout=False)
        mismatches = self.recipe.resume_mismatches(saved_recipe)
        if mismatches:
            raise DogbreedsError(
                f"{self.run_dir} holds a run with a different recipe, so it cannot be resumed:\n  "
                + "\n  ".join(mismatches)
                + f"\nResume it with its own settings (--config {config}), or train into a new --out")
        state = load_resume_state(path)
        if self.ctx.is_main:  # temporary files of writes that a kill cut short
            for leftover in self.run.checkpoints.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.micro_done, self.step = state["epoch"], state["micro_done"], state["step"]
        self.partial, self.best, self.history = state["partial"], state["best"], list(state["history"])
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            print(f"note: the run was saved by {len(rng)} process(es), now {self.ctx.world_size}: random "
                  "streams restart from the seed (the result will differ slightly from an unbroken run)",
                  file=sys.stderr)
            seed_everything(self.recipe.seed * 1000 + self.ctx.rank + 1 + 7919 * self.step)

    def save_checkpoint(self, epoch: int, partial: dict | None) -> None:
        """resume.pt (all ranks take part: RNG states are gathered). With `partial`, a mid-epoch
        stop: last.safetensors gets the current weights too."""
        rng = rng_states_of_all_ranks(self.ctx)
        if not self.ctx.is_main:
            return
        if partial is not None:
            self.save_model("last", "raw", epoch, completed=False)
        state = {
            "epoch": epoch, "micro_done": self.micro_done if partial is not None else 0, "step": self.step,
            "partial": partial, "world_size": self.ctx.world_size,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": rng, "best": self.best, "history": self.history,
            "image_cache": self.image_cache,  # the prepared cache the images came from (None: the files)
            "outlier_image_cache": self.outlier_cache,  # the same for the outliers' root photos
        }
        save_resume_state(self.run.resume_file, state)

    def export_model(self, source: str) -> torch.nn.Module:
        """The full network with the raw or the EMA weights, ready for save_model_checkpoint."""
        if source == "raw" or self.ema is None:
            return self.model
        if not self.head_only:
            return self.ema.module
        model = copy.deepcopy(self.model)
        model.get_classifier().load_state_dict(self.ema.module.state_dict())
        return model

    def save_model(self, kind: str, source: str, epoch: int, completed: bool = True) -> None:
        """checkpoints/<kind>.safetensors (+ .json sidecar); `extra` says which weights and when."""
        from ..models.checkpoint_format import save_model_checkpoint

        extra = {"epoch": epoch, "epoch_completed": completed, "step": self.step, "weights": source,
                 "recipe": self.recipe.to_dict()}
        save_model_checkpoint(self.export_model(source), self.run.checkpoint_path(kind), self.classes, extra)
