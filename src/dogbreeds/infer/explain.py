"""Grad-CAM heat maps: where in the photo the evidence for a breed lies.

Uses the maintained `grad-cam` library (pytorch_grad_cam). The target layer is chosen by
architecture, because Grad-CAM is only meaningful on the last spatial feature map:

- ConvNeXt (timm, anything with `.stages`): the last stage, 1/32 of the input resolution;
- MobileNetV2 (timm, `.conv_head` + `.bn2`): the last 1x1 conv's activated output (`bn2` is
  timm's BatchNorm + ReLU6 after `conv_head`), the layer Keras calls `out_relu`.

The CAM covers the model's input square (the centre crop); it is pasted back where that crop
lies in the original photo, so the overlay has the photo's own size, and the parts the model
never saw are shown darkened rather than given an invented heat.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import DogbreedsError
from .predictor import BreedScore, Predictor
from .preprocess_np import crop_box


@dataclass
class Explanation:
    overlay: np.ndarray          # HxWx3 uint8: the photo with the heat map blended in
    heatmap: np.ndarray          # HxW float32 in [0, 1], the photo's size (0 outside the crop)
    cam: np.ndarray              # SxS float32 in [0, 1] on the model input
    target: BreedScore           # the breed explained
    top: list[BreedScore]        # the model's top breeds for this photo

    def png_bytes(self) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.overlay).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def find_target_layers(model, layer: str | None = None) -> list:
    """The feature map Grad-CAM should look at, chosen by architecture (or named explicitly)."""
    name = getattr(model, "dogbreeds_name", type(model).__name__)
    if layer:
        try:
            return [model.get_submodule(layer)]
        except AttributeError:
            raise DogbreedsError(f"model {name} has no layer {layer!r}; list them with `print(model)`") from None
    if hasattr(model, "stages"):
        return [model.stages[-1]]
    if hasattr(model, "conv_head") and hasattr(model, "bn2"):
        return [model.bn2]
    raise DogbreedsError(
        f"no Grad-CAM target layer known for model {name} ({type(model).__name__}); "
        "name the last convolutional layer explicitly (--layer / layer=)"
    )


class Explainer:
    """Grad-CAM for one PyTorch predictor.

    The library's hooks are registered for one call and released right after (a hook left on
    the model would record activations on every later prediction). With `copy_model=True`
    (the service) the CAM runs on a private copy of the model, so predictions running in
    other threads never pass through the hooks; CAM calls themselves take turns (a lock).
    """

    def __init__(self, predictor: Predictor, layer: str | None = None, alpha: float = 0.45, copy_model: bool = False):
        import copy

        model = getattr(predictor.backend, "model", None)
        if model is None:
            raise DogbreedsError(
                f"Grad-CAM needs the PyTorch model, but {predictor.backend.path} is {type(predictor.backend).__name__}; "
                "pass the run directory or checkpoint instead of the .onnx file"
            )
        self.predictor = predictor
        self.alpha = alpha
        self.model = copy.deepcopy(model).eval() if copy_model else model
        self.target_layers = find_target_layers(self.model, layer)
        self._lock = threading.Lock()

    def resolve_breed(self, breed: str) -> int:
        """Label index for a display name, breed id, or index, case-insensitively."""
        classes = self.predictor.classes
        wanted = breed.strip().lower().replace("_", " ")
        for index, (breed_id, name) in enumerate(zip(classes.breed_ids, classes.names)):
            if wanted in (name.lower(), breed_id.lower().replace("_", " ")):
                return index
        if breed.isdecimal() and int(breed) < len(classes):
            return int(breed)
        raise DogbreedsError(f"unknown breed {breed!r}; this model knows: {', '.join(classes.names)}")

    def explain(self, image, breed: str | None = None, top_k: int = 5) -> Explanation:
        import torch
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        photo = self.predictor.decode(image)
        inputs = torch.from_numpy(self.predictor.preprocess(photo))[None]
        probs = self.predictor.forward(inputs.numpy())[0]
        top = self.predictor.scores(probs, top_k)
        index = top[0].index if breed is None else self.resolve_breed(breed)
        classes = self.predictor.classes
        target = BreedScore(index, classes.breed_ids[index], classes.names[index], float(probs[index]))
        with self._lock, GradCAM(model=self.model, target_layers=self.target_layers) as grad_cam:
            cam = grad_cam(input_tensor=inputs, targets=[ClassifierOutputTarget(index)])[0].astype(np.float32)
        heatmap = paste_on_photo(cam, photo.shape[:2], self.predictor.preprocessing)
        inside = _inside_mask(photo.shape[:2], self.predictor.preprocessing)
        return Explanation(overlay_heatmap(photo, heatmap, self.alpha, inside), heatmap, cam, target, top)


def paste_on_photo(cam: np.ndarray, photo_shape: tuple[int, int], preprocessing) -> np.ndarray:
    """Resize the CAM to the crop's place in the photo; zero where the model saw nothing."""
    from PIL import Image

    height, width = photo_shape
    left, top, right, bottom = _crop_pixels(photo_shape, preprocessing)
    resized = Image.fromarray(cam.astype(np.float32), mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    heatmap = np.zeros((height, width), dtype=np.float32)
    heatmap[top:bottom, left:right] = np.clip(np.asarray(resized), 0.0, 1.0)
    return heatmap


def _crop_pixels(photo_shape, preprocessing) -> tuple[int, int, int, int]:
    height, width = photo_shape
    left, top, right, bottom = crop_box(height, width, preprocessing)
    left, top = max(0, int(round(left))), max(0, int(round(top)))
    right, bottom = min(width, max(left + 1, int(round(right)))), min(height, max(top + 1, int(round(bottom))))
    return left, top, right, bottom


def _inside_mask(photo_shape, preprocessing) -> np.ndarray:
    left, top, right, bottom = _crop_pixels(photo_shape, preprocessing)
    mask = np.zeros(photo_shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def overlay_heatmap(photo: np.ndarray, heatmap: np.ndarray, alpha: float, inside: np.ndarray) -> np.ndarray:
    """Blend a jet-coloured heat map over the photo; outside the model's crop, dim the photo."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap)[..., :3].astype(np.float32) * 255.0
    blended = (1 - alpha) * photo.astype(np.float32) + alpha * colours
    dimmed = photo.astype(np.float32) * 0.35
    out = np.where(inside[..., None], blended, dimmed)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(array).save(str(path), format="PNG", optimize=True)
