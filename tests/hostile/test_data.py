"""Hostile data (issue 12, defects 6, 7, 9): every input is made here, small, at test time.

- tar archives whose symlinks chain out of the destination (`x/y -> ..`, then `x/y/z -> ..`);
- folders holding an .avif photo, a dangling symlink, a name ending in a newline, a FIFO,
  a hidden file and a text file;
- a validation split in which 4 of 12 images cannot be decoded.
Each must end in a clear error or report that names the file; nothing may be written
outside the destination and nothing may be left out silently.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreeds.cli import main
from dogbreeds.data import download
from dogbreeds.data.download import Archive, safe_extract
from dogbreeds.data.listing import display, image_extensions
from dogbreeds.data.sources import load_dataset
from dogbreeds.errors import DogbreedsError

AVIF_DECODED = ".avif" in image_extensions()


# --- tar archives ---------------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[str, str, str | bytes]]) -> Path:
    """members: (kind 'file'|'dir'|'sym', name, data or link target), written in order."""
    with tarfile.open(path, "w") as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


CHAIN = [
    ("file", "Images/first.txt", "written before the bad link"),
    ("dir", "x", ""),
    ("sym", "x/y", ".."),          # -> the destination itself: harmless alone
    ("sym", "x/y/z", ".."),        # through x/y: -> the destination's parent
    ("file", "x/y/z/escaped.txt", "should never exist"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_symlink_chain_out_of_the_destination_is_refused_before_anything_is_written(tmp_path):
    archive = _tar(tmp_path / "chain.tar", CHAIN)
    dest = tmp_path / "sandbox" / "dest"
    dest.mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(DogbreedsError, match=r"member 'x/y/z'.*outside the destination.*download it again"):
        safe_extract(archive, dest)
    assert _tree(tmp_path) == before  # nothing in dest (no staging folder either), nothing beside it


def test_tarfiles_own_filter_stopping_an_escape_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    # Were our pre-check ever to miss a case, tarfile's data filter stops it mid-way: that must not
    # surface as LinkOutsideDestinationError nor leave the members written before it.
    monkeypatch.setattr(download, "_check_member", lambda *args, **kwargs: None)
    archive = _tar(tmp_path / "chain.tar", CHAIN)
    dest = tmp_path / "sandbox" / "dest"
    dest.mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(DogbreedsError, match=r"member 'x/y/z' was stopped by tarfile's safety filter") as info:
        safe_extract(archive, dest)
    assert not isinstance(info.value, tarfile.TarError)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("members, culprit", [
    ([("sym", "a", "."), ("sym", "a/b", "../..")], "a/b"),                       # . then two levels up
    ([("dir", "d", ""), ("sym", "d/up", ".."), ("sym", "d/up/out", "../x")], "d/up/out"),
    ([("sym", "l", "m"), ("sym", "m", "l"), ("file", "l/f", "loop")], "l/f"),     # writing through a loop too
    ([("dir", "d", ""), ("sym", "d/up", ".."), ("file", "d/up/../../x", "")], "d/up/../../x"),
    ([("sym", "up", ".."), ("file", "up/evil.txt", "through a link")], "up"),
])
def test_other_link_tricks_are_refused_naming_the_member(tmp_path, members, culprit):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DogbreedsError, match=f"member {re.escape(repr(culprit))}"):
        safe_extract(_tar(tmp_path / "t.tar", members), dest)
    assert list(dest.iterdir()) == []


def test_an_archive_cut_short_leaves_nothing_half_unpacked(tmp_path):
    whole = _tar(tmp_path / "whole.tar", [("file", "Images/a.txt", "a" * 600), ("file", "Images/b.txt", "b" * 5000)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:3072])  # inside b.txt's data: its header is there, its bytes are not
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DogbreedsError, match=r"cut.tar.*(damaged|failed).*download it again"):
        safe_extract(cut, dest)
    assert list(dest.iterdir()) == []


def test_links_that_stay_inside_still_unpack(tmp_path):
    members = [("dir", "lists", ""), ("sym", "current", "lists"), ("file", "current/file_list.txt", "ok"),
               ("dir", "x", ""), ("sym", "x/y", ".."), ("sym", "x/top", "y/lists")]
    dest = tmp_path / "dest"
    dest.mkdir()
    assert safe_extract(_tar(tmp_path / "t.tar", members), dest) == ["current", "lists", "x"]
    assert (dest / "lists" / "file_list.txt").read_text() == "ok"
    assert (dest / "x" / "top" / "file_list.txt").read_text() == "ok"
    assert not any(p.name.startswith(download.UNPACK_PREFIX) for p in dest.iterdir())


def test_data_download_cli_refuses_the_chain_with_exit_2_and_no_traceback(tmp_path, monkeypatch, capsys):
    archive = _tar(tmp_path / "lists.tar", CHAIN)
    data = archive.read_bytes()
    monkeypatch.setattr(download, "ARCHIVES", (Archive("lists.tar", len(data), hashlib.sha256(data).hexdigest()),))
    dest = tmp_path / "sandbox" / "dest"
    assert main(["data", "download", "--dest", str(dest), "--from-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "member 'x/y/z'" in err and "Traceback" not in err
    assert list(dest.iterdir()) == [] and not (tmp_path / "sandbox" / "escaped.txt").exists()


# --- folders: nothing left out silently --------------------------------------------------------

def _png(path: Path, value: int) -> Path:
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(path, format="PNG")  # format: a name may end in "\n"
    return path


def _hostile_breed_folders(root: Path) -> dict[str, str]:
    """Two breeds of three PNGs each, plus the odd entries; returns {entry name: words its reason must have}."""
    for b, breed in enumerate(("beagle", "pug")):
        (root / breed).mkdir(parents=True)
        for i in range(3):
            _png(root / breed / f"{i}.png", 40 * b + 20 * i)
    odd = root / "beagle"
    expected = {}
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(odd / "modern.avif", format="AVIF") \
        if AVIF_DECODED else (odd / "modern.avif").write_bytes(b"\x00\x00\x00\x1cftypavif" + bytes(64))
    if not AVIF_DECODED:
        expected["modern.avif"] = "AVIF image, which this Pillow cannot decode"
    os.symlink(odd / "deleted.jpg", odd / "gone.jpg")
    expected["gone.jpg"] = "dangling symlink"
    _png(odd / "photo.png\n", 90)
    expected["photo.png\n"] = "control character"
    os.mkfifo(odd / "stream.jpg")
    expected["stream.jpg"] = "not a regular file"
    (odd / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    expected[".DS_Store"] = "hidden file"
    (odd / "notes.txt").write_text("best boy")
    expected["notes.txt"] = "not an image extension"
    _png(root / "stray.png", 10)
    expected["stray.png"] = "not in a breed folder"
    return expected


def test_a_dataset_names_every_file_it_leaves_out_and_uses_avif_when_pillow_decodes_it(tmp_path, capsys):
    root = tmp_path / "dogs"
    expected = _hostile_breed_folders(root)
    dataset = load_dataset(root, breeds="all", seed=0, val_fraction=0.0, test_fraction=0.0)
    reports = [part for part in capsys.readouterr().err.split("warning: ") if part.strip()]
    assert len(reports) == 1
    assert f"left out {len(expected)} file(s)" in reports[0]
    for name in expected:
        assert display(root / name if name == "stray.png" else root / "beagle" / name) in reports[0], name
    assert "'" + str(root / "beagle" / "photo.png") + "\\n'" in reports[0]  # the newline shown, not printed

    left = {Path(item.path).name: item.reason for item in dataset.left_out}
    assert set(left) == set(expected)
    for name, words in expected.items():
        assert words in left[name], (name, left[name])
    used = {Path(r.path).name for r in dataset.train}
    assert used == {"0.png", "1.png", "2.png"} | ({"modern.avif"} if AVIF_DECODED else set())
    summary = dataset.split_summary()["left_out"]
    assert summary["count"] == len(expected)
    assert {item["path"] for item in summary["files"]} == {
        ("beagle/" + n) if n != "stray.png" else n for n in expected}


@pytest.mark.skipif(not AVIF_DECODED, reason="this Pillow has no AVIF codec")
def test_an_avif_record_decodes(tmp_path):
    from dogbreeds.data.decode import decode_image

    root = tmp_path / "dogs"
    _hostile_breed_folders(root)
    assert decode_image(root / "beagle" / "modern.avif").shape == (24, 24, 3)


def test_a_breed_folder_with_only_unusable_files_names_them(tmp_path):
    root = tmp_path / "dogs"
    for breed in ("beagle", "pug"):
        (root / breed).mkdir(parents=True)
    _png(root / "beagle" / "a.png", 1)
    os.symlink(root / "nowhere.jpg", root / "pug" / "link.jpg")
    (root / "pug" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DogbreedsError, match=r"pug.*'link.jpg' \(a dangling symlink.*'photo.heic' \(a HEIC image"):
        load_dataset(root, breeds="all")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory with a random-weight convnext_atto for two breeds: enough for predict to answer."""
    from dogbreeds.data.records import ClassInfo
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    root = tmp_path_factory.mktemp("tiny_run")
    save_model_checkpoint(create_model("convnext_atto", num_classes=2), root / "checkpoints" / "best.safetensors",
                          ClassInfo(("beagle", "pug")))
    return root


