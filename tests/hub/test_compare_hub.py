"""`dogbreeds compare` WITHOUT --no-pretrained, its pretrained weights coming from the loopback hub
through huggingface_hub and timm: the main job as a user runs it, on a small subset."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dogbreeds.cli import main
from dogbreeds.evaluate import compare

PRETRAINED = ("convnext_tiny.fb_in22k_ft_in1k", "mobilenetv2_100.ra_in1k")


def dogbreeds(*argv: str, env: dict) -> subprocess.CompletedProcess:
    # A child process: HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE reach huggingface_hub the way
    # they do for a user, read at import time.
    return subprocess.run([sys.executable, "-m", "dogbreeds.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_compare_trains_from_hub_weights_and_reruns_offline(hub, mini_root, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(mini_root), "--out", str(out), "--models", ",".join(PRETRAINED),
            "--quick", "--epochs", "1", "--input-size", "32", "--breeds", "top3", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in PRETRAINED:  # written before the clock starts: a real hub answers a HEAD at once
        hub.files_of("timm/" + name)
    done = dogbreeds(*argv, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in PRETRAINED:
        repo = "timm/" + name
        blob = hub.files_of(repo)["model.safetensors"].sha256
        assert [r.path for r in hub.calls("GET", "cdn", blob)] == ["/" + blob], repo  # downloaded once
        assert (tmp_path / "hf-cache" / f"models--timm--{name}" / "snapshots" / hub.commits[repo]).is_dir()
    report = (out / "report.md").read_text()
    assert "pretrained timm weights (fb_in22k_ft_in1k)" in report and "pretrained timm weights (ra_in1k)" in report

    # The same command offline: the cache serves the weights, the finished runs are reused.
    hub.requests.clear()
    again = dogbreeds(*argv, env={**env, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert hub.requests == []
    assert again.stdout.count("finished run found") == len(PRETRAINED)


@pytest.mark.slow
def test_the_default_model_list_resolves_through_the_hub(hub, tmp_path):
    """Every pretrained tag among compare's defaults (convnext_base included) downloads from the
    hub, before any training starts: what `dogbreeds compare --data D --out O` does first."""
    plans = compare.plan_models(compare.CompareOptions(data="d", out=str(tmp_path)))
    tagged = [p.model for p in plans if p.pretrained]
    assert "convnext_base.fb_in22k_ft_in1k" in tagged and "convnext_tiny.fb_in22k_ft_in1k" in tagged
    for name in tagged:  # written before the client asks: a real hub answers a HEAD at once
        hub.files_of("timm/" + name)
    compare.check_pretrained_available(plans)
    for name in tagged:
        blob = hub.files_of("timm/" + name)["model.safetensors"].sha256
        assert hub.calls("GET", "cdn", blob), name


def test_compare_without_a_hub_fails_within_5_s_before_training(point_hub, closed_port, mini_root, tmp_path, capsys):
    # torch, timm and matplotlib take seconds to import on a busy machine: the limit is for the
    # hub, so the modules compare imports before it asks the hub are imported first.
    import dogbreeds.evaluate.report  # noqa: F401
    import dogbreeds.models.factory  # noqa: F401
    import dogbreeds.train.loop  # noqa: F401

    point_hub(f"http://127.0.0.1:{closed_port}", tmp_path / "empty-cache")
    started = time.perf_counter()
    code = main(["compare", "--data", str(mini_root), "--out", str(tmp_path / "cmp"), "--quick"])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 5.0, (code, elapsed, err)
    assert "unreachable" in err and "--weights convnext_base=PATH" in err and "--no-pretrained" in err
    assert not (tmp_path / "cmp" / "runs").exists()
