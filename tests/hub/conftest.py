"""A loopback server that answers like the Hugging Face hub for timm repositories.

Each repository is what timm's `push_to_hf_hub` uploads, written by timm's own `save_for_hf`
(`model.safetensors` + `config.json`), from a randomly initialised model: real layout and names,
random numbers. The server answers the requests huggingface_hub makes, the way huggingface.co
does:

- HEAD/GET {endpoint}/{repo}/resolve/{revision}/{file}
  - a git file (config.json): 200, ETag = git blob sha1, Content-Length, X-Repo-Commit;
  - an LFS file (*.safetensors): 302 to a CDN on another origin, with X-Repo-Commit,
    X-Linked-Etag (sha256) and X-Linked-Size, exactly what hf_hub_download reads;
  - a missing file: 404 + X-Error-Code: EntryNotFound (+ X-Repo-Commit, so the client caches
    the absence); an unknown revision: 404 RevisionNotFound; an unknown repo: 401 RepoNotFound.
- GET {cdn}/{sha256}: the bytes, with Range support (resumed downloads).

Repositories are materialised lazily (`files_of`), so a test that never asks for convnext_base
never pays for 350 MB of random weights; tests materialise a repo before the client asks, since
writing one takes longer than create_model's hub probe waits. Every request is logged.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

# The repositories of `dogbreeds compare`'s default models, and the MobileNetV2 the issue names.
SERVED = ("timm/convnext_tiny.fb_in22k_ft_in1k", "timm/convnext_base.fb_in22k_ft_in1k", "timm/mobilenetv2_100.ra_in1k")
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass
class ServedFile:
    data: bytes
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class Request:
    method: str
    where: str    # "hub" or "cdn"
    path: str
    user_agent: str


class FakeHub:
    def __init__(self, root: Path, repos=SERVED):
        self.root = root
        self.allowed = set(repos)
        self.repos: dict[str, dict[str, ServedFile]] = {}
        self.commits: dict[str, str] = {}
        self.blobs: dict[str, ServedFile] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.hub = _serve(self, "hub")
        self.cdn = _serve(self, "cdn")  # another port: another origin, like the real CDN host

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def files_of(self, repo: str) -> dict[str, ServedFile] | None:
        """The repository's files, written by timm on first use; None for a repo not served."""
        if repo not in self.allowed:
            return None
        with self._lock:
            if repo not in self.repos:
                self.repos[repo] = self._materialise(repo)
                digest = hashlib.sha1("".join(f.git_sha1 for f in self.repos[repo].values()).encode())
                self.commits[repo] = digest.hexdigest()
                self.blobs.update({f.sha256: f for f in self.repos[repo].values() if f.lfs})
        return self.repos[repo]

    def folder(self, repo: str) -> Path:
        self.files_of(repo)
        return self.root / repo.replace("/", "--")

    def _materialise(self, repo: str) -> dict[str, ServedFile]:
        import timm
        import torch
        from timm.models import save_for_hf

        folder = self.root / repo.replace("/", "--")
        name = repo.split("/", 1)[1]  # timm/<arch>.<tag>
        torch.manual_seed(int(hashlib.sha256(repo.encode()).hexdigest()[:8], 16))
        model = timm.create_model(name, pretrained=False)  # timm's own init: random weights
        save_for_hf(model, str(folder), safe_serialization=True)  # what push_to_hf_hub uploads
        files = {}
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()
            git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[path.name] = ServedFile(data, hashlib.sha256(data).hexdigest(), git_sha1,
                                          path.name.endswith(LFS_SUFFIXES))
        return files

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def calls(self, method: str | None = None, where: str | None = None, contains: str = "") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method)
                and (where is None or r.where == where) and contains in r.path]


def _serve(hub: FakeHub, where: str) -> http.server.ThreadingHTTPServer:
    handler = type(f"{where.title()}Handler", (_Handler,), {"hub": hub, "where": where})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"fake-{where}", daemon=True).start()
    return server


RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: FakeHub
    where: str
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the request log is in FakeHub.requests
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(self.path).path)
        self.hub.log(Request(self.command, self.where, path, self.headers.get("User-Agent", "")))
        if self.where == "cdn":
            return self._blob(path.lstrip("/"), body)
        match = RESOLVE.match(path)
        if not match:
            return self._error(404, None, "", {"error": "not a resolve url"})
        repo, revision, filename = match["repo"], match["revision"], match["filename"]
        files = self.hub.files_of(repo)
        if files is None:
            return self._error(401, "RepoNotFound", "", {"error": "Repository not found"})
        commit = self.hub.commits[repo]
        if revision not in ("main", commit):
            return self._error(404, "RevisionNotFound", "", {"error": f"Invalid rev id: {revision}"})
        served = files.get(filename)
        if served is None:
            return self._error(404, "EntryNotFound", commit, {"error": "Entry not found"})
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if served.lfs:
            # huggingface.co: LFS files redirect to a signed CDN url; the metadata rides on the 302.
            location = f"{self.hub.cdn_url}/{served.sha256}?X-Amz-Signature=loopback"
            redirect = b"Found. Redirecting to " + location.encode()
            self._send(302, {**headers, "Location": location, "ETag": f'"{served.sha256}"',
                             "X-Linked-Etag": f'"{served.sha256}"', "X-Linked-Size": str(len(served.data)),
                             "Content-Type": "text/plain; charset=utf-8"}, redirect, body)
        else:
            self._send(200, {**headers, "ETag": f'"{served.git_sha1}"', "Content-Type": "application/json"},
                       served.data, body)

    def _blob(self, sha256: str, body: bool) -> None:
        served = self.hub.blobs.get(sha256)
        if served is None:
            return self._send(403, {"Content-Type": "text/plain"}, b"AccessDenied", body)
        data, status, headers = served.data, 200, {"ETag": f'"{served.sha256}"', "Accept-Ranges": "bytes",
                                                   "Content-Type": "binary/octet-stream"}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted[1])
            end = int(wanted[2]) if wanted[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, headers, data, body)

    def _error(self, status: int, code: str | None, commit: str, payload: dict) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = payload["error"]
        if commit:
            headers["X-Repo-Commit"] = commit
        # A HEAD answer has no body, errors included: a body after it would be read by a kept-alive
        # connection as the start of the next response ("illegal status line").
        self._send(status, headers, json.dumps(payload).encode(), self.command != "HEAD")

    def _send(self, status: int, headers: dict, data: bytes, body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory):
    server = FakeHub(tmp_path_factory.mktemp("fake-hub"))
    yield server
    server.close()


def point_hub_client_at(monkeypatch, endpoint: str, cache: Path) -> None:
    """HF_ENDPOINT and HF_HUB_CACHE for this process and its children. huggingface_hub reads both
    at import time (the url template too), so its constants are set as well."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def point_hub(monkeypatch):
    """point_hub(endpoint, cache): this test's hub client talks to `endpoint`, caches in `cache`."""
    return lambda endpoint, cache: point_hub_client_at(monkeypatch, endpoint, cache)


@pytest.fixture
def hub(fake_hub, monkeypatch, tmp_path):
    """The fake hub as this test's HF_ENDPOINT, with an empty cache of the test's own."""
    point_hub_client_at(monkeypatch, fake_hub.endpoint, tmp_path / "hf-cache")
    fake_hub.requests.clear()
    return fake_hub


@pytest.fixture
def silent_port():
    """A loopback port that accepts TCP connections and never answers (a black-holed host)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
