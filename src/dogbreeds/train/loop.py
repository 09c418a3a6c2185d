"""`train(recipe) -> run dir`: data, model, optimizer, epochs, checkpoints, resume.

The epoch loop is shared by the two ways of training: the whole (or partly frozen) network
on images, and the head alone on cached backbone features (freeze='backbone'). `session.py`
builds the pieces (and knows nothing of this module); this module runs them.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.loaders import capped_skipped, skipped_report
from ..errors import DogbreedsError
from .checkpoint import append_metrics
from .distributed import all_reduce_sum, barrier, init_distributed, shutdown_distributed
from .optim import current_lr, set_train_mode
from .recipe import Recipe
from .session import Session, evaluate  # noqa: F401  (evaluate: the validation pass, importable from here too)


class TrainingDiverged(DogbreedsError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving its state; rerunning resumes it.

    A KeyboardInterrupt, so code that handles Ctrl-C handles this too; `signum` is the signal
    (the `dogbreeds train` command exits with 128 + signum: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class TrainHooks:
    """Test seams. on_micro_batch(epoch, index, inputs) may return changed inputs (poison a batch)
    or raise (simulate running out of memory)."""

    on_micro_batch: Callable | None = None


def train(recipe: Recipe, hooks: TrainHooks | None = None) -> Path:
    """Train by `recipe`; return the run directory. Resumes when the run dir holds resume.pt."""
    ctx = init_distributed(recipe.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        session = Session(recipe, ctx)
        with _stop_on_signals() as stop:
            _run(session, stop, hooks or TrainHooks())
        return session.run_dir
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        micro = recipe.batch_size // (ctx.world_size * recipe.accum_steps)
        raise DogbreedsError(
            f"ran out of memory on {ctx.device} with micro-batches of {micro} images "
            f"(--batch-size {recipe.batch_size} / {ctx.world_size} process(es) / --accum-steps {recipe.accum_steps}): "
            f"lower --batch-size, or raise --accum-steps to keep the same effective batch with smaller "
            f"micro-batches (e.g. --accum-steps {recipe.accum_steps * 2}), or lower --input-size. ({str(exc).splitlines()[0]})"
        ) from None
    finally:
        torch.use_deterministic_algorithms(was_deterministic)  # a process-wide switch: leave it as found
        shutdown_distributed(ctx)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "DefaultCPUAllocator: can't allocate" in text


class _StopFlag:
    requested = False
    signum = signal.SIGINT


@contextlib.contextmanager
def _stop_on_signals():
    """First Ctrl-C or SIGTERM (what Kubernetes, SLURM and preemptible machines send) asks the
    loop to save and stop at the next optimizer step, or right after the epoch being finished;
    a second Ctrl-C stops at once (the last per-epoch checkpoint still holds). The loader's
    worker processes ignore both signals (data/loaders.py): the training process decides."""
    stop = _StopFlag()

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested, stop.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next step "
              "(Ctrl-C again to quit without it)", file=sys.stderr, flush=True)

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class EpochStats:
    """Running sums of one epoch; saved with a mid-epoch checkpoint so a resumed epoch reports whole."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    skipped: list = field(default_factory=list)
    oe_loss_sum: float = 0.0     # outlier exposure: sum over outlier photos of their CE to uniform
    outliers_seen: int = 0
    outlier_skipped: list = field(default_factory=list)

    def to_state(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": self.seconds, "skipped": list(self.skipped), "oe_loss_sum": self.oe_loss_sum,
                "outliers_seen": self.outliers_seen, "outlier_skipped": list(self.outlier_skipped)}


def _run(s: Session, stop: _StopFlag, hooks: TrainHooks) -> None:
    recipe, ctx = s.recipe, s.ctx
    stats = EpochStats(**s.partial) if s.partial else EpochStats()
    for epoch in range(s.epoch, recipe.epochs):
        started = time.perf_counter()
        completed = _train_epoch(s, epoch, stats, stop, hooks)
        stats.seconds += time.perf_counter() - started
        if not completed:  # stop requested: checkpoint mid-epoch and leave
            s.save_checkpoint(epoch, stats.to_state())
            _stopped(s, stop, f"epoch {epoch} step {s.step}")
        _finish_epoch(s, epoch, stats)
        stats = EpochStats()
        # A signal during validation or saving: the epoch's checkpoint is on disk, so stop now
        # rather than one step into the next epoch (a preempted machine has seconds, not minutes).
        if epoch + 1 < recipe.epochs and _stop_votes(stop, ctx):
            _stopped(s, stop, f"the end of epoch {epoch}")
    if ctx.is_main:
        best = s.best
        print(f"done: {s.run_dir} (best val top-1 {best['val_top1']:.4f} at epoch {best['epoch']}, "
              f"{best['weights']} weights)" if best else f"done: {s.run_dir}", flush=True)
        if recipe.calibrate:
            from ..trust.cli import calibrate_after_training  # thresholds, temperature, breed sets

            calibrate_after_training(s.run_dir, recipe.data, progress=s.progress)


