"""What machine this is: the facts that decide which engine and precision run fastest here.

`machine_profile()` returns a JSON-ready dict:

    cpu        {"model", "vendor", "cores" (physical, usable by this process), "logical",
                "flags": {isa: bool} for the ISA extensions that matter for inference}
    gpu        [] or [{"name", "compute_capability": "9.0", "memory_gib", "bf16"}] (CUDA devices)
    libraries  {"torch", "onnxruntime", "openvino", "timm", "numpy", ...}: installed versions, or None
    platform   {"system", "machine", "python"}

`profile_key()` is a short stable hash of the parts that change which engine wins (CPU model,
ISA flags, cores, GPUs, versions of the runtimes): the "auto" probe is cached under it, and
`dogbreeds bench` records it with every result.

Detected, never assumed: ISA flags come from /proc/cpuinfo on Linux (the kernel's view, which
also says what a hypervisor passes through), else from torch's own CPU-capability probe. GPUs are
queried through torch only when an NVIDIA driver is present (or off Linux), so that the
torch-free path stays torch-free on a CPU-only Linux machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# ISA extensions that change which engine/precision is fastest: name -> /proc/cpuinfo flag
ISA_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "avx_vnni": "avx_vnni",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
    "amx_tile": "amx_tile",
    "neon": "asimd",  # aarch64: Advanced SIMD
    "sve": "sve",
    "arm_bf16": "bf16",
}
LIBRARIES = ("torch", "onnxruntime", "openvino", "timm", "numpy", "onnx")
# the libraries whose version changes which engine wins (in the key); numpy/timm/onnx do not
KEY_LIBRARIES = ("torch", "onnxruntime", "openvino")


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo ({} where there is none)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    fields: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


ARM_ONLY = ("neon", "sve", "arm_bf16")


def parse_flags(flag_text: str, arm: bool = False) -> dict[str, bool]:
    """{isa: present} from a /proc/cpuinfo "flags" (x86) or "Features" (arm) line."""
    present = set(flag_text.split())
    return {name: flag in present and (arm or name not in ARM_ONLY) for name, flag in ISA_FLAGS.items()}


def _torch_capability_flags() -> dict[str, bool]:
    """ISA flags from torch's CPU probe (off Linux): "AVX512" / "AVX2" / "DEFAULT"."""
    flags = dict.fromkeys(ISA_FLAGS, False)
    try:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # torch missing or too old: report nothing rather than guess
        return flags
    flags["avx2"] = capability in ("AVX2", "AVX512")
    flags["avx512f"] = capability == "AVX512"
    try:
        flags["amx_bf16"] = bool(torch._C._cpu._is_amx_tile_supported())
    except Exception:
        pass
    return flags


def load_average() -> str:
    """The 1, 5 and 15-minute load averages as "0.6 0.8 1.8": printed beside every measurement, since
    on a shared machine they say how much other work the figures saw."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def physical_cores() -> int:
    """Cores this process may use, counting SMT siblings once (they share one core's FMA units)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def cpu_profile() -> dict:
    info = _cpuinfo()
    flag_text = info.get("flags") or info.get("features") or ""
    arm = platform.machine().lower() in ("aarch64", "arm64")
    flags = parse_flags(flag_text, arm=arm) if flag_text else _torch_capability_flags()
    model = info.get("model name") or info.get("hardware") or platform.processor() or platform.machine()
    vendor = info.get("vendor_id") or info.get("cpu implementer") or ""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"model": model, "vendor": vendor, "cores": physical_cores(), "logical": logical, "flags": flags}


def has_native_bf16(flags: dict[str, bool]) -> bool:
    """bf16 matrix products in hardware (AVX512-BF16 or AMX-BF16, or Arm BF16): where bf16 can beat fp32."""
    return bool(flags.get("amx_bf16") or flags.get("avx512_bf16") or flags.get("arm_bf16"))


def has_fast_int8(flags: dict[str, bool]) -> bool:
    """int8 dot products in hardware (VNNI or AMX-INT8)."""
    return bool(flags.get("amx_int8") or flags.get("avx512_vnni") or flags.get("avx_vnni"))


def _nvidia_driver_present() -> bool:
    if sys.platform != "linux":
        return True  # no cheap check: ask torch
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def parse_nvidia_smi(text: str) -> list[dict]:
    """GPUs from `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader,nounits`."""
    devices = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        name, capability, memory = parts[:3]
        try:
            major = int(capability.split(".")[0])
        except ValueError:
            major, capability = 0, "unknown"
        try:
            memory_gib = round(float(memory) / 1024, 1)  # MiB
        except ValueError:
            memory_gib = None
        devices.append({"name": name, "compute_capability": capability, "memory_gib": memory_gib, "bf16": major >= 8})
    return devices


def _nvidia_smi() -> list[dict] | None:
    """GPUs as the driver's tool lists them (no torch import), or None when it cannot be asked."""
    import shutil
    import subprocess

    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        result = subprocess.run([tool, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else None


def _torch_gpus() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1), "bf16": props.major >= 8})
    return devices


def gpu_profile() -> list[dict]:
    """CUDA GPUs ([] when none): from torch when it is imported already, else from nvidia-smi (so
    the torch-free prediction path stays torch-free on a GPU machine too), else from torch."""
    if not _nvidia_driver_present():
        return []
    try:
        if "torch" not in sys.modules:
            listed = _nvidia_smi()
            if listed is not None:
                return listed
        return _torch_gpus()
    except Exception:  # a broken driver or torch build: no usable GPU
        return []


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=1)
def _profile() -> str:
    profile = {
        "cpu": cpu_profile(),
        "gpu": gpu_profile(),
        "libraries": library_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine(),
                     "python": platform.python_version()},
    }
    return json.dumps(profile, sort_keys=True)


def machine_profile() -> dict:
    """This machine (see the module doc); computed once per process, a fresh copy each call."""
    return json.loads(_profile())


def profile_key(profile: dict | None = None) -> str:
    """A 12-hex-digit name for the machine kind: same CPU model, ISA, cores, GPUs and runtime versions
    -> the same key, on any day and in any process."""
    profile = profile or machine_profile()
    cpu = profile.get("cpu", {})
    stable = {
        "cpu": [cpu.get("model"), cpu.get("cores"), sorted(k for k, v in (cpu.get("flags") or {}).items() if v)],
        "gpu": [[g.get("name"), g.get("compute_capability")] for g in profile.get("gpu") or []],
        "libraries": {k: (profile.get("libraries") or {}).get(k) for k in KEY_LIBRARIES},
        "machine": (profile.get("platform") or {}).get("machine"),
    }
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:12]


def describe(profile: dict | None = None) -> str:
    """One line for logs and notes, e.g. "AMD EPYC, 2 cores, avx2 fma; no GPU"."""
    profile = profile or machine_profile()
    cpu = profile["cpu"]
    flags = " ".join(k for k, v in cpu["flags"].items() if v) or "no listed ISA extensions"
    gpus = ", ".join(f"{g['name']} (sm {g['compute_capability']})" for g in profile["gpu"]) or "no GPU"
    return f"{cpu['model']}, {cpu['cores']} cores, {flags}; {gpus}"
