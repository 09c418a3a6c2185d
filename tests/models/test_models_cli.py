"""`dogbreeds models`: measured cost against the ConvNeXt paper, and a light CLI import."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from dogbreeds.cli import main
from dogbreeds.models.flops import count_gmacs, count_params_m


def test_json_reproduces_the_paper(capsys):
    assert main(["models", "--json", "--names", "convnext_tiny,convnext_base"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert (round(rows["convnext_tiny"]["params_m"], 1), round(rows["convnext_tiny"]["gmacs"], 1)) == (28.6, 4.5)
    assert (round(rows["convnext_base"]["params_m"], 1), round(rows["convnext_base"]["gmacs"], 1)) == (88.6, 15.4)
    assert rows["convnext_tiny"]["paper"] == {"params_m": 28.6, "gmacs": 4.5, "matches": True}
    assert "fb_in22k_ft_in1k" in rows["convnext_base"]["pretrained_tags"]


def test_table_with_paper_columns(capsys):
    assert main(["models", "--paper", "--names", "convnext_xlarge,mobilenetv2_100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "params", "(M)"]
    xl = next(line for line in lines if line.startswith("convnext_xlarge"))
    assert "350.2" in xl and "60.9" in xl and " yes " in xl
    mnv2 = next(line for line in lines if line.startswith("mobilenetv2_100"))
    assert "3.5" in mnv2 and "ra_in1k" in mnv2


def test_unknown_name_is_a_user_error(capsys):
    assert main(["models", "--names", "convnext_tinyy"]) == 2
    assert "convnext_tiny" in capsys.readouterr().err


def test_meta_device_counts_equal_real_counts():
    real = timm.create_model("mobilenetv2_050")
    with torch.device("meta"):
        meta = timm.create_model("mobilenetv2_050")
    assert count_params_m(meta) == count_params_m(real)
    assert count_gmacs(meta, 160) == pytest.approx(count_gmacs(real, 160), rel=0, abs=0)
    # one 3x3 conv 3->8 at 32x32, stride 1, pad 1: 8*3*9 MACs per pixel
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_gmacs(conv, 32) * 1e9 == 8 * 3 * 9 * 32 * 32


def test_models_cli_does_not_import_torch():
    code = "import sys, argparse, dogbreeds.models.cli as c; c.register(argparse.ArgumentParser().add_subparsers()); " \
           "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
