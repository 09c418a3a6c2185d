"""The machine profile: detected flags, a stable key that changes with what decides the engine."""
import json

from dogbreeds import machine

AMX_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
AMD_FLAGS = "fpu sse2 avx avx2 fma sha_ni"


def test_parse_flags_reads_amx_and_vnni_from_cpuinfo_text():
    amx = machine.parse_flags(AMX_FLAGS)
    assert amx["amx_bf16"] and amx["amx_int8"] and amx["avx512_bf16"] and amx["avx512_vnni"]
    assert machine.has_native_bf16(amx) and machine.has_fast_int8(amx)
    amd = machine.parse_flags(AMD_FLAGS)
    assert amd["avx2"] and not amd["avx512f"] and not amd["amx_bf16"]
    assert not machine.has_native_bf16(amd) and not machine.has_fast_int8(amd)


def test_arm_flags_only_count_on_arm():
    assert machine.parse_flags("asimd bf16 sve", arm=True)["arm_bf16"]
    assert not machine.parse_flags("bf16", arm=False)["arm_bf16"]


def test_profile_is_json_and_matches_this_process():
    profile = machine.machine_profile()
    json.dumps(profile)
    assert profile["cpu"]["cores"] >= 1 and profile["cpu"]["logical"] >= profile["cpu"]["cores"]
    assert set(machine.ISA_FLAGS) == set(profile["cpu"]["flags"])
    assert profile["libraries"]["numpy"] is not None
    assert isinstance(profile["gpu"], list)
    profile["cpu"]["model"] = "changed"  # a copy: the cached profile is not changed by callers
    assert machine.machine_profile()["cpu"]["model"] != "changed"


def test_profile_key_is_stable_and_changes_with_what_decides_the_engine():
    profile = machine.machine_profile()
    key = machine.profile_key(profile)
    assert key == machine.profile_key() and len(key) == 12
    same = json.loads(json.dumps(profile))
    same["libraries"]["numpy"] = "0.0"  # not a runtime: same key
    assert machine.profile_key(same) == key
    for change in (lambda p: p["cpu"].update(model="Intel Xeon"),
                   lambda p: p["cpu"].update(cores=p["cpu"]["cores"] + 1),
                   lambda p: p["cpu"]["flags"].update(amx_bf16=not p["cpu"]["flags"]["amx_bf16"]),
                   lambda p: p["libraries"].update(onnxruntime="0.1"),
                   lambda p: p.update(gpu=[{"name": "H100", "compute_capability": "9.0"}])):
        other = json.loads(json.dumps(profile))
        change(other)
        assert machine.profile_key(other) != key


def test_describe_names_cpu_and_gpu():
    profile = {"cpu": {"model": "Xeon", "cores": 2, "flags": {"avx2": True, "amx_bf16": True, "sve": False}},
               "gpu": [{"name": "H100", "compute_capability": "9.0"}]}
    text = machine.describe(profile)
    assert "Xeon" in text and "amx_bf16" in text and "sve" not in text and "sm 9.0" in text


def test_gpus_from_nvidia_smi_without_torch():
    text = "NVIDIA H200, 9.0, 143771\nTesla T4, 7.5, 15360\n"
    gpus = machine.parse_nvidia_smi(text)
    assert [g["name"] for g in gpus] == ["NVIDIA H200", "Tesla T4"]
    assert gpus[0]["compute_capability"] == "9.0" and gpus[0]["bf16"] and gpus[0]["memory_gib"] == 140.4
    assert not gpus[1]["bf16"]
    assert machine.parse_nvidia_smi("") == []
