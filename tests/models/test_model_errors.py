"""Bad files and bad names fail with a WeightsError/DogbreedsError that names the problem."""
from __future__ import annotations

import builtins
import pickle

import pytest
import timm
import torch

from dogbreeds.errors import DogbreedsError, WeightsError
from dogbreeds.models.factory import create_model


@pytest.fixture(scope="module")
def atto_sd():
    return timm.create_model("convnext_atto", num_classes=5).state_dict()


def test_truncated_torch_file(atto_sd, tmp_path):
    path = tmp_path / "atto.pth"
    torch.save(atto_sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"{path}.*(corrupt|truncated)"):
        create_model(None, weights=path)


def test_truncated_safetensors_file(atto_sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "atto.safetensors"
    save_file(atto_sd, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=rf"{path}.*(corrupt|truncated)"):
        create_model("convnext_atto", weights=path)


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b""], ids=["random-bytes", "empty"])
def test_not_a_weights_file(content, tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=str(path)):
        create_model(None, weights=path)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_and_never_run(writer, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    obj = {"state_dict": {"w": torch.zeros(2)}, "trap": Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(WeightsError, match="refusing to execute pickled code") as info:
        create_model(None, weights=path)
    assert str(path) in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()


def test_wrong_architecture_lists_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError) as info:
        create_model("convnext_atto", weights=path)
    message = str(info.value)
    assert "timm weights (the file holds resnet18 weights) do not fit convnext_atto" in message
    assert "missing (" in message and "unexpected (" in message and "more" in message  # shortened lists
    assert "stem.0.weight" in message and "conv1.weight" in message


def test_wrong_size_lists_misshaped_keys(atto_sd, tmp_path):
    path = tmp_path / "atto.pth"
    torch.save(atto_sd, path)
    with pytest.raises(WeightsError, match=r"convnext_atto weights\) do not fit convnext_femto: mis-shaped \(\d+\): stem\.0\.weight \(40, 3, 4, 4\) vs model \(48, 3, 4, 4\)"):
        create_model("convnext_femto", weights=path)


def test_unknown_architecture_asks_for_a_name(tmp_path):
    path = tmp_path / "tiny_net.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(WeightsError, match="pass the model name"):
        create_model(None, weights=path)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(DogbreedsError, match="did you mean .*convnext_tiny"):
        create_model("convnext_tinny")
    with pytest.raises(DogbreedsError, match="mobilenetv2_100"):
        create_model("mobilenet_v2_100")
    with pytest.raises(DogbreedsError, match="fb_in22k_ft_in1k"):
        create_model("convnext_tiny.fb_in22k_ft_1k")


def test_missing_weights_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_model("convnext_atto", weights=tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="config.json"):
        create_model("convnext_atto", weights=tmp_path)  # an empty folder


def test_offline_download_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so set both the variable and the constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsError) as info:
        create_model("convnext_atto.d2_in1k", num_classes=20)
    message = str(info.value)
    assert "download" in message and "failed" in message
    assert "weights=" in message and "--weights" in message


def test_a_tag_passed_as_weights_says_where_tags_go():
    with pytest.raises(WeightsError, match=r"create_model\('convnext_tiny.fb_in22k'\)"):
        create_model("convnext_tiny", weights="fb_in22k")


def test_roadmap_models_are_reachable():
    model = create_model("roadmap_step0", num_classes=4)
    assert model.dogbreeds_name == "roadmap_step0" and model.num_classes == 4
    with pytest.raises(DogbreedsError, match="did you mean roadmap_step1, "):
        create_model("roadmap_stepp1")


def test_pretrained_and_weights_together_is_refused(tmp_path):
    with pytest.raises(DogbreedsError, match="not both"):
        create_model("convnext_atto", weights=tmp_path / "x.pth", pretrained=True)


def test_num_classes_defaults():
    assert create_model("convnext_atto").num_classes == 1000
    assert create_model("convnext_atto", num_classes=0).num_classes == 0
