"""The backends give the torch model's numbers on real photos, and the onnxruntime one caches its export.

Correctness only: speed is measured by `dogbreeds bench`, never asserted here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dogbreeds.infer.backend import build_backend, open_run, softmax
from dogbreeds.infer.runtime_torch import inference_layout

INPUT_SIZE = 96  # small inputs keep the exports and sessions quick


def _tiny(name: str, num_classes: int = 10):
    """A tiny model; ConvNeXt-atto with timm's default Linear MLPs (like ConvNeXt-T; atto's own
    default is conv_mlp=True), so the inference layout rewrite is exercised."""
    from dogbreeds.models.factory import create_model

    torch.manual_seed(0)
    kwargs = {"conv_mlp": False} if name.startswith("convnext") else {}
    model = create_model(name, num_classes=num_classes, **kwargs).eval()
    model.preprocessing = model.preprocessing.with_input_size(INPUT_SIZE)
    return model


@pytest.fixture(scope="module")
def photo_batch(mini_root) -> np.ndarray:
    """Two real photos of different breeds, preprocessed the model's way (numpy eval transform)."""
    from dogbreeds.data.decode import decode_image
    from dogbreeds.infer.preprocess_np import NumpyEvalTransform
    from dogbreeds.preprocessing import Preprocessing

    breeds = sorted(p for p in (mini_root / "Images").iterdir())[:2]
    transform = NumpyEvalTransform(Preprocessing(input_size=INPUT_SIZE))
    return np.stack([transform(decode_image(sorted(b.glob("*.jpg"))[0])) for b in breeds])