def test_predict_on_a_folder_reports_what_it_leaves_out(tmp_path, tiny_run, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "dog.png", 120)
    os.symlink(folder / "deleted.jpg", folder / "gone.jpg")
    _png(folder / "tail.png\n", 1)
    (folder / "readme.md").write_text("not a photo")
    (folder / "sub").mkdir()
    os.mkfifo(folder / "sub" / "pipe.png")
    code = main(["predict", str(tiny_run), str(folder), "--json", "--engine", "torch"])
    out, err = capsys.readouterr()
    assert code == 0
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(folder / "dog.png")]
    assert "left out 4 file(s)" in err and "Traceback" not in err
    for words in ("gone.jpg: a dangling symlink", repr(str(folder / "tail.png\n")), "readme.md: not an image",
                  "pipe.png: not a regular file"):
        assert words in err, words

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    os.symlink(only_bad / "deleted.jpg", only_bad / "gone.jpg")
    assert main(["predict", str(tiny_run), str(only_bad), "--engine", "torch"]) == 2
    err = capsys.readouterr().err
    assert "gone.jpg: a dangling symlink" in err and "see the files left out above" in err and "Traceback" not in err


# --- undecodable validation (and test) files are named ------------------------------------------

@pytest.mark.slow
def test_undecodable_validation_files_are_named_on_stderr_in_metrics_and_in_eval(tmp_path, capsys, monkeypatch):
    import torch

    from dogbreeds.evaluate.report import evaluate_run
    from dogbreeds.train.loop import train
    from dogbreeds.train.recipe import Recipe

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path / "dogs"
    rng = np.random.default_rng(0)
    for breed in ("beagle", "pug", "whippet"):
        (root / breed).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / breed / f"{i:02d}.png")
    split = dict(seed=0, val_fraction=0.25, test_fraction=0.2)
    val = [r.path for r in load_dataset(root, breeds="all", **split).val]
    assert len(val) == 12
    broken = sorted(val[::3])  # 4 of the 12, across breeds: the split depends on names only
    for path in broken:
        Path(path).write_bytes(b"not a PNG at all" * 4)
    recipe = Recipe(model="convnext_atto", data=str(root), breeds="all", out=str(tmp_path / "run"), epochs=1,
                    batch_size=4, augment=Recipe().augment.preset("quick"), input_size=32, workers=0,
                    precision="fp32", warmup_epochs=0.0, channels_last=False, calibrate=False, **split)
    try:
        run = train(recipe)
        err = capsys.readouterr().err
        line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert line["val_images"] == 8 and line["val_skipped_files"] == 4
        assert sorted(item["path"] for item in line["val_skipped"]) == broken
        assert all(item["reason"] for item in line["val_skipped"])
        assert "skipped 4 validation file(s) that could not be decoded" in err
        assert all(path in err for path in broken)

        result = evaluate_run(run, root, split="val", engine="torch", log=lambda *a: None)
        err = capsys.readouterr().err
        assert result["n_images"] == 8 and result["skipped"] == 4
        assert sorted(item["path"] for item in result["skipped_files"]) == broken
        assert "skipped 4 val-split file(s)" in err and all(path in err for path in broken)
    finally:
        torch.set_num_threads(threads)
