"""`dogbreeds predict | explain | export` through the real CLI entry point."""
from __future__ import annotations

import json

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


def test_onnx_predict_never_imports_torch(convnext_onnx, photos, predict_without_torch):
    answer = predict_without_torch(convnext_onnx, photos[0])
    assert answer["image"] == str(photos[0]) and len(answer["top"]) == 5


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
