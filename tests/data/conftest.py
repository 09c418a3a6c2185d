"""Shared helpers for the data tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io


def _write_list(path: Path, files: list[str], labels: list[int] | None = None) -> None:
    """A Stanford Dogs list (.mat) naming `files`; 1-based labels as in the official lists:
    by default the breed folder's position among the folders named."""
    if labels is None:
        folders = sorted({f.split("/")[0] for f in files})
        labels = [folders.index(f.split("/")[0]) + 1 for f in files]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cells = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cells[i, 0] = np.array([f])
    scipy.io.savemat(str(path), {"file_list": cells, "annotation_list": cells,
                                 "labels": np.array(labels, dtype=float).reshape(-1, 1)})


@pytest.fixture(scope="session")
def write_list():
    return _write_list
