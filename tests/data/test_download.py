"""`dogbreeds data download` against a loopback HTTP server serving small tars built here."""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dogbreeds.data import download
from dogbreeds.data.download import Archive, download_stanford_dogs
from dogbreeds.errors import DogbreedsError


class RangeServer:
    """Serves `files` over HTTP on 127.0.0.1, honouring `Range: bytes=N-` unless told not to.

    cut_once: names whose next response stops halfway and drops the connection.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.cut_once: set[str] = set()
        self.ignore_range = False
        self.status_override: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                server.requests.append((name, range_header))
                if server.status_override:
                    self.send_error(server.status_override)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if range_header and not server.ignore_range:
                    start = int(range_header.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tar_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.fixture
def release(mini_root, monkeypatch):
    """Three small tars shaped like the official ones, served on loopback; constants patched."""
    photo = sorted((mini_root / "Images" / "n02085620-Chihuahua").glob("*.jpg"))[0]
    contents = {
        "images.tar": {"Images/n02085620-Chihuahua/n02085620_1.jpg": photo.read_bytes(),
                       "Images/n02085620-Chihuahua/n02085620_2.jpg": os.urandom(300_000)},
        "annotation.tar": {"Annotation/n02085620-Chihuahua/n02085620_1": b"<annotation/>"},
        "lists.tar": {"file_list.mat": b"MATLAB 5.0", "train_list.mat": b"t", "test_list.mat": b"s"},
    }
    files = {name: _tar_bytes(entries) for name, entries in contents.items()}
    monkeypatch.setattr(download, "ARCHIVES", tuple(
        Archive(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()))
    server = RangeServer(files)
    monkeypatch.setattr(download, "OFFICIAL_BASE_URL", server.url)
    yield server, contents
    server.close()


def _assert_unpacked(dest: Path, contents: dict):
    for entries in contents.values():
        for name, payload in entries.items():
            assert (dest / name).read_bytes() == payload


def test_download_verifies_unpacks_and_second_run_does_nothing(release, tmp_path):
    server, contents = release
    dest = download_stanford_dogs(tmp_path / "dogs", progress=False)
    _assert_unpacked(dest, contents)
    assert sorted(name for name, _ in server.requests) == ["annotation.tar", "images.tar", "lists.tar"]
    assert not list(dest.glob("*.tar")) and not list(dest.glob("*.part"))  # archives removed after unpacking
    assert (dest / download.MARKER_NAME).is_file()

    download_stanford_dogs(dest, progress=False)
    assert len(server.requests) == 3  # no request made

    # Unpacked data deleted by hand: only that archive is fetched again.
    import shutil
    shutil.rmtree(dest / "Annotation")
    download_stanford_dogs(dest, progress=False)
    assert [name for name, _ in server.requests[3:]] == ["annotation.tar"]
    _assert_unpacked(dest, contents)


def test_interrupted_download_resumes_with_a_range_request(release, tmp_path):
    server, contents = release
    server.cut_once.add("images.tar")
    dest = tmp_path / "dogs"
    with pytest.raises(DogbreedsError, match="interrupted.*run the same command again to resume"):
        download_stanford_dogs(dest, retries=0, progress=False)
    part = dest / "images.tar.part"
    half = len(server.files["images.tar"]) // 2
    assert part.stat().st_size == half

    download_stanford_dogs(dest, retries=0, progress=False)
    assert ("images.tar", f"bytes={half}-") in server.requests
    _assert_unpacked(dest, contents)
    assert not part.exists()


def test_broken_transfer_is_resumed_within_one_run(release, tmp_path):
    server, contents = release
    server.cut_once.add("annotation.tar")
    dest = download_stanford_dogs(tmp_path / "dogs", retries=1, progress=False)
    ranges = [r for name, r in server.requests if name == "annotation.tar"]
    assert ranges == [None, f"bytes={len(server.files['annotation.tar']) // 2}-"]
    _assert_unpacked(dest, contents)


def test_server_ignoring_range_restarts_the_file(release, tmp_path):
    server, contents = release
    server.ignore_range = True
    dest = tmp_path / "dogs"
    dest.mkdir()
    (dest / "lists.tar.part").write_bytes(b"not the right prefix")
    download_stanford_dogs(dest, progress=False)
    assert ("lists.tar", "bytes=20-") in server.requests  # it asked, the server sent everything
    _assert_unpacked(dest, contents)


def test_checksum_mismatch_deletes_the_file_and_says_what_to_do(release, tmp_path):
    server, _ = release
    data = bytearray(server.files["lists.tar"])
    data[600] ^= 0xFF  # same size, different bytes
    server.files["lists.tar"] = bytes(data)
    dest = tmp_path / "dogs"
    with pytest.raises(DogbreedsError, match=r"lists\.tar.*corrupt: sha256 .* deleted.*again") as info:
        download_stanford_dogs(dest, progress=False)
    assert "--mirror" in str(info.value)
    assert not (dest / "lists.tar").exists() and not (dest / "lists.tar.part").exists()
    assert not (dest / "file_list.mat").exists()


def test_forbidden_host_suggests_mirror_or_local_files(release, tmp_path):
    server, _ = release
    server.status_override = 403
    with pytest.raises(DogbreedsError, match="403.*--mirror URL.*--from-dir DIR"):
        download_stanford_dogs(tmp_path / "dogs", progress=False)


def test_mirror_url_is_used(release, tmp_path, monkeypatch):
    server, contents = release
    monkeypatch.setattr(download, "OFFICIAL_BASE_URL", "http://127.0.0.1:9/nothing-here/")
    dest = download_stanford_dogs(tmp_path / "dogs", mirror=server.url.rstrip("/"), progress=False)
    _assert_unpacked(dest, contents)


@pytest.mark.parametrize("bad_member", ["../escape.txt", "absolute", "symlink"])
def test_malicious_tar_is_refused_and_writes_nothing(tmp_path, bad_member, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "deep" / "dogs"
    dest.mkdir(parents=True)
    good = {"Images/ok.jpg": b"x"}
    bad = {"../escape.txt": ("../escape.txt", {}), "absolute": (str(outside / "absolute.txt"), {}),
           "symlink": ("Images/link", {"type": tarfile.SYMTYPE, "linkname": "../../../outside"})}[bad_member]
    tar_path = tmp_path / "images.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, payload in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo(bad[0])
        for key, value in bad[1].items():
            setattr(info, key, value)
        if info.isfile():
            info.size = 1
            tar.addfile(info, io.BytesIO(b"!"))
        else:
            tar.addfile(info)

    with pytest.raises(DogbreedsError, match="refusing to unpack"):
        download.safe_extract(tar_path, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert list(outside.iterdir()) == []


def test_cli_unpacks_from_a_directory_of_tars_and_refuses_a_wrong_one(release, tmp_path):
    server, contents = release
    tars = tmp_path / "tars"
    tars.mkdir()
    for name, data in server.files.items():
        (tars / name).write_bytes(data)
    parser = argparse.ArgumentParser()
    download.register_cli(parser.add_subparsers())
    args = parser.parse_args(["download", "--dest", str(tmp_path / "dogs"), "--from-dir", str(tars)])
    assert args.func(args) == 0
    _assert_unpacked(tmp_path / "dogs", contents)
    assert server.requests == []
    assert sorted(p.name for p in tars.iterdir()) == sorted(server.files)  # user's copies kept

    (tars / "images.tar").write_bytes(b"short")
    with pytest.raises(DogbreedsError, match="not the official images.tar: size is 5 bytes"):
        download_stanford_dogs(tmp_path / "other", from_dir=tars, progress=False)
    assert (tars / "images.tar").exists()
