""""auto" per machine (infer/auto.py): which engines a machine profile makes worth probing, the
rule that picks one, the probe on real photos and its record beside the export, and the ways it
is shown (predict --verbose, /healthz). Tiny models (ConvNeXt-atto, MobileNetV2-050 at 64 px), a handful of photos."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from dogbreeds.errors import DogbreedsError
from dogbreeds.infer import auto
from dogbreeds.infer.backend import open_run

from .conftest import make_run

AMD = {"cpu": {"model": "AMD EPYC", "cores": 2, "flags": {"avx2": True, "fma": True}}, "gpu": []}
XEON_AMX = {"cpu": {"model": "Intel Xeon", "cores": 2,
                    "flags": {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True, "amx_int8": True}},
            "gpu": []}


def _gpu(capability: str) -> dict:
    return {**AMD, "gpu": [{"name": "Fake GPU", "compute_capability": capability}]}


# --- capability -------------------------------------------------------------------------------------

def test_a_cpu_without_native_bf16_never_probes_bf16():
    probed, skipped = auto.candidates(AMD, openvino=True)
    assert probed[:2] == ["torch", "onnxruntime"] and {"openvino", "int8", "int8-static"} <= set(probed)
    assert not {"torch-bf16", "openvino-bf16", "cuda", "cuda-bf16"} & set(probed)
    assert "no native bf16" in skipped["torch-bf16"] and "no native bf16" in skipped["openvino-bf16"]
    assert skipped["cuda"] == "no CUDA GPU" and "not probed" in skipped["torch-compile"]


def test_an_amx_cpu_probes_bf16_and_a_missing_openvino_names_its_extra():
    probed, skipped = auto.candidates(XEON_AMX, openvino=True)
    assert {"torch-bf16", "openvino-bf16", "int8-static"} <= set(probed)
    probed, skipped = auto.candidates(XEON_AMX, openvino=False)
    assert "torch-bf16" in probed and "openvino" not in probed and "openvino-bf16" not in probed
    assert 'pip install -e ".[openvino]"' in skipped["openvino"] == skipped["openvino-bf16"]
    assert "torch-bf16-compile" in auto.candidates(XEON_AMX, openvino=False, include_compile=True)[0]


@pytest.mark.parametrize("capability, bf16", [("9.0", True), ("8.0", True), ("7.5", False)])
def test_a_gpu_probes_cuda_and_bf16_from_compute_capability_8(capability, bf16):
    probed, skipped = auto.candidates(_gpu(capability), openvino=True)
    assert "cuda" in probed and ("cuda-bf16" in probed) == bf16
    assert not {"int8", "openvino", "torch-bf16"} & set(probed)  # the GPU run, beside the fp32 CPU references
    if not bf16:
        assert "< 8.0" in skipped["cuda-bf16"]


def test_cuda_engines_say_what_is_missing(monkeypatch):
    import torch

    from dogbreeds.infer.runtime_torch import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DogbreedsError, match=r"engine 'cuda-bf16' needs a CUDA GPU.*--engine torch"):
        check_device("cuda-bf16")
    check_device("torch-bf16")  # a CPU engine needs no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a fake pre-Ampere GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    check_device("cuda")
    with pytest.raises(DogbreedsError, match=r"Fake T4 has none \(compute capability 7\.5 < 8\.0\); use --engine cuda"):
        check_device("cuda-bf16")


# --- the rule ---------------------------------------------------------------------------------------

def _m(engine, precision, speed, agreement=1.0, diff=1e-6):
    return {"engine": engine, "precision": precision, "images_per_s": speed, "agreement": agreement, "max_prob_diff": diff}


def test_pick_takes_the_fastest_that_agrees_and_never_a_lower_precision_that_does_not():
    fp32 = [_m("onnxruntime", "fp32", 100), _m("openvino", "fp32", 120)]
    assert auto.pick(fp32)[0] == "openvino"
    assert auto.pick(fp32 + [_m("torch-bf16", "bf16", 200, agreement=0.995, diff=0.009)])[0] == "torch-bf16"
    engine, why = auto.pick(fp32 + [_m("int8", "int8", 300, agreement=0.99)])  # one photo in 100 flips
    assert engine == "openvino" and "int8 disagreed" in why
    assert auto.pick(fp32 + [_m("int8", "int8", 300, diff=0.02)])[0] == "openvino"
    assert auto.pick(fp32 + [_m("int8", "int8", 122)])[0] == "openvino"  # < 5% faster: not worth its error
    assert auto.pick([_m("int8", "int8", 300)]) == (None, "no fp32 engine ran")


def test_pick_keeps_the_default_fp32_engine_unless_another_is_clearly_faster():
    near = [_m("onnxruntime", "fp32", 100), _m("openvino", "fp32", 104), _m("torch", "fp32", 30)]
    engine, why = auto.pick(near)  # 4% is within a shared CPU's probe noise
    assert engine == auto.AUTO_ENGINE == "onnxruntime" and "default" in why
    assert auto.pick([_m("onnxruntime", "fp32", 100), _m("openvino", "fp32", 106)])[0] == "openvino"
    # a lower precision is still measured against the fastest fp32 engine, not the kept default
    assert auto.pick(near + [_m("int8", "int8", 107)])[0] == "onnxruntime"
    assert auto.pick(near + [_m("int8", "int8", 110)])[0] == "int8"
    assert auto.pick([_m("openvino", "fp32", 90), _m("torch", "fp32", 30)])[0] == "openvino"  # no default measured


# --- the probe on real photos ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, mini_root) -> Path:
    """A random-init ConvNeXt-atto (64 px, 4 breeds) with a split.json naming 8 real validation photos.
    ConvNeXt, not MobileNetV2: its int8 export has matrix products to quantise (MobileNetV2's has
    none, and the probe skips it: test_an_int8_engine_that_quantised_nothing_is_skipped)."""
    return make_run(tmp_path_factory.mktemp("probe_run"), "convnext_atto", mini_root, input_size=64, num_classes=4,
                    val_per_breed=2)


@pytest.fixture(scope="module")
def probe_exports(probe_run) -> Path:
    """The exports of the three engines `few_engines` probes, made once (copied into each fresh run)."""
    for engine in ("onnxruntime", "int8"):
        open_run(probe_run, engine=engine)
    return probe_run / "export"


@pytest.fixture
def fresh_run(probe_run, probe_exports, tmp_path) -> Path:
    """The probe run with its exports cached and no engine choice recorded yet."""
    run = tmp_path / "run"
    shutil.copytree(probe_run / "checkpoints", run / "checkpoints")
    shutil.copy(probe_run / "split.json", run / "split.json")
    shutil.copytree(probe_exports, run / "export", ignore=shutil.ignore_patterns("engine-choice-*"))
    return run


@pytest.fixture
def few_engines(monkeypatch):
    """Probe three cheap engines (the capability's list is tested above)."""
    monkeypatch.setattr(auto, "candidates", lambda profile, openvino, include_compile=False:
                        (["torch", "onnxruntime", "int8"], {"torch-bf16": "no native bf16 (test)"}))


def test_the_probe_measures_chooses_records_and_the_next_start_reads_the_record(fresh_run, few_engines, monkeypatch):
    from dogbreeds.infer.backend import backend_for_loaded
    from dogbreeds.machine import profile_key
    from dogbreeds.models.factory import load_run

    backend = open_run(fresh_run)
    record = backend.auto_choice
    assert record["probed"] and record["photos"] == 8 and record["reference"] == "torch"
    assert {m["engine"] for m in record["measured"]} == {"torch", "onnxruntime", "int8"}
    speeds = {m["engine"]: m["images_per_s"] for m in record["measured"]}
    assert all(s > 0 for s in speeds.values())
    by_engine = {m["engine"]: m for m in record["measured"]}
    assert by_engine["torch"]["agreement"] == 1.0 and by_engine["torch"]["max_prob_diff"] == 0.0
    assert by_engine["onnxruntime"]["max_prob_diff"] < 1e-4
    assert backend.kind == record["engine"] == auto.pick(record["measured"])[0]
    assert record["skipped"]["torch-bf16"] == "no native bf16 (test)" and record["profile_key"] == profile_key()
    files = sorted((fresh_run / "export").glob("engine-choice-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == json.loads(json.dumps(record))

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again on the same machine")

    monkeypatch.setattr(auto, "probe", no_probe)
    again = open_run(fresh_run)
    assert again.kind == record["engine"] and again.auto_choice["created"] == record["created"]
    loaded = backend_for_loaded(load_run(fresh_run), "auto")  # what evaluate calls: the same record
    assert loaded.kind == record["engine"] and loaded.auto_choice["created"] == record["created"]
    assert open_run(fresh_run, engine="torch").auto_choice is None  # a named engine is not "auto"

    # another kind of machine probes again, into a record of its own
    monkeypatch.setattr("dogbreeds.machine.profile_key", lambda profile=None: "othermachine")
    with pytest.raises(AssertionError, match="probed again"):
        open_run(fresh_run)


def test_an_engine_that_fails_in_the_probe_is_skipped_with_its_reason_logged(fresh_run, few_engines, monkeypatch, caplog):
    from dogbreeds.infer import runtime_onnxruntime

    def crash(*args, **kwargs):
        raise RuntimeError("Unsupported operator DynamicQuantizeFrobnicate")

    monkeypatch.setattr(runtime_onnxruntime, "quantize_int8", crash)
    for cached in (fresh_run / "export").glob("*-int8.onnx"):
        cached.unlink()  # so that int8 is quantised again, and crashes
    with caplog.at_level(logging.WARNING, logger="dogbreeds.infer.auto"):
        backend = open_run(fresh_run)
    assert backend.kind in ("torch", "onnxruntime")
    assert "Frobnicate" in backend.auto_choice["skipped"]["int8"]
    assert "int8" not in {m["engine"] for m in backend.auto_choice["measured"]}
    assert any("engine int8 skipped" in r.getMessage() and "Frobnicate" in r.getMessage() for r in caplog.records)


def test_a_lower_precision_engine_that_disagrees_is_not_chosen_however_fast(fresh_run, few_engines, monkeypatch):
    """int8 made to answer wrongly (reversed logits) and to look 10x faster: still not chosen."""
    from dogbreeds.infer.runtime_onnxruntime import OrtBackend

    real_forward = OrtBackend.forward
    monkeypatch.setattr(OrtBackend, "forward", lambda self, batch: (-real_forward(self, batch) if self.kind == "int8"
                                                                     else real_forward(self, batch)))
    real_seconds = auto._timed_speed
    monkeypatch.setattr(auto, "_timed_speed", lambda backend, batch: real_seconds(backend, batch) / (
        10 if backend.kind == "int8" else 1))
    record = open_run(fresh_run).auto_choice
    int8 = next(m for m in record["measured"] if m["engine"] == "int8")
    assert int8["agreement"] < 0.995 and not int8["passed"] and record["measured"][0]["engine"] == "int8"
    assert record["engine"] in ("torch", "onnxruntime") and "int8 disagreed" in record["why"]


def test_no_validation_photos_means_the_fp32_default_unprobed(probe_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(probe_run / "checkpoints", run / "checkpoints")
    monkeypatch.setattr(auto, "probe", lambda *a, **k: pytest.fail("probed without photos"))
    backend = open_run(run)
    assert backend.kind == "onnxruntime" and not backend.auto_choice["probed"]
    assert not list((run / "export").glob("engine-choice-*.json"))


def test_given_photos_are_probed_on(probe_run, tmp_path, few_engines, photos):
    run = tmp_path / "run"
    shutil.copytree(probe_run / "checkpoints", run / "checkpoints")  # no split.json
    backend = open_run(run, photos=photos[:3])
    assert backend.auto_choice["probed"] and backend.auto_choice["photos"] == 3


# --- shown where the engine is ------------------------------------------------------------------------

def test_predict_verbose_and_healthz_show_the_choice(fresh_run, few_engines, photos, capsys):
    from fastapi.testclient import TestClient

    from dogbreeds.cli import main
    from dogbreeds.infer.predictor import Predictor
    from dogbreeds.serve.app import create_app

    assert main(["predict", str(fresh_run), str(photos[0]), "--json", "--verbose"]) == 0
    err = capsys.readouterr().err
    record = json.loads(next((fresh_run / "export").glob("engine-choice-*.json")).read_text())
    assert f"engine: {record['engine']}" in err and "images/s at batch" in err and "agreement with fp32 100.0%" in err
    with TestClient(create_app(Predictor.from_path(fresh_run))) as client:
        health = client.get("/healthz").json()
    assert health["engine_choice"]["engine"] == record["engine"] == health["backend"]
    assert health["engine_choice"]["images_per_s"] == record["images_per_s"]


def test_engine_openvino_without_openvino_names_the_extra(probe_run, photos, monkeypatch, capsys):
    import sys

    from dogbreeds.cli import main

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert main(["predict", str(probe_run), str(photos[0]), "--engine", "openvino"]) == 2
    assert 'needs OpenVINO, which is not installed: pip install -e ".[openvino]"' in capsys.readouterr().err


def test_stored_choice_is_what_bench_reads(fresh_run, few_engines):
    assert auto.stored_choice(fresh_run) is None
    chosen = open_run(fresh_run).auto_choice
    stored = auto.stored_choice(fresh_run)
    assert stored["engine"] == chosen["engine"] and stored["created"] == chosen["created"]
    assert np.isfinite(stored["images_per_s"])


# --- an int8 engine that quantised nothing ----------------------------------------------------------

def _mobilenet(size: int = 64):
    import torch

    from dogbreeds.models.factory import create_model, set_preprocessing

    torch.manual_seed(0)
    model = create_model("mobilenetv2_050", num_classes=4).eval()
    return set_preprocessing(model, model.preprocessing.with_input_size(size))


def test_an_int8_engine_that_quantised_nothing_is_skipped(tmp_path, photos):
    """MobileNetV2 has no matrix product but its classifier (kept fp32): dynamic int8 is its fp32
    graph under another name, which used to win the probe by timing noise. Never measured as int8."""
    from dogbreeds.infer.backend import info_for_model

    model = _mobilenet()
    record, built = auto.probe(model, info_for_model(model), tmp_path, 1, photos[:4], profile=AMD,
                               engines=["torch", "onnxruntime", "int8"])
    assert "int8" not in built and "int8" not in {m["engine"] for m in record["measured"]}
    assert record["skipped"]["int8"].startswith("int8 dynamic quantised no operator of this model")
    assert record["skipped"]["int8"].endswith("it is the fp32 graph")
    assert record["engine"] in ("torch", "onnxruntime")


def test_a_stored_choice_of_an_int8_that_quantised_nothing_is_probed_again(tmp_path, photos, few_engines):
    """A record written before such engines were skipped (it chose "int8" on MobileNetV2) is not reused."""
    from dogbreeds.infer.backend import build_backend, info_for_model, model_key
    from dogbreeds.infer.runtime_onnxruntime import photo_set_key
    from dogbreeds.machine import profile_key

    model = _mobilenet()
    info = info_for_model(model)
    info.photos = list(photos[:4])
    info.key = model_key(model, info)
    cache = tmp_path / "export"
    stale = {"version": auto.RECORD_VERSION, "engine": "int8", "precision": "int8", "probed": True,
             "photo_set": photo_set_key(info.photos), "why": "int8, 1.13x the fastest fp32 engine (openvino)"}
    auto.write_choice(auto.choice_file(cache, info.key, profile_key()), stale)
    backend = build_backend(model, "auto", info, cache)
    assert backend.kind in ("torch", "onnxruntime") and backend.auto_choice["probed"]
    assert "no operator" in backend.auto_choice["skipped"]["int8"]
    assert auto.read_choice(auto.choice_file(cache, info.key, profile_key()))["engine"] == backend.kind


def test_the_probe_pauses_between_engines_so_spinning_threads_settle():
    """Each timed call comes at least RUNTIME_SETTLE_S after the previous engine's call ended: a runtime whose
    worker threads still spin (onnxruntime's default) must not slow the engine timed after it."""
    import time

    from dogbreeds.infer.backend import RUNTIME_SETTLE_S

    events = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def forward(self, batch):
            events.append(("start", self.name, time.perf_counter()))
            events.append(("end", self.name, time.perf_counter()))
            return np.zeros((len(batch), 2), np.float32)

    speeds = auto._speeds({"a": Fake("a"), "b": Fake("b")}, np.zeros((2, 3, 8, 8), np.float32))
    assert set(speeds) == {"a", "b"} and all(v > 0 for v in speeds.values())
    starts = [t for kind, _, t in events if kind == "start"]
    ends = [t for kind, _, t in events if kind == "end"]
    assert len(starts) >= 4 and [name for kind, name, _ in events if kind == "start"][:2] == ["a", "b"]
    gaps = [start - end for end, start in zip(ends, starts[1:])]
    assert min(gaps) >= 0.9 * RUNTIME_SETTLE_S, gaps