def _stop_votes(stop: _StopFlag, ctx) -> float:
    """How many processes were asked to stop (all of them take part, so all agree)."""
    return all_reduce_sum(torch.tensor([float(stop.requested)], device=ctx.device), ctx).item()


def _stopped(s: Session, stop: _StopFlag, where: str):
    barrier(s.ctx)
    if s.ctx.is_main:
        print(f"stopped at {where}; checkpoint saved in {s.run.checkpoints}. "
              "Run the same command again to resume.", file=sys.stderr, flush=True)
    raise TrainingStopped(stop.signum)


def _train_epoch(s: Session, epoch: int, stats: EpochStats, stop: _StopFlag, hooks: TrainHooks) -> bool:
    """One epoch from s.micro_done on. False when a stop was requested (state is at a step boundary)."""
    from tqdm import tqdm

    recipe, ctx = s.recipe, s.ctx
    set_train_mode(s.net_unwrapped, s.frozen)
    accum = recipe.accum_steps
    total_micro = s.steps_per_epoch * accum
    batches = s.train_batches(epoch, start=s.micro_done)
    bar = tqdm(total=total_micro, initial=s.micro_done, desc=f"epoch {epoch}", disable=not s.progress,
               leave=False, dynamic_ncols=True)
    group_loss = torch.zeros((), device=ctx.device)
    group_bad = torch.zeros((), device=ctx.device)
    group_correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    group_oe = torch.zeros((), device=ctx.device)
    group_outliers = 0
    in_group = 0
    tick = time.perf_counter()
    try:
        for inputs, labels, outliers in batches:
            if s.micro_done >= total_micro:
                break  # the images left over after the last full optimizer step
            if hooks.on_micro_batch is not None:
                inputs = hooks.on_micro_batch(epoch, s.micro_done, inputs)
            inputs, labels = inputs.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            targets = labels
            if s.mixup is not None:
                inputs, targets = s.mix(inputs, labels)
                labels = labels[: len(inputs)]
            n_in, n_out = len(inputs), 0
            if outliers is not None and len(outliers):
                # one forward over breed photos + outliers (as Hendrycks et al.): BatchNorm sees both,
                # and DDP sees one forward per backward
                n_out = len(outliers)
                inputs = torch.cat([inputs, outliers.to(ctx.device, non_blocking=True).to(inputs.dtype)])
            if s.channels_last and inputs.ndim == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            in_group += 1
            sync = in_group == accum
            # Under DDP, gradients are averaged across processes only on the last micro-batch of a step.
            no_sync = s.net.no_sync() if ctx.distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with s.autocast():
                    logits = s.net(inputs)
                    if n_out:
                        logits, outlier_logits = logits[:n_in], logits[n_in:]
                    loss = s.criterion(logits, targets)
                    total = loss
                    if n_out:
                        from .outliers import oe_loss

                        outlier_loss = oe_loss(outlier_logits)
                        total = loss + recipe.oe_weight * outlier_loss
                (total / accum).backward()
            loss = loss.detach().float()
            group_bad += ~torch.isfinite(total.detach().float())
            group_loss += loss * len(labels)
            if n_out:
                group_oe += outlier_loss.detach().float() * n_out
                group_outliers += n_out
            group_correct += (logits.detach().argmax(-1) == labels).sum()
            stats.seen += len(labels)
            s.micro_done += 1
            bar.update(1)
            if not sync:
                continue
            in_group = 0
            # One small all-reduce per step: a NaN/inf flag and a stop request, so all processes
            # agree on whether to go on (one rank stopping alone would hang the others).
            flags = all_reduce_sum(torch.stack([group_bad, torch.tensor(float(stop.requested), device=ctx.device)]), ctx)
            bad, stop_votes = flags.tolist()
            if bad:
                _diverged(s, epoch, "loss")
            group_loss_sum = group_loss.item()
            stats.loss_sum += group_loss_sum
            stats.correct += int(group_correct)
            group_oe_sum = group_oe.item()
            stats.oe_loss_sum += group_oe_sum
            stats.outliers_seen += group_outliers
            group_loss.zero_(), group_bad.zero_(), group_correct.zero_(), group_oe.zero_()
            if recipe.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(s.trainable, recipe.grad_clip)
                if not torch.isfinite(norm):  # a finite loss can still give inf gradients
                    _diverged(s, epoch, "gradient norm")
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            s.step += 1
            s.scheduler.step_update(num_updates=s.step)
            if s.ema is not None:
                s.ema.update(s.net_unwrapped, step=s.step)
            now = time.perf_counter()
            postfix = dict(loss=f"{group_loss_sum / max(1, len(labels) * accum):.3f}",
                           acc=f"{stats.correct / max(1, stats.seen):.3f}")
            if group_outliers:  # outlier photos are counted as images processed too
                postfix["oe"] = f"{group_oe_sum / group_outliers:.3f}"
            postfix["img_s"] = f"{(len(labels) * accum + group_outliers) * ctx.world_size / max(1e-9, now - tick):.1f}"
            bar.set_postfix(**postfix)
            group_outliers = 0
            tick = now
            if stop_votes:
                return False
    finally:
        bar.close()
    s.optimizer.zero_grad(set_to_none=True)  # a partial last group (files skipped) is left out
    stats.skipped.extend(s.epoch_skipped())
    stats.outlier_skipped.extend(s.outlier_skipped())
    return True