def _reference(model, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


@pytest.mark.parametrize("name", ["convnext_atto", "mobilenetv2_050"])
@pytest.mark.parametrize("kind", ["auto", "onnxruntime", "torch"])
def test_backend_matches_torch_on_real_photos(name, kind, photo_batch, tmp_path):
    model = _tiny(name)
    expected = _reference(model, photo_batch)
    backend = build_backend(model, engine=kind, cache_dir=tmp_path)
    got = backend.forward(photo_batch)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(softmax(got), softmax(expected), atol=1e-5)
    # batch size the export never saw
    np.testing.assert_allclose(backend.forward(photo_batch[:1]), expected[:1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torch_compile_backend_matches_torch(photo_batch):
    model = _tiny("convnext_atto")
    backend = build_backend(model, engine="torch-compile")
    np.testing.assert_allclose(backend.forward(photo_batch), _reference(model, photo_batch), atol=1e-4, rtol=0)
    assert backend.compile_seconds  # the first call compiled and was timed


def test_int8_backend_is_a_separate_labelled_path(photo_batch, tmp_path):
    model = _tiny("convnext_atto")
    backend = build_backend(model, engine="int8", cache_dir=tmp_path)
    assert backend.kind == "int8" and backend.path.name.endswith("-int8.onnx")
    got, expected = backend.forward(photo_batch), _reference(model, photo_batch)
    assert got.shape == expected.shape and np.isfinite(got).all()
    # int8 changes the numbers, but only a little
    assert np.abs(got - expected).max() < 0.1 * (1 + np.abs(expected).max())


def test_int8_keeps_the_classifier_fp32(tmp_path):
    """The classifier's int8 error lands straight in the logits (it flipped top-1 on trained
    ConvNeXt runs, docs/performance.md): it stays fp32; the blocks' MLPs are quantised."""
    import onnx

    model = _tiny("convnext_atto")
    graph = onnx.load(str(build_backend(model, engine="int8", cache_dir=tmp_path).path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    assert [o.name for o in graph.output] == ["logits", "features"]
    last = producer["logits"]
    if last.op_type == "Add":  # bias
        last = next(producer[i] for i in last.input if i in producer)
    assert last.op_type in ("MatMul", "Gemm"), last.op_type
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in graph.node)


def test_conv_mlp_layout_keeps_the_numbers(photo_batch):
    model = _tiny("convnext_atto")
    rebuilt = inference_layout(model)
    assert not any(b.use_conv_mlp for b in model.modules() if hasattr(b, "use_conv_mlp"))
    assert all(b.use_conv_mlp for b in rebuilt.modules() if hasattr(b, "use_conv_mlp"))
    assert rebuilt.preprocessing == model.preprocessing
    np.testing.assert_allclose(_reference(rebuilt, photo_batch), _reference(model, photo_batch), atol=1e-5, rtol=0)
    mobilenet = _tiny("mobilenetv2_050")
    assert inference_layout(mobilenet) is mobilenet  # nothing to change


def test_export_is_cached_and_a_changed_model_reexports(tmp_path):
    model = _tiny("convnext_atto")
    first = build_backend(model, engine="auto", cache_dir=tmp_path)
    second = build_backend(model, engine="auto", cache_dir=tmp_path)
    assert first.exported and not second.exported and first.path == second.path
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    third = build_backend(model, engine="auto", cache_dir=tmp_path)
    assert third.exported and third.path != first.path


def test_unknown_engine_names_the_choices():
    with pytest.raises(Exception, match="unknown engine 'fastest'.*'auto'.*onnxruntime.*int8.*'torch'.*torch-compile"):
        build_backend(_tiny("convnext_atto"), engine="fastest")


def _save_run(root: Path, model, mini_root: Path) -> Path:
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint

    breeds = sorted(p.name for p in (mini_root / "Images").iterdir())[: model.num_classes]
    save_model_checkpoint(model, root / "checkpoints" / "best.safetensors", ClassInfo(tuple(breeds)))
    return root


def test_backend_from_run_reuses_the_export_without_loading_the_model(tmp_path, mini_root, monkeypatch):
    from dogbreeds.data.decode import decode_image
    from dogbreeds.infer import backend as backend_module
    from dogbreeds.infer.predictor import Predictor

    model = _tiny("convnext_atto")
    run = _save_run(tmp_path / "run", model, mini_root)
    hashed = []
    real_sha256 = backend_module.file_sha256
    monkeypatch.setattr(backend_module, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    first = open_run(run)
    assert first.exported and first.path.parent == run / "export"
    assert hashed == [run / "checkpoints" / "best.safetensors"]  # a cache miss hashes the checkpoint once

    import dogbreeds.models.factory as factory

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached export must not load the torch model")
    monkeypatch.setattr(factory, "load_run", no_loading)
    second = open_run(run)
    assert second.path == first.path and not second.exported
    monkeypatch.undo()

    # same predictions as the torch backend on a real photo
    photo = sorted((mini_root / "Images").glob("*/*.jpg"))[0]
    image = decode_image(photo)
    torch_backend = open_run(run, engine="torch")
    expected = torch_backend.forward(torch_backend.preprocess(image)[None])
    np.testing.assert_allclose(second.forward(second.preprocess(image)[None]), expected, atol=1e-3)
    top = Predictor(second).predict([photo], top_k=3)[0]
    assert top.ok and len(top.top) == 3

    # a changed checkpoint gets a new export
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    _save_run(run, model, mini_root)
    third = open_run(run)
    assert third.exported and third.path != first.path


def test_registry_and_runtime_modules_do_not_import_torch():
    import subprocess

    code = ("import sys\nfrom dogbreeds.infer import backend\nnames = backend.engine_names()\n"
            "assert names[:2] == ('auto', 'onnxruntime') and {'int8', 'torch', 'torch-compile'} <= set(names), names\n"
            "sys.exit(1 if 'torch' in sys.modules or 'onnxruntime' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_engine_and_export_take_a_model_that_already_has_conv_mlps(tmp_path, mini_root, photo_batch):
    """Training saves ConvNeXt-T with conv_mlp=True in model_kwargs; load_run rebuilds it so.
    The backends must use such a model as it is (fp32) and give int8 its Linear layout back."""
    from dogbreeds.infer.export import export_onnx
    from dogbreeds.infer.runtime_torch import linear_layout
    from dogbreeds.models.factory import create_model, load_run

    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=3, conv_mlp=True).eval()
    model.preprocessing = model.preprocessing.with_input_size(INPUT_SIZE)
    run = _save_run(tmp_path / "run", model, mini_root)
    loaded = load_run(run).model
    assert loaded.dogbreeds_kwargs == {"conv_mlp": True}
    assert inference_layout(loaded) is loaded  # already in the fast layout: nothing to rebuild
    linear = linear_layout(loaded)
    assert {b.use_conv_mlp for b in linear.modules() if hasattr(b, "use_conv_mlp")} == {False}
    expected = _reference(loaded, photo_batch)
    np.testing.assert_allclose(_reference(linear, photo_batch), expected, atol=1e-5, rtol=0)

    backend = open_run(run, engine="onnxruntime")
    np.testing.assert_allclose(backend.forward(photo_batch), expected, atol=1e-4, rtol=0)
    int8 = build_backend(loaded, engine="int8", cache_dir=tmp_path / "int8")
    assert np.abs(int8.forward(photo_batch) - expected).max() < 0.1 * (1 + np.abs(expected).max())
    import onnx  # int8 quantised the MLPs' matrix products, which exist only in the Linear layout
    ops = [node.op_type for node in onnx.load(str(int8.path)).graph.node]
    blocks = sum(1 for m in loaded.modules() if hasattr(m, "use_conv_mlp"))
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") > blocks, sorted(set(ops))

    report = export_onnx(run, tmp_path / "model.onnx", check_images=[str(p) for p in sorted((mini_root / "Images").glob("*/*.jpg"))[:2]])
    assert report.max_abs_diff <= report.tolerance


# --- int8 that quantises nothing ---------------------------------------------------------------------

class _TinyNet(torch.nn.Module):
    """A timm-interface net: a convolution, pooling, optionally a hidden Linear (a matrix product
    dynamic int8 quantises), and a Linear classifier (kept fp32). Without the hidden layer it is
    MobileNetV2's case in small: convolutions and the classifier only."""

    def __init__(self, hidden: bool):
        from dogbreeds.preprocessing import Preprocessing

        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()) if hidden else torch.nn.Identity()
        self.fc = torch.nn.Linear(16 if hidden else 8, 4)
        self.num_classes = 4
        self.preprocessing = Preprocessing(input_size=32)
        self.dogbreeds_name = "tiny-mlp" if hidden else "tiny-conv"

    def forward_features(self, x):
        return torch.relu(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        x = self.mlp(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_int8_on_a_conv_only_model_says_it_is_the_fp32_graph(tmp_path, capsys):
    import onnx

    from dogbreeds.infer.runtime_onnxruntime import QUANTISED_OPS_KEY, OrtBackend, integer_op_count

    model = _TinyNet(hidden=False)
    quiet = build_backend(model, engine="int8", cache_dir=tmp_path, quiet=True)
    assert capsys.readouterr().err == ""
    assert quiet.quantised_ops == 0 == integer_op_count(quiet.path)
    assert quiet.not_quantised.startswith("int8 dynamic quantised no operator of this model (tiny-conv")
    assert "nothing quantised: the fp32 graph" in quiet.description
    named = build_backend(model, engine="int8", cache_dir=tmp_path)  # what --engine int8 builds: it says so
    err = capsys.readouterr().err
    assert "warning: --engine int8 on tiny-conv" in err and "fp32 graph" in err and "int8-static" in err
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    fp32 = build_backend(model, engine="onnxruntime", cache_dir=tmp_path)
    np.testing.assert_allclose(named.forward(x), fp32.forward(x), atol=1e-5)  # the same numbers: nothing changed

    # an int8 export written before the count was stored: counted from its graph
    stored = onnx.load(str(quiet.path))
    assert {p.key: p.value for p in stored.metadata_props}[QUANTISED_OPS_KEY] == "0"
    older = [p for p in stored.metadata_props if p.key != QUANTISED_OPS_KEY]
    del stored.metadata_props[:]
    stored.metadata_props.extend(older)
    onnx.save(stored, str(tmp_path / "older-int8.onnx"))
    assert OrtBackend(tmp_path / "older-int8.onnx", kind="int8").not_quantised is not None


def test_int8_on_a_model_with_a_matrix_product_quantises_it(tmp_path, capsys):
    from dogbreeds.infer.runtime_onnxruntime import integer_op_count

    backend = build_backend(_TinyNet(hidden=True), engine="int8", cache_dir=tmp_path)
    assert backend.quantised_ops == 1 == integer_op_count(backend.path)  # the hidden Linear; the classifier stays fp32
    assert backend.not_quantised is None and "nothing quantised" not in backend.description
    assert capsys.readouterr().err == ""


def test_static_int8_quantises_the_convolutions_dynamic_int8_leaves(tmp_path, mini_root):
    """int8-static (QDQ), what the warning suggests, does quantise a conv-only model; the fp32
    export counts no integer operator."""
    from dogbreeds.infer.backend import info_for_model
    from dogbreeds.infer.runtime_onnxruntime import integer_op_count

    model = _TinyNet(hidden=False)
    info = info_for_model(model)
    info.photos = sorted((mini_root / "Images").glob("*/*.jpg"))[:4]
    static = build_backend(model, engine="int8-static", info=info, cache_dir=tmp_path)
    assert static.quantised_ops >= 1 and static.not_quantised is None
    fp32 = build_backend(model, engine="onnxruntime", cache_dir=tmp_path)
    assert integer_op_count(fp32.path) == 0 and fp32.quantised_ops is None
