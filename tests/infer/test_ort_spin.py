"""onnxruntime with spinning worker threads ("onnxruntime-spin") beside the default sleeping session:
"auto" probes both on a CPU and keeps the default unless spinning is SWITCH_MARGIN faster; the
option reaches the real onnxruntime session; --engine forces either; older choice records are
probed again; the service never runs a spinning engine that "auto" chose. Speeds are faked where
the choice is asserted (no timing assertions). A random-init MobileNetV2-050 at 64 px, 8 real photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dogbreeds.infer import auto
from dogbreeds.infer.backend import open_run, run_key
from dogbreeds.infer.runtime_onnxruntime import FP32, SPIN, SPINNING_KEY

from .conftest import make_run

AMD = {"cpu": {"model": "AMD EPYC", "cores": 2, "flags": {"avx2": True, "fma": True}}, "gpu": []}


def spinning_entry(backend) -> str:
    """What the live onnxruntime session was configured with (not what dogbreeds thinks it asked for)."""
    return backend.session.get_session_options().get_session_config_entry(SPINNING_KEY)


@pytest.fixture(scope="module")
def spin_run(tmp_path_factory, mini_root) -> Path:
    """A random-init MobileNetV2-050 run (64 px, 4 breeds) with 8 real validation photos; its fp32 export cached."""
    root = make_run(tmp_path_factory.mktemp("spin_run"), "mobilenetv2_050", mini_root, input_size=64, num_classes=4,
                    val_per_breed=2)
    open_run(root, engine=FP32)
    return root


@pytest.fixture
def run(spin_run, tmp_path) -> Path:
    """The run with its export cached and no engine choice recorded yet."""
    fresh = tmp_path / "run"
    shutil.copytree(spin_run, fresh, ignore=shutil.ignore_patterns("engine-choice-*"))
    return fresh


@pytest.fixture
def fp32_candidates(monkeypatch):
    """The real capability list for a CPU without bf16 or OpenVINO, less the int8 engines (slow to
    quantise; they have tests of their own): what the probe gets is what `candidates` says."""
    real = auto.candidates

    def fp32_only(profile, openvino, include_compile=False):
        probed, skipped = real(AMD, False, include_compile)
        return [e for e in probed if auto.PRECISION[e] == "fp32"], skipped

    monkeypatch.setattr(auto, "candidates", fp32_only)


def fake_speeds(monkeypatch, spin_speedup: float):
    """Per-call seconds by engine: onnxruntime-spin `spin_speedup` x as fast as onnxruntime, torch slow."""
    seconds = {"torch": 1.0, FP32: 0.1, SPIN: 0.1 / spin_speedup}
    monkeypatch.setattr(auto, "_timed_speed", lambda backend, batch: seconds[backend.kind])


def write_record(run: Path, record: dict) -> Path:
    from dogbreeds.machine import profile_key
    from dogbreeds.rundir import RunDir

    rundir = RunDir.locate(run)
    path = auto.choice_file(rundir.export_dir, run_key(rundir, rundir.checkpoint()), profile_key())
    auto.write_choice(path, record)
    return path


# --- capability and the rule -------------------------------------------------------------------------

def test_a_cpu_probes_onnxruntime_with_and_without_spinning_and_a_gpu_does_not_spin():
    probed, _ = auto.candidates(AMD, openvino=False)
    assert probed.index(FP32) < probed.index(SPIN) and auto.PRECISION[SPIN] == "fp32"
    probed, skipped = auto.candidates({**AMD, "gpu": [{"name": "Fake GPU", "compute_capability": "9.0"}]}, True)
    assert FP32 in probed and SPIN not in probed and "CUDA GPU" in skipped[SPIN]


def test_spinning_replaces_the_default_only_when_switch_margin_faster():
    def measured(spin):
        return [{"engine": e, "precision": "fp32", "images_per_s": s, "agreement": 1.0, "max_prob_diff": 0.0}
                for e, s in ((FP32, 100.0), (SPIN, spin), ("torch", 20.0))]

    below = 100.0 * auto.SWITCH_MARGIN - 1
    engine, why = auto.pick(measured(below))
    assert engine == FP32 and f"{SPIN} was only {below / 100:.2f}x as fast" in why
    assert auto.pick(measured(100.0 * auto.SWITCH_MARGIN + 1))[0] == SPIN


# --- the probe, on real photos and real sessions ------------------------------------------------------

@pytest.mark.parametrize("speedup, chosen", [(1.02, FP32), (1.5, SPIN)])
def test_the_probe_measures_both_and_the_chosen_session_spins_as_recorded(run, fp32_candidates, monkeypatch,
                                                                          speedup, chosen):
    fake_speeds(monkeypatch, speedup)
    backend = open_run(run)
    record = backend.auto_choice
    assert {m["engine"] for m in record["measured"]} == {"torch", FP32, SPIN}
    assert record["engine"] == backend.kind == chosen and record["version"] == auto.RECORD_VERSION
    by_engine = {m["engine"]: m for m in record["measured"]}
    assert by_engine[SPIN]["max_prob_diff"] < 1e-5 and by_engine[SPIN]["passed"]  # the same graph, the same numbers
    assert spinning_entry(backend) == ("1" if chosen == SPIN else "0")
    assert len(list((run / "export").glob("model-*.onnx"))) == 1  # one export: spinning is a session option
    assert json.loads(next((run / "export").glob("engine-choice-*.json")).read_text())["engine"] == chosen


def test_a_record_of_an_older_version_is_probed_again(run, fp32_candidates, monkeypatch):
    fake_speeds(monkeypatch, 1.5)
    path = write_record(run, {"version": auto.RECORD_VERSION - 1, "engine": FP32, "precision": "fp32", "probed": True,
                              "why": "the fastest fp32 engine", "created": "old"})
    assert auto.read_choice(path) is None
    backend = open_run(run)
    assert backend.auto_choice["created"] != "old" and SPIN in {m["engine"] for m in backend.auto_choice["measured"]}
    assert backend.kind == SPIN and auto.read_choice(path)["engine"] == SPIN


# --- forcing, and what the sessions are configured with -------------------------------------------------

def test_engine_forces_either_variant_from_the_cached_export_and_predict_verbose_says_so(run, photos, monkeypatch,
                                                                                          capsys):
    import dogbreeds.models.factory as factory
    from dogbreeds.cli import main

    monkeypatch.setattr(factory, "load_run", lambda *a, **k: pytest.fail("the export is cached: no model load"))
    spin, sleep = open_run(run, engine=SPIN), open_run(run, engine=FP32)
    assert (spin.kind, spinning_entry(spin), spin.auto_choice) == (SPIN, "1", None)
    assert (sleep.kind, spinning_entry(sleep)) == (FP32, "0")
    assert spin.path == sleep.path and "spinning" in spin.description and "spinning" not in sleep.description
    assert main(["predict", str(run), str(photos[0]), "--engine", SPIN, "--verbose"]) == 0
    err = capsys.readouterr().err
    assert f"engine: {SPIN} (" in err and "threads, spinning)" in err
    assert not list((run / "export").glob("engine-choice-*.json"))  # a named engine probes nothing


# --- the service ------------------------------------------------------------------------------------------

def test_the_service_runs_the_sleeping_session_when_auto_chose_spinning(run, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    from dogbreeds.cli import main

    measured = [{"engine": SPIN, "precision": "fp32", "images_per_s": 300.0, "agreement": 1.0, "max_prob_diff": 0.0},
                {"engine": FP32, "precision": "fp32", "images_per_s": 200.0, "agreement": 1.0, "max_prob_diff": 0.0}]
    write_record(run, {"version": auto.RECORD_VERSION, "engine": SPIN, "precision": "fp32", "probed": True,
                       "why": "the fastest fp32 engine", "images_per_s": 300.0, "agreement": 1.0, "max_prob_diff": 0.0,
                       "batch": 8, "photos": 8, "measured": measured, "created": "recorded"})
    assert open_run(run).kind == SPIN  # predict and evaluate run what auto chose
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level, **_: apps.append(app))
    assert main(["serve", str(run)]) == 0
    assert main(["serve", str(run), "--engine", SPIN]) == 0  # named: the user's choice stands
    served, forced = (app.state.predictor.backend for app in apps)
    assert (served.kind, spinning_entry(served)) == (FP32, "0")
    assert (forced.kind, spinning_entry(forced)) == (SPIN, "1")
    with TestClient(apps[0]) as client:
        health = client.get("/healthz").json()
    choice = health["engine_choice"]
    assert health["backend"] == choice["engine"] == FP32 and choice["chose"] == SPIN
    assert choice["images_per_s"] == 200.0 and "the service runs onnxruntime instead" in choice["why"]