def _diverged(s: Session, epoch: int, what: str):
    s.optimizer.zero_grad(set_to_none=True)  # the step is not taken: the weights stay finite
    raise TrainingDiverged(
        f"{what} became NaN or infinite at epoch {epoch} step {s.step} (steps count from 0 over the run; "
        f"micro-batch {s.micro_done - 1} of the epoch, lr {current_lr(s.optimizer):.3g}). The run stopped; "
        f"the last good checkpoint is in {s.run.checkpoints}. Lower --lr, raise --warmup-epochs or "
        "set --grad-clip, and train into a new --out (rerunning unchanged resumes from that checkpoint)")


def _finish_epoch(s: Session, epoch: int, stats: EpochStats) -> None:
    """Validate raw and EMA weights, then write metrics, last/best checkpoints and resume.pt (rank 0)."""
    ctx = s.ctx
    totals = all_reduce_sum(torch.tensor([stats.loss_sum, stats.correct, stats.seen, stats.oe_loss_sum,
                                          stats.outliers_seen], dtype=torch.float64), ctx)
    loss_sum, correct, seen, oe_loss_sum, outliers_seen = totals.tolist()
    skipped = s.gather_skipped(stats.skipped)
    s.epoch, s.micro_done = epoch + 1, 0
    line = None
    if ctx.is_main:
        raw = s.evaluate(s.net_unwrapped)
        val_skipped = s.val_skipped()  # the same files for the EMA pass
        ema = s.evaluate(s.ema.module) if s.ema is not None else None
        line = {
            "epoch": epoch, "step": s.step,
            "train_loss": loss_sum / max(1, seen), "train_top1": correct / max(1, seen),
            "val_loss": raw["loss"], "val_top1": raw["top1"], "val_top5": raw["top5"],
            "ema_val_loss": ema["loss"] if ema else None, "ema_val_top1": ema["top1"] if ema else None,
            "ema_val_top5": ema["top5"] if ema else None,
            "lr": current_lr(s.optimizer), "epoch_time": stats.seconds,
            "images_per_s": seen / max(1e-9, stats.seconds),
            "skipped_files": len(skipped), "val_images": raw["count"],
        }
        if skipped:
            line["skipped"] = capped_skipped(skipped)
        if s.outliers:  # outlier exposure: the mean CE to uniform over the epoch's outlier photos
            line["train_oe_loss"] = oe_loss_sum / max(1, outliers_seen)
            line["outlier_images"] = int(outliers_seen)
            line["outliers_per_s"] = outliers_seen / max(1e-9, stats.seconds)
            line["outlier_skipped_files"] = len(stats.outlier_skipped)
            if stats.outlier_skipped:
                line["outlier_skipped"] = capped_skipped(stats.outlier_skipped)
        line["val_skipped_files"] = len(val_skipped)  # val_images counts only the decoded ones
        if val_skipped:
            line["val_skipped"] = capped_skipped(val_skipped)
        s.history.append(line)
        candidates = [("raw", raw)] + ([("ema", ema)] if ema else [])
        source, metrics = max(candidates, key=lambda c: (c[1]["top1"], -c[1]["loss"]))
        if raw["count"] == 0:  # no validation images (val_fraction=0): best is simply the latest
            s.best = {"epoch": epoch, "weights": "raw", "val_top1": 0.0, "val_loss": 0.0}
            s.save_model("best", "raw", epoch)
        elif not s.best or (metrics["top1"], -metrics["loss"]) > (s.best["val_top1"], -s.best["val_loss"]):
            s.best = {"epoch": epoch, "weights": source, "val_top1": metrics["top1"], "val_loss": metrics["loss"]}
            s.save_model("best", source, epoch)
        s.save_model("last", "raw", epoch)
    s.save_checkpoint(s.epoch, None)
    if ctx.is_main:
        append_metrics(s.run.metrics_file, line)
        ema_text = f" | ema top-1 {line['ema_val_top1']:.4f}" if line["ema_val_top1"] is not None else ""
        oe_text = f" (oe {line['train_oe_loss']:.4f} on {line['outlier_images']} outliers)" if s.outliers else ""
        print(f"epoch {epoch}: train loss {line['train_loss']:.4f}{oe_text} | val loss {line['val_loss']:.4f} "
              f"top-1 {line['val_top1']:.4f} top-5 {line['val_top5']:.4f}{ema_text} | lr {line['lr']:.3g} | "
              f"{line['epoch_time']:.1f}s, {line['images_per_s']:.1f} img/s", flush=True)
        for items, what in ((skipped, "training"), (val_skipped, "validation")):
            if items:
                print(textwrap.indent(skipped_report(items, what), "  "), file=sys.stderr, flush=True)
    barrier(ctx)
