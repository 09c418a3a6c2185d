"""`RunDir`: the one object that owns a run directory's layout (the only place it is written down).

```
runs/<name>/
  config.yaml          the Recipe that made the run (+ versions)
  classes.json         label index -> breed id and display name
  split.json           root, seed, fractions and the files of each split
  metrics.jsonl        one line per epoch
  checkpoints/         best.safetensors, last.safetensors (+ .json sidecars), resume.pt
  eval/<split>.json    final metrics of `dogbreeds evaluate`
  figures/*.png        curves, confusion matrices, reliability diagrams
  calibration.json     temperature, OOD thresholds, conformal scores (`dogbreeds calibrate`)
  calibration_bank.npz the training photos' features the OOD score compares against
  export/              ONNX exports cached by the inference engines (keyed by the weights' hash),
                       engine-choice-<model>-<machine>.json: what "auto" chose and measured
  features/            backbone features of --freeze backbone runs (keyed by what they depend on)
```

Plain Python (no torch): the torch-free ONNX path and the service read runs through it.
Readers raise `DogbreedsError` naming the file and what to do; nothing read here is trusted
to be of the right shape.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import DogbreedsError

CONFIG = "config.yaml"
CLASSES = "classes.json"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
FIGURES = "figures"
EXPORT = "export"
FEATURES = "features"
RESUME = "resume.pt"
CALIBRATION = "calibration.json"
CALIBRATION_BANK = "calibration_bank.npz"
BEST, LAST = "best", "last"
CHECKPOINT_SUFFIX = ".safetensors"


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file owner-only; give it the mode a plain open() would (umask applied).
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too, or a power cut could undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RunDir:
    """A run directory: its paths, and readers for what `dogbreeds train` writes into it.

    `RunDir(path)` for a folder (it need not exist yet: training creates it);
    `RunDir.locate(path)` for whatever a user may pass as "the run": the run folder, its
    `checkpoints/` folder, a `.safetensors` checkpoint or its `.json` sidecar.
    """

    def __init__(self, path: str | Path, checkpoint: Path | None = None):
        self.path = Path(path).expanduser()
        self._checkpoint = checkpoint  # a checkpoint file the user named, else best-or-last

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # --- finding the run ---

    @classmethod
    def locate(cls, path: str | Path) -> "RunDir":
        """The run that `path` names (a run folder, its checkpoints folder, a checkpoint or its sidecar)."""
        path = Path(path).expanduser()
        if path.is_dir():
            if path.name == CHECKPOINTS and not (path / CHECKPOINTS).is_dir():
                return cls(path.parent)
            return cls(path)
        if path.is_file():
            checkpoint = path.with_suffix(CHECKPOINT_SUFFIX) if path.suffix == ".json" else path
            folder = checkpoint.parent
            run = folder.parent if folder.name == CHECKPOINTS else folder
            return cls(run, checkpoint=checkpoint)
        if path.exists():  # a FIFO, socket or device: said at once (opening a FIFO would block)
            from .models.safety import check_regular

            check_regular(path, "run or checkpoint file")
        raise DogbreedsError(f"run or checkpoint not found: {path}; pass a run directory written by "
                             "`dogbreeds train` or one of its checkpoints/*.safetensors files")

    # --- paths ---

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def classes_file(self) -> Path:
        return self.path / CLASSES

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def resume_file(self) -> Path:
        return self.checkpoints / RESUME

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    def engine_choice_file(self, key: str, export_dir: Path | None = None) -> Path:
        """What "auto" chose and measured for one model on one machine kind (`key`: model and machine
        profile keys), kept beside the export (in `export_dir` when the export is kept elsewhere)."""
        return Path(export_dir or self.export_dir) / f"engine-choice-{key}.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES

    @property
    def features_dir(self) -> Path:
        return self.path / FEATURES

    @property
    def calibration_file(self) -> Path:
        return self.path / CALIBRATION

    @property
    def calibration_bank_file(self) -> Path:
        return self.path / CALIBRATION_BANK

    def checkpoint_path(self, which: str = BEST) -> Path:
        """checkpoints/best.safetensors or checkpoints/last.safetensors (whether it exists or not)."""
        if which not in (BEST, LAST):
            raise ValueError(f"checkpoint must be {BEST!r} or {LAST!r}, got {which!r}")
        return self.checkpoints / f"{which}{CHECKPOINT_SUFFIX}"

    def eval_file(self, split: str, suffix: str = "") -> Path:
        return self.eval_dir / f"{split}{suffix}.json"

    def figure(self, name: str) -> Path:
        return self.figures_dir / name

    def find_checkpoint(self) -> Path | None:
        """The checkpoint to predict with: the one named in `locate`, else best, else last."""
        if self._checkpoint is not None:
            return self._checkpoint if self._checkpoint.is_file() else None
        for which in (BEST, LAST):
            path = self.checkpoint_path(which)
            if path.is_file():
                return path
        # a bare folder of checkpoint files (no checkpoints/ level)
        for which in (BEST, LAST):
            path = self.path / f"{which}{CHECKPOINT_SUFFIX}"
            if path.is_file():
                return path
        return None

    def checkpoint(self) -> Path:
        """Like `find_checkpoint`, but a missing checkpoint is an error saying what was expected."""
        found = self.find_checkpoint()
        if found is None:
            if self._checkpoint is not None:
                raise DogbreedsError(f"checkpoint not found: {self._checkpoint}")
            raise DogbreedsError(f"{self.path} holds no checkpoint: expected {CHECKPOINTS}/{BEST}{CHECKPOINT_SUFFIX} "
                                 f"or {CHECKPOINTS}/{LAST}{CHECKPOINT_SUFFIX} (written by `dogbreeds train`)")
        return found

    # --- readers ---

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: a nesting bomb
            raise DogbreedsError(f"cannot read {path}: {exc}; is {self.path} a run directory written by "
                                 "`dogbreeds train`? Rerun the step that writes it") from None

    def read_config(self) -> dict:
        """config.yaml as a dict (the Recipe's fields + extras); {} when absent."""
        if not self.config.is_file():
            return {}
        import yaml

        try:
            data = yaml.safe_load(self.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DogbreedsError(f"cannot read {self.config}: {exc}; restore it, or train into a new --out") from None
        if not isinstance(data, dict):
            raise DogbreedsError(f"{self.config} is not a mapping of recipe fields; restore it, or train into a new --out")
        return data

    def read_split(self) -> dict:
        data = self.read_json(self.split_file)
        if not isinstance(data, dict):
            raise DogbreedsError(f"{self.split_file} is not a JSON object; rerun `dogbreeds train` into a new --out")
        return data

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl, one dict per epoch; [] when absent. A torn last line (a crash mid-append)
        is dropped; any other bad line is an error naming the line."""
        if not self.metrics_file.is_file():
            return []
        lines = [line for line in self.metrics_file.read_text().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                if number == len(lines):
                    break
                raise DogbreedsError(f"{self.metrics_file} line {number} is not JSON; rerun the same "
                                     "`dogbreeds train` command to rewrite it from the saved state") from None
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def read_classes(self):
        """ClassInfo from the checkpoint's sidecar, else classes.json."""
        from .data.records import ClassInfo

        checkpoint = self.find_checkpoint()
        if checkpoint is not None:
            from .models.checkpoint_format import read_checkpoint_meta

            meta = read_checkpoint_meta(checkpoint)
            if meta.get("classes"):
                return ClassInfo.from_json(meta["classes"])
        if self.classes_file.is_file():
            return ClassInfo.from_json(self.read_json(self.classes_file))
        raise DogbreedsError(f"{self.path}: no classes in the checkpoint's sidecar and no {CLASSES}; "
                             f"copy the run's {CLASSES} there")

    def read_eval(self, split: str, suffix: str = "") -> dict | None:
        path = self.eval_file(split, suffix)
        return self.read_json(path) if path.is_file() else None

    # --- state ---

    def epochs_done(self) -> int:
        return len(self.read_metrics())

    def is_trained(self, epochs: int) -> bool:
        """All `epochs` are in metrics.jsonl and the last checkpoint exists."""
        return self.checkpoint_path(LAST).is_file() and self.epochs_done() >= epochs

    def recipe_mismatches(self, recipe) -> list[str] | None:
        """How `recipe` differs from the Recipe saved in config.yaml (fields that change numbers
        only, see `Recipe.resume_mismatches`); None when the run has no config.yaml yet."""
        if not self.config.is_file():
            return None
        from .train.recipe import Recipe

        return recipe.resume_mismatches(Recipe.from_yaml(self.config))

    def is_finished(self, recipe, strict: bool = False) -> bool:
        """Trained to the end under this very recipe: config.yaml is `recipe`, all its epochs are
        in metrics.jsonl and the last checkpoint exists. A run saved under another recipe is not
        finished (`train` will explain the difference), or with strict=True an error naming it."""
        mismatches = self.recipe_mismatches(recipe)
        if mismatches is None:
            return False
        if mismatches:
            if strict:
                raise DogbreedsError(f"{self.path} was trained with another recipe ({'; '.join(mismatches)}); "
                                     "train into a new --out, or repeat the settings it was started with")
            return False
        return self.is_trained(recipe.epochs)

    # --- writers ---

    def write_json(self, path: Path, data: Any, indent: int | None = 2) -> Path:
        atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
        return path

    def write_text(self, path: Path, text: str) -> Path:
        atomic_write_text(path, text)
        return path

    def write_bytes(self, path: Path, data: bytes) -> Path:
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return path
