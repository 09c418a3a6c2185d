"""Fixtures for the service's hostile-input tests (tests/hostile/test_slow_clients.py,
test_pixel_bombs.py, test_disconnect.py, test_openapi.py): a tiny random-init model exported to
an .onnx file once per session (a server on it starts without torch, in about a second), and
`dogbreeds serve` subprocesses on loopback, killed at teardown."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hostile_photo(mini_root) -> Path:
    return sorted((mini_root / "Images").glob("*/*.jpg"))[0]


@pytest.fixture(scope="session")
def hostile_onnx(tmp_path_factory, mini_root, hostile_photo) -> Path:
    import torch

    from dogbreeds.data.records import ClassInfo
    from dogbreeds.infer.export import export_onnx
    from dogbreeds.models.checkpoint_format import save_model_checkpoint
    from dogbreeds.models.factory import create_model

    torch.manual_seed(0)
    breeds = sorted(p.name for p in (mini_root / "Images").iterdir())[:10]
    model = create_model("convnext_atto", num_classes=len(breeds))
    model.preprocessing = model.preprocessing.with_input_size(96)
    root = tmp_path_factory.mktemp("hostile_run")
    save_model_checkpoint(model, root / "checkpoints" / "best.safetensors", ClassInfo(tuple(breeds)))
    out = root / "model.onnx"
    export_onnx(root, out, check_images=[str(hostile_photo)])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process, self.port, self.log_path = process, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def launch(model: Path, log_dir: Path, *options: str) -> Server:
    """`dogbreeds serve MODEL *options` on a free loopback port, once /healthz answers."""
    import httpx

    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dogbreeds.cli", "serve", str(model),
                                    "--port", str(port), *options], stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {server.log()[-2000:]}")
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    pytest.fail(f"server not healthy within 60 s: {server.log()[-2000:]}")


@pytest.fixture(scope="module")
def start_server(hostile_onnx, tmp_path_factory):
    """start_server(*serve_options) -> Server, healthy; every server is stopped at the end of the
    module (a start costs seconds on a loaded machine: share one where the tests allow)."""
    servers: list[Server] = []
    log_dir = tmp_path_factory.mktemp("servers")

    def start(*options: str) -> Server:
        servers.append(launch(hostile_onnx, log_dir, *options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def default_server(hostile_onnx, tmp_path_factory):
    """One server with serve's default options, shared by the tests that only read its answers and log."""
    server = launch(hostile_onnx, tmp_path_factory.mktemp("default_server"))
    yield server
    server.stop()
