"""`dogbreeds data check|stats` end to end, and the pluggable subcommands."""
from __future__ import annotations

import argparse
import json
import shutil
import sys

import pytest
from PIL import Image

from dogbreeds import cli
from dogbreeds.data import cli as data_cli


@pytest.fixture()
def small_stanford(mini_root, tmp_path, write_list):
    """Two breeds in the official layout; returns (root, train files, test files)."""
    root = tmp_path / "dogs"
    train, test = [], []
    for breed in ("n02115913-dhole", "n02115641-dingo"):
        shutil.copytree(mini_root / "Images" / breed, root / "Images" / breed)
        files = sorted(f"{breed}/{p.name}" for p in (root / "Images" / breed).iterdir())
        train += files[:4]
        test += files[4:]
    (root / "lists").mkdir()
    write_list(root / "lists" / "train_list.mat", train)
    write_list(root / "lists" / "test_list.mat", test)
    return root, train, test


def test_check_clean_data_exits_zero(small_stanford, capsys):
    root, _, _ = small_stanford
    assert cli.main(["data", "check", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "summary: 12 images; across splits 0 exact and 0 near-duplicate pair(s); 0 unreadable" in out


def test_check_finds_leak_and_broken_file(small_stanford, capsys, write_list):
    root, train, test = small_stanford
    images = root / "Images"
    leak = "n02115913-dhole/leaked_copy.jpg"
    shutil.copy(images / train[0], images / leak)
    shifted = "n02115641-dingo/reencoded.jpg"
    with Image.open(images / train[-1]) as image:
        image.resize((200, 200)).save(images / shifted, quality=60)
    broken = "n02115641-dingo/broken.jpg"
    (images / broken).write_bytes(b"I am not a JPEG")
    write_list(root / "lists" / "test_list.mat", test + [leak, shifted, broken])

    assert cli.main(["data", "check", str(root), "--json", "--workers", "1", "--val-fraction", "0"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 15
    [exact] = report["cross_split_exact"]
    assert {exact["first"]["split"], exact["second"]["split"]} == {"train", "test"}
    assert exact["second"]["path"].endswith("leaked_copy.jpg") or exact["first"]["path"].endswith("leaked_copy.jpg")
    near_paths = {p[k]["path"].rsplit("/", 1)[1] for p in report["cross_split_near"] for k in ("first", "second")}
    assert "reencoded.jpg" in near_paths
    [bad] = report["unreadable"]
    assert bad["path"].endswith("broken.jpg") and "text" in bad["reason"]


def test_stats_prints_table_and_writes_chart(mini_root, tmp_path, capsys):
    plot = tmp_path / "counts.png"
    assert cli.main(["data", "stats", str(mini_root), "--top", "5", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "   1* Afghan hound" in out and "   6  Great Pyrenees" in out
    assert f"chart written to {plot}" in out
    with Image.open(plot) as image:
        image.verify()


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert cli.main(["data", "stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a dataset root" in err
    with pytest.raises(SystemExit):
        cli.main(["data", "check", str(tmp_path), "--threshold", "65"])
    assert "0..64" in capsys.readouterr().err


@pytest.mark.parametrize("command, words", [("check", "phash"), ("stats", "--plot")])
def test_help(command, words, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["data", command, "--help"])
    assert info.value.code == 0 and words in capsys.readouterr().out


def test_pluggable_subcommands(monkeypatch, tmp_path):
    (tmp_path / "plugin_ok.py").write_text(
        "def register_cli(sub):\n    sub.add_parser('hello', help='says hello')\n"
    )
    (tmp_path / "plugin_broken.py").write_text("import a_dependency_that_is_not_installed\n")
    (tmp_path / "plugin_library.py").write_text("VALUE = 1\n")  # no register_cli: a pure library
    monkeypatch.syspath_prepend(str(tmp_path))

    def data_commands(modules):
        monkeypatch.setattr(data_cli, "PLUGGABLE_MODULES", modules)
        parser = argparse.ArgumentParser()
        data_cli.register(parser.add_subparsers())
        return parser

    parser = data_commands(("plugin_ok", "plugin_library", "dogbreeds.data.no_such_module"))
    assert parser.parse_args(["data", "hello"]).data_command == "hello"
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        data_commands(("plugin_broken",))
    for name in ("plugin_ok", "plugin_broken", "plugin_library"):
        sys.modules.pop(name, None)
