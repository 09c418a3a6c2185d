"""Hostile weights, checkpoints and metadata (issue 12, items 2, 3, 5, 8, 11, 12, 13;
docs/security.md "Weights and checkpoints"). Every input is written at test time, small and fast.

The rule held here: a clear DogbreedsError naming the file and the field (exit 2 from the CLI),
no traceback, no code run, nothing opened outside what was given, and a small file costs little
(<= 200 MB of RSS beyond the baseline, <= 2 s) to refuse however much it declares."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dogbreeds.errors import DogbreedsError, WeightsError

sys.path.insert(0, str(Path(__file__).parent))
import _weights_files as hostile  # noqa: E402

FORMAT = "dogbreeds-checkpoint"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- a small valid checkpoint

@pytest.fixture(scope="module")
def good_meta(tmp_path_factory) -> dict:
    """The sidecar of a real checkpoint of timm's tiny test_convnext (3 classes)."""
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    folder = tmp_path_factory.mktemp("good")
    model = create_model("test_convnext", num_classes=3)
    path = save_model_checkpoint(model, folder / "best.safetensors", ClassInfo(("n1-a", "n2-b", "n3-c")))
    return json.loads(path.with_suffix(".json").read_text())


def tiny_checkpoint(folder: Path, meta, embedded: bool = False, sidecar_text: str | None = None) -> Path:
    """best.safetensors (one tiny tensor) + a sidecar holding `meta` (or `sidecar_text`), or with
    embedded=True no sidecar and `meta` in the safetensors metadata. The schema is checked before
    any tensor is read, so one tensor is enough."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "best.safetensors"
    text = sidecar_text if sidecar_text is not None else json.dumps(meta)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "dogbreeds": text} if embedded else None)
    if not embedded:
        path.with_suffix(".json").write_text(text)
    return path


def cli(*argv: str, capsys) -> tuple[int, str]:
    from dogbreeds.cli import main

    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


# ---------------------------------------------------------------- 2: metadata is data, checked

BAD_METADATA = {
    "checkpoint_path": ({"model_kwargs": {"checkpoint_path": "MARKER"}}, "checkpoint_path"),
    "pretrained_cfg_overlay": ({"model_kwargs": {"pretrained_cfg_overlay": {"file": "MARKER"}}}, "pretrained_cfg_overlay"),
    "unknown kwarg": ({"model_kwargs": {"not_a_timm_kwarg": 1}}, "not_a_timm_kwarg"),
    "kwarg of the wrong type": ({"model_kwargs": {"conv_mlp": "yes"}}, "conv_mlp"),
    "kwargs not a mapping": ({"model_kwargs": ["conv_mlp"]}, "model_kwargs"),
    "huge depths": ({"model_kwargs": {"depths": [10**9, 3, 9, 3]}}, "depths"),
    "string num_classes": ({"num_classes": "3"}, "num_classes"),
    "bool num_classes": ({"num_classes": True}, "num_classes"),
    "hub model name": ({"model": "hf-hub:someone/something"}, "model"),
    "path model name": ({"model": "../../x"}, "model"),
    "unknown field": ({"surprise": 1}, "surprise"),
    "classes not a list": ({"classes": "abc"}, "classes"),
    "preprocessing size a string": ({"preprocessing": {"input_size": "big"}}, "input_size"),
    "preprocessing mean of 2": ({"preprocessing": {"mean": [0.5, 0.5]}}, "mean"),
    "preprocessing interpolation": ({"preprocessing": {"interpolation": "magic"}}, "interpolation"),
}


@pytest.mark.parametrize("embedded", [False, True], ids=["sidecar", "safetensors-metadata"])
@pytest.mark.parametrize("case", list(BAD_METADATA), ids=list(BAD_METADATA))
def test_checkpoint_metadata_is_checked_against_the_schema(case, embedded, good_meta, tmp_path, monkeypatch):
    import timm.models._factory as timm_factory

    from dogbreeds.models.factory import load_run

    change, field = BAD_METADATA[case]
    marker = tmp_path / "marker.pth"
    meta = json.loads(json.dumps({**good_meta, **change}).replace("MARKER", str(marker)))
    path = tiny_checkpoint(tmp_path / "run" / "checkpoints", meta, embedded=embedded)
    opened = []
    monkeypatch.setattr(timm_factory, "load_checkpoint", lambda *a, **k: opened.append(a))
    with pytest.raises(WeightsError) as info:
        load_run(tmp_path / "run")
    message = str(info.value)
    assert field in message and str(path.with_suffix(".json") if not embedded else path) in message
    assert not opened and not marker.exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", "\"a string\"", "{" * 100000],
                         ids=["bad-json", "a-list", "a-string", "nesting-bomb"])
def test_malformed_sidecar_is_a_clear_cli_error(text, tmp_path, capsys, hostile_photo):
    tiny_checkpoint(tmp_path / "run" / "checkpoints", None, sidecar_text=text)
    rc, err = cli("predict", str(tmp_path / "run"), str(hostile_photo), capsys=capsys)
    assert rc == 2 and "best.json" in err and "Traceback" not in err


def test_saving_refuses_kwargs_a_checkpoint_may_not_carry(tmp_path):
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    model = create_model("test_convnext", num_classes=2)
    model.dogbreeds_kwargs = {"checkpoint_path": str(tmp_path / "x.pth")}
    with pytest.raises(WeightsError, match="checkpoint_path"):
        save_model_checkpoint(model, tmp_path / "best.safetensors", ClassInfo(("n1-a", "n2-b")))
    assert not (tmp_path / "best.safetensors").exists()


def test_a_valid_checkpoint_still_loads(good_meta, tmp_path):
    """The schema passes what save_model_checkpoint writes (real weights, not the tiny stand-in)."""
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model, load_run

    model = create_model("test_convnext", num_classes=3, drop_path_rate=0.1)
    save_model_checkpoint(model, tmp_path / "run" / "checkpoints" / "best.safetensors", ClassInfo(("n1-a", "n2-b", "n3-c")))
    loaded = load_run(tmp_path / "run")
    assert loaded.model.dogbreeds_kwargs == {"drop_path_rate": 0.1} and loaded.classes.breed_ids[2] == "n3-c"


# ---------------------------------------------------------------- 3: declared sizes vs bytes

@pytest.fixture(scope="module")
def size_cases(tmp_path_factory) -> dict[str, Path]:
    return hostile.all_size_cases(tmp_path_factory.mktemp("sizes"))


def _size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _measure(*paths: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "_weights_measure.py"), *map(str, paths)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters that import torch and timm: 20-50 s on a loaded 2-core machine
def test_tiny_files_that_declare_huge_tensors_cost_little_to_refuse(size_cases):
    """Each case is under 1 MB and declares from 32 MiB to 4 TiB. Refusing all of them, in one
    process, peaks at most 200 MB above a process that only imported the loaders, and each
    refusal takes under 2 s (the first one includes no imports: the baseline did them)."""
    assert all(_size_of(p) < 1_000_000 for p in size_cases.values())
    baseline = _measure()
    measured = _measure(*size_cases.values())
    names = {str(p): name for name, p in size_cases.items()}
    rows = [(names[r["path"]], r["outcome"], r["seconds"]) for r in measured["results"]]
    print(f"\nbaseline peak RSS {baseline['peak_rss_mb']} MB; after refusing all: {measured['peak_rss_mb']} MB")
    for name, outcome, seconds in rows:
        print(f"  {name:<34} {outcome:<14} {seconds:6.3f} s")
    assert all(r["outcome"] == "WeightsError" for r in measured["results"]), measured["results"]
    assert all(r["seconds"] <= 2.0 for r in measured["results"]), rows
    assert measured["peak_rss_mb"] - baseline["peak_rss_mb"] <= 200, (baseline, measured["peak_rss_mb"])


@pytest.mark.parametrize("name, words", [
    ("h5 unwritten chunks 6.8 GiB", ["6.8 GiB declared", "kernel:0"]),
    ("h5 2^40 elements", ["4.0 TiB declared"]),
    ("h5 gzip bomb 64 MiB", ["compressed datasets", "64.0 MiB declared"]),
    ("legacy torch 2^40 elements", ["tensor storages", "4.0 TiB declared"]),
    ("torch zip bomb 32 MiB", ["zip archive", "32.0 MiB declared"]),
    ("torch stride-0 view 2^40 elements", ["view of a smaller storage", "4.0 TiB declared"]),
    ("hf hidden size 10^6", ["config.json", "hidden_sizes"]),
    ("hf hidden size 4096", ["do not fit convnext_tiny"]),
    ("hf depth 10^9 from keys", ["stage layout", "depths"]),
    ("safetensors 2^40 elements", ["corrupt or truncated"]),
])
def test_each_size_refusal_says_what_was_declared(name, words, size_cases):
    from dogbreeds.models.factory import create_model

    with pytest.raises(WeightsError) as info:
        create_model(None, weights=size_cases[name])
    message = str(info.value)
    assert str(size_cases[name]) in message and all(w in message for w in words), message


def test_a_real_compressed_h5_still_loads(tmp_path):
    """Compression itself is allowed: weights that are real numbers compress little."""
    import h5py
    import numpy as np

    from dogbreeds.models.formats.keras_h5 import read_keras_file

    path = tmp_path / "w.h5"
    values = np.random.default_rng(0).standard_normal((3, 3, 3, 16)).astype("f4")
    with h5py.File(path, "w") as f:
        hostile._tiny_h5_layer(f).create_dataset("Conv1/kernel:0", data=values, compression="gzip")
    [layer] = read_keras_file(path).layers
    assert np.array_equal(layer.weights["kernel"], values)


# ---------------------------------------------------------------- 5: pickled code

@pytest.mark.parametrize("writer", ["torch.save", "legacy-torch.save", "protocol-2", "protocol-4", "protocol-5"])
def test_pickled_code_is_recognised_by_what_it_imports(writer, tmp_path):
    import torch

    from dogbreeds.models.factory import create_model

    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.zeros(2)}, "trap": hostile.Payload(marker)}
    path = tmp_path / "model.pth"
    if writer.endswith("torch.save"):
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch.save")
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(writer[-1])))
    with pytest.raises(WeightsError) as info:
        create_model(None, weights=path)
    message = str(info.value)
    assert "carries code" in message and "will not be loaded" in message and "open" in message
    assert "weights_only" not in message and not marker.exists()


def test_the_refusal_does_not_depend_on_torchs_wording(tmp_path, monkeypatch):
    """Whatever torch says (its text changes between versions), the opcodes decide: code in
    the file -> "carries code"; a clean but damaged file -> "corrupt", never "code"."""
    import torch

    from dogbreeds.models.factory import create_model

    def load(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. unsupported GLOBAL posix.system is blocked; "
                                     "re-running torch.load with weights_only set to False will likely succeed")

    code = hostile.torch_zip_with_code(tmp_path, tmp_path / "pwned")
    clean = tmp_path / "clean.pth"
    torch.save({"w": torch.zeros(3)}, clean)
    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(WeightsError, match="carries code") as info:
        create_model(None, weights=code)
    assert "weights_only" not in str(info.value)
    with pytest.raises(WeightsError, match="corrupt") as info:
        create_model(None, weights=clean)
    assert "code" not in str(info.value) and "weights_only" not in str(info.value)


def test_predict_on_a_file_with_code_exits_2(tmp_path, capsys, hostile_photo):
    path = hostile.torch_zip_with_code(tmp_path, tmp_path / "pwned")
    rc, err = cli("predict", str(path), str(hostile_photo), capsys=capsys)
    assert rc == 2 and str(path) in err and "Traceback" not in err and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- 8: JSON of the wrong shape

def _wrong_shape_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    tensors = hostile.hf_tensors_bytes()
    pre = {"model_type": "convnext"}
    return {
        "keras model_config a list": (hostile.h5_model_config_list(folder), "model_config"),
        "keras epsilon a string": (hostile.h5_epsilon_string(folder), "epsilon"),
        "hf config.json a list": (hostile.hf_folder(folder / "a", [1, 2]), "config.json"),
        "hf config depths a string": (hostile.hf_folder(folder / "b", {**pre, "depths": "3339", "hidden_sizes": [1]},
                                                        {"model.safetensors": tensors}), "depths"),
        "hf preprocessor size a string": (hostile.hf_folder(folder / "c", pre, {
            "model.safetensors": tensors, "preprocessor_config.json": b'{"size": "big"}'}), "size"),
        "hf preprocessor mean a string": (hostile.hf_folder(folder / "d", pre, {
            "model.safetensors": tensors, "preprocessor_config.json": b'{"image_mean": "red"}'}), "mean"),
        "hf preprocessor not JSON": (hostile.hf_folder(folder / "e", pre, {
            "model.safetensors": tensors, "preprocessor_config.json": b"{oops"}), "preprocessor_config.json"),
        "hf shard index weight_map a list": (hostile.hf_folder(folder / "f", pre, {
            "model.safetensors.index.json": b'{"weight_map": ["x"]}'}), "weight_map"),
    }


def test_json_of_the_wrong_shape_is_a_clear_error(tmp_path):
    from dogbreeds.models.factory import create_model

    for name, (path, field) in _wrong_shape_cases(tmp_path).items():
        with pytest.raises(WeightsError) as info:
            create_model(None, weights=path)
        assert field in str(info.value) and str(path) in str(info.value), (name, str(info.value))


# ---------------------------------------------------------------- 11: FIFOs, sockets, devices

def test_a_fifo_as_weights_fails_at_once_and_never_blocks(tmp_path):
    """In a thread with a deadline: if the loader opened the FIFO it would block; the test then
    opens the write end itself to free it, and fails."""
    from dogbreeds.models.factory import create_model

    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_raises(create_model, None, weights=fifo)), daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("loading a FIFO blocked")
    assert isinstance(outcome[0], WeightsError) and "FIFO" in str(outcome[0]) and str(fifo) in str(outcome[0])


def _raises(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc
    return None


def test_predict_on_a_fifo_exits_2_at_once(tmp_path, hostile_photo):
    fifo = tmp_path / "best.safetensors"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "dogbreeds.cli", "predict", str(fifo), str(hostile_photo)],
                          capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert done.returncode == 2 and "FIFO" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_sockets_devices_and_fifos_inside_folders_are_refused(tmp_path):
    from dogbreeds.models.factory import create_model

    sock_path = tmp_path / "sock.safetensors"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        with pytest.raises(WeightsError, match="socket"):
            create_model(None, weights=sock_path)
    finally:
        server.close()
    with pytest.raises(WeightsError, match="character device"):
        create_model(None, weights="/dev/zero")
    folder = hostile.hf_folder(tmp_path / "hf", {"model_type": "convnext"})
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(WeightsError, match="FIFO"):
        create_model(None, weights=folder)
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    os.mkfifo(run / "best.json")
    with pytest.raises(DogbreedsError, match="FIFO"):
        from dogbreeds.models.factory import load_run

        tiny_checkpoint(run, None, embedded=True, sidecar_text="{}")
        load_run(run.parent)


# ---------------------------------------------------------------- 12: shard paths stay inside

SECRET = b"SECRET-BYTES-of-a-file-outside"


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "link.safetensors", "sub/../../outside.safetensors"])
@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_shard_index_paths_are_confined_to_the_folder(entry, index, tmp_path):
    from dogbreeds.models.factory import create_model

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(SECRET)
    folder = hostile.hf_folder(tmp_path / "hf", {"model_type": "convnext"})
    (folder / "link.safetensors").symlink_to(outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    (folder / index).write_text(json.dumps({"weight_map": {"convnext.layernorm.weight": entry}}))
    with pytest.raises(WeightsError) as info:
        create_model(None, weights=folder)
    message = str(info.value)
    assert "outside the folder" in message and "SECRET" not in message, message


def test_weight_files_that_are_symlinks_out_of_the_folder_are_refused(tmp_path):
    from dogbreeds.models.factory import create_model

    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(SECRET)
    folder = hostile.hf_folder(tmp_path / "hf", {"model_type": "convnext"})
    (folder / "pytorch_model.bin").symlink_to(outside)
    with pytest.raises(WeightsError, match="outside the folder") as info:
        create_model(None, weights=folder)
    assert "SECRET" not in str(info.value)


def test_an_unrecognised_file_is_described_not_quoted(tmp_path):
    from dogbreeds.models.factory import create_model

    path = tmp_path / "weights.pth"
    path.write_bytes(SECRET)
    with pytest.raises(WeightsError, match="starts with text") as info:
        create_model(None, weights=path)
    assert "SECRET" not in str(info.value)


def test_a_hugging_face_cache_snapshot_may_link_to_its_blobs(tmp_path):
    """huggingface_hub's cache keeps files in blobs/ and symlinks snapshots/<rev>/<name> to them."""
    from dogbreeds.models.safety import confined_file

    repo = tmp_path / "models--someone--convnext"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"x")
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "abc123")
    assert confined_file(snapshot, "model.safetensors", "weights file") == snapshot / "model.safetensors"
    (snapshot / "evil").symlink_to(tmp_path)
    with pytest.raises(WeightsError, match="outside the folder"):
        confined_file(snapshot, "evil", "weights file")


# ---------------------------------------------------------------- 13: predict on other files

@pytest.mark.parametrize("kind, words", [
    ("torch-zip", "a PyTorch file"),
    ("pickle", "legacy PyTorch file"),
    ("h5", "a Keras HDF5 file"),
    ("plain-safetensors", "without dogbreeds metadata"),
    ("text", "not a recognised weights file"),
])
def test_predict_on_a_file_that_is_not_a_checkpoint_says_what_it_is(kind, words, tmp_path, capsys, hostile_photo):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / {"h5": "model.h5", "plain-safetensors": "model.safetensors"}.get(kind, "model.pth")
    if kind == "torch-zip":
        torch.save({"w": torch.zeros(2)}, path)
    elif kind == "pickle":
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    elif kind == "h5":
        hostile.h5_model_config_list(tmp_path).rename(path)
    elif kind == "plain-safetensors":
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        path.write_text("hello\n")
    rc, err = cli("predict", str(path), str(hostile_photo), capsys=capsys)
    assert rc == 2 and words in err and str(path) in err and "Traceback" not in err, err
    assert "header too large" not in err
    if kind != "text":
        assert "run directory" in err and ".onnx" in err and "--weights" in err
