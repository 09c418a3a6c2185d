"""`dogbreeds predict | explain | export` through the real CLI entry point."""
from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from dogbreeds.cli import main


def test_predict_json_lines_and_exit_status(convnext_run, photos, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 garbage")
    rc = main(["predict", str(convnext_run), str(photos[0]), str(bad), str(photos[1]), "--json", "--top", "3"])
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 1  # one image failed, the others were answered
    assert [line["image"] for line in lines] == [str(photos[0]), str(bad), str(photos[1])]
    assert len(lines[0]["top"]) == 3 and isinstance(lines[0]["low_confidence"], bool)
    assert set(lines[1]) == {"image", "error"} and "broken.jpg" in lines[1]["error"]
    assert "1 of 3 images could not be read" in out.err


def test_predict_human_table_for_a_folder(convnext_run, photos, capsys):
    rc = main(["predict", str(convnext_run), str(photos[0].parent), "--top", "2", "--threshold", "0.9"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].split() == ["IMAGE", "#", "BREED", "PROB"]
    assert "not sure — maybe not a dog" in out
    assert photos[0].name in out and "%" in out


def test_predict_with_a_missing_model_is_a_clear_error(tmp_path, photos, capsys):
    assert main(["predict", str(tmp_path / "nope"), str(photos[0])]) == 2
    assert "nope" in capsys.readouterr().err


def test_explain_writes_an_overlay_the_size_of_the_photo(convnext_run, photos, tmp_path, capsys):
    # The mini set's photos are 224x224; a wide crop checks the paste-back of the centre crop.
    wide = tmp_path / "wide.jpg"
    Image.open(photos[2]).crop((0, 40, 224, 170)).save(wide, quality=95)
    out = tmp_path / "heat.png"
    target = "Maltese dog"
    assert main(["explain", str(convnext_run), str(wide), "--out", str(out), "--breed", target]) == 0
    assert Image.open(out).size == (224, 130)
    assert f"Grad-CAM for {target}" in capsys.readouterr().out


# Runs in a fresh interpreter: the ONNX path must answer without ever importing torch. The
# import hook makes the first `import torch` fail loudly, with a traceback naming the module
# that tried, instead of only noticing afterwards.
NO_TORCH_SCRIPT = """
import sys, json
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the ONNX prediction path imported torch")
sys.meta_path.insert(0, NoTorch())
from dogbreeds.cli import main
rc = main(["predict", sys.argv[1], sys.argv[2], "--json"])
assert "torch" not in sys.modules
print("RC", rc)
"""


def test_onnx_predict_never_imports_torch(convnext_onnx, photos):
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(convnext_onnx), str(photos[0])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.splitlines()[0])
    assert answer["image"] == str(photos[0]) and len(answer["top"]) == 5
    assert result.stdout.splitlines()[-1] == "RC 0"


def test_export_command_reports_the_measured_difference(convnext_run, photos, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(convnext_run), "--out", str(out), "--check-images", str(photos[0]), str(photos[1])]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "max |probability difference|" in printed and "opset 17" in printed


def test_cli_defaults_agree_with_the_library_and_bad_values_are_refused(convnext_run, photos, capsys):
    import pytest

    from dogbreeds.infer import cli
    from dogbreeds.infer.predictor import DEFAULT_LOW_CONFIDENCE_THRESHOLD

    assert cli.DEFAULT_THRESHOLD == DEFAULT_LOW_CONFIDENCE_THRESHOLD  # kept apart only to import nothing heavy
    for bad in (["--top", "0"], ["--batch-size", "-1"], ["--threshold", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(convnext_run), str(photos[0]), *bad])
        assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err
