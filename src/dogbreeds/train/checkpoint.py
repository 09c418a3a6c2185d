"""Nothing lost: atomic writes of the run's files, and the resume state.

`checkpoints/resume.pt` holds everything needed to continue bit-identically: model, optimizer,
scheduler and EMA tensors, the RNG states, the position (epoch, step, micro-batches done),
the best metric so far and the metrics history. It is written last and atomically (tmp file +
os.replace), so a kill at any moment leaves either the previous or the new state, never a
torn one. Everything in it is a tensor or a plain Python value, so it loads with
`torch.load(weights_only=True)` (no pickled code runs when a run directory is opened).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import DogbreedsError
from ..rundir import atomic_write, atomic_write_text  # noqa: F401  (re-exported: the run's writers)

RESUME_FORMAT = "dogbreeds-resume"
RESUME_VERSION = 1


def save_resume_state(path: Path, state: dict) -> None:
    state = {"format": RESUME_FORMAT, "version": RESUME_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which and what to do
        raise DogbreedsError(f"cannot read the resume state {path}: {exc}. Delete it to start the run "
                             "over, or point --out at a new directory") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise DogbreedsError(f"{path} is not a dogbreeds resume state; delete it to start the run over, "
                             "or point --out at a new directory")
    if state.get("version") != RESUME_VERSION:
        raise DogbreedsError(f"{path} has resume format version {state.get('version')}, "
                             f"this dogbreeds reads version {RESUME_VERSION}: resume it with the dogbreeds "
                             "version that wrote it, or point --out at a new directory")
    return state


# --- random number generators, as tensors and plain values ---

def capture_rng_state() -> dict:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_states_of_all_ranks(ctx) -> list:
    """Every rank's RNG state (rank 0 writes them all, so each rank resumes its own streams)."""
    state = capture_rng_state()
    if not ctx.distributed:
        return [state]
    import torch.distributed as dist

    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- metrics.jsonl: a view of the history kept in resume.pt ---

def write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the history (after a resume it must not repeat or miss epochs)."""
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in history))


def append_metrics(path: Path, line: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")
