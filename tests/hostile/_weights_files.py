"""Hostile weight files, written at test time (tests/hostile/test_weights.py and its subprocess
_weights_measure.py). Each writer takes a folder and returns the path to hand to the loader;
every file is small (the largest is under 300 KB) and is written in well under a second."""
from __future__ import annotations

import builtins
import io
import json
import struct
import zipfile
from pathlib import Path


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _tiny_h5_layer(f, name: str = "Conv1"):
    """A legacy Keras weights layout with one layer; returns the layer group."""
    f.attrs["layer_names"] = [name.encode()]
    group = f.create_group(name)
    group.attrs["weight_names"] = [f"{name}/kernel:0".encode()]
    return group


def h5_unwritten_chunks(folder: Path) -> Path:
    """8.9 KB: a chunked dataset of 6.8 GB whose chunks were never written (HDF5 returns the fill value)."""
    import h5py

    path = folder / "unwritten_chunks.h5"
    with h5py.File(path, "w") as f:
        _tiny_h5_layer(f).create_dataset("Conv1/kernel:0", shape=(3, 3, 3, 2**26), dtype="f4", chunks=(3, 3, 3, 1024))
    return path


def h5_unwritten_contiguous(folder: Path) -> Path:
    """A contiguous dataset of 1 GiB with no storage allocated."""
    import h5py

    path = folder / "unwritten_contiguous.h5"
    with h5py.File(path, "w") as f:
        _tiny_h5_layer(f).create_dataset("Conv1/kernel:0", shape=(2**14, 2**14), dtype="f4")
    return path


def h5_two_to_the_40(folder: Path) -> Path:
    """A dataset of 2^40 float32 elements (4 TiB) in a file of a few KB."""
    import h5py

    path = folder / "two_to_the_40.h5"
    with h5py.File(path, "w") as f:
        _tiny_h5_layer(f).create_dataset("Conv1/kernel:0", shape=(2**10, 2**10, 2**10, 2**10), dtype="f4",
                                         chunks=(1, 1, 64, 1024))
    return path


def h5_compression_bomb(folder: Path) -> Path:
    """64 MiB of zeros, gzip-compressed into about 70 KB."""
    import h5py
    import numpy as np

    path = folder / "compression_bomb.h5"
    with h5py.File(path, "w") as f:
        ds = _tiny_h5_layer(f).create_dataset("Conv1/kernel:0", shape=(2**24,), dtype="f4", chunks=(2**20,),
                                              compression="gzip", compression_opts=1)
        zeros = np.zeros(2**20, dtype="f4")
        for start in range(0, 2**24, 2**20):
            ds[start:start + 2**20] = zeros
    return path


def h5_model_config_list(folder: Path) -> Path:
    """A legacy full-model file whose model_config is a JSON list."""
    import h5py

    path = folder / "model_config_list.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps([{"class_name": "Functional"}])
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = []
    return path


def h5_epsilon_string(folder: Path) -> Path:
    """A model_config whose BatchNormalization epsilon is a string."""
    import h5py

    config = {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "BatchNormalization", "config": {"name": "bn", "epsilon": "tiny"}}]}}
    path = folder / "epsilon_string.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.create_group("model_weights").attrs["layer_names"] = []
    return path


def safetensors_two_to_the_40(folder: Path) -> Path:
    """A safetensors header declaring a (2^20, 2^20) tensor over 16 bytes of data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    path = folder / "two_to_the_40.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


def _legacy_torch_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def legacy_torch_huge_storage(folder: Path, elements: int = 2**40) -> Path:
    """A legacy (pre-zip) torch.save file whose one storage declares `elements` floats."""
    data = _legacy_torch_bytes()
    numel = b"K\x04"  # BININT1 4: the storage's numel, right after its location string 'cpu'
    location = data.index(b"X\x03\x00\x00\x00cpu")
    at = data.index(numel, location)
    big = b"\x8a\x08" + elements.to_bytes(8, "little")  # LONG1
    path = folder / f"legacy_{elements}.pth"
    path.write_bytes(data[:at] + big + data[at + len(numel):])
    return path


def torch_zip_bomb(folder: Path) -> Path:
    """A torch.save zip whose tensor entry is 32 MiB of deflated zeros (about 32 KB on disk)."""
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    path = folder / "zip_bomb.pth"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w", force_zip64=True) as out:
                    chunk = bytes(1 << 20)
                    for _ in range(32):
                        out.write(chunk)
            else:
                dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_STORED)
    return path


def torch_zip_stride_zero(folder: Path) -> Path:
    """A torch.save zip holding one float, viewed (stride 0) as 2^40 elements of a timm-like key."""
    import torch

    path = folder / "stride_zero.pth"
    torch.save({"stem.0.weight": torch.zeros(1).expand(2**10, 2**10, 2**10, 2**10)}, path)
    return path


def torch_zip_with_code(folder: Path, marker: Path) -> Path:
    import torch

    path = folder / "code.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "trap": Payload(marker)}, path)
    return path


def hf_folder(folder: Path, config, files: dict | None = None) -> Path:
    """A transformers-like folder: config.json (any JSON value) and the files given (name -> bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return folder


def hf_tensors_bytes() -> bytes:
    """A tiny transformers-ConvNext-named safetensors file (two 1-element tensors)."""
    import torch
    from safetensors.torch import save

    return save({"convnext.embeddings.patch_embeddings.weight": torch.zeros(1),
                 "convnext.layernorm.weight": torch.zeros(1)})


def hf_huge_hidden_size(folder: Path, hidden: int) -> Path:
    """About 300 bytes: a config declaring a ConvNeXt whose last stage is `hidden` wide."""
    return hf_folder(folder, {"model_type": "convnext", "depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, hidden]},
                     {"model.safetensors": hf_tensors_bytes()})


def hf_huge_depth(folder: Path) -> Path:
    """Tensor names promising a stage of a billion blocks (a converter reading the layout from keys)."""
    import torch
    from safetensors.torch import save

    sd = {"convnext.embeddings.patch_embeddings.weight": torch.zeros(1), "convnext.layernorm.weight": torch.zeros(1),
          "convnext.encoder.stages.0.layers.0.dwconv.weight": torch.zeros(8, 1, 7, 7),
          "convnext.encoder.stages.0.layers.999999999.dwconv.weight": torch.zeros(8, 1, 7, 7)}
    return hf_folder(folder, {"model_type": "convnext"}, {"model.safetensors": save(sd)})


def all_size_cases(folder: Path) -> dict[str, Path]:
    """Every tiny-file-declares-huge case, by name (the subprocess measures each)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "h5 unwritten chunks 6.8 GiB": h5_unwritten_chunks(folder),
        "h5 unwritten contiguous 1 GiB": h5_unwritten_contiguous(folder),
        "h5 2^40 elements": h5_two_to_the_40(folder),
        "h5 gzip bomb 64 MiB": h5_compression_bomb(folder),
        "safetensors 2^40 elements": safetensors_two_to_the_40(folder),
        "legacy torch 2^40 elements": legacy_torch_huge_storage(folder, 2**40),
        "legacy torch 2^31 elements": legacy_torch_huge_storage(folder, 2**31),
        "torch zip bomb 32 MiB": torch_zip_bomb(folder),
        "torch stride-0 view 2^40 elements": torch_zip_stride_zero(folder),
        "hf hidden size 4096": hf_huge_hidden_size(folder / "hf_4096", 4096),
        "hf hidden size 10^6": hf_huge_hidden_size(folder / "hf_1e6", 10**6),
        "hf depth 10^9 from keys": hf_huge_depth(folder / "hf_depth"),
    }
