"""The REST service: endpoints, limits, micro-batching and the overload path."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dogbreeds.infer.predictor import Predictor
from dogbreeds.serve.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def predictor(serve_run):
    return Predictor.from_run(serve_run)


@pytest.fixture()
def client(predictor):
    with TestClient(create_app(predictor, ServeSettings(max_upload_mb=1))) as c:
        yield c


def _jpeg(path) -> bytes:
    return path.read_bytes()


def test_health_breeds_docs_and_page(client, predictor):
    health = client.get("/healthz").json()
    # a run is served on the onnxruntime engine by default (--engine torch: "torch")
    assert health["status"] == "ok" and health["model"] == "convnext_atto" and health["backend"] == "onnxruntime"
    breeds = client.get("/v1/breeds").json()["breeds"]
    assert [b["breed_id"] for b in breeds] == list(predictor.classes.breed_ids)
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "dogbreeds" in page.text and "/static/app.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_predict_multipart_and_raw_body_agree_with_the_predictor(client, predictor, photos):
    expected = predictor.predict([photos[0]], top_k=3)[0]
    multipart = client.post("/v1/predict?top=3", files={"image": ("dog.jpg", _jpeg(photos[0]), "image/jpeg")})
    raw = client.post("/v1/predict?top=3", content=_jpeg(photos[0]), headers={"content-type": "image/jpeg"})
    for response in (multipart, raw):
        assert response.status_code == 200, response.text
        body = response.json()
        assert [t["breed_id"] for t in body["top"]] == [s.breed_id for s in expected.top]
        np.testing.assert_allclose([t["prob"] for t in body["top"]], [s.prob for s in expected.top], atol=1e-5)
        assert body["low_confidence"] is expected.low_confidence and body["model"] == "convnext_atto"
    assert multipart.json()["image"] == "dog.jpg"
    assert len(client.post("/v1/predict", content=_jpeg(photos[0])).json()["top"]) == 5  # default top
    assert client.post("/v1/predict?top=0", content=_jpeg(photos[0])).status_code == 422


def test_upload_limit_by_content_length_and_while_reading(client, photos):
    too_big = b"\xff\xd8\xff" + b"0" * (1024 * 1024 + 10)
    response = client.post("/v1/predict", content=too_big)
    assert response.status_code == 413 and "limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must be enforced on the bytes that arrive
        for _ in range(40):
            yield b"0" * 65536

    response = client.post("/v1/predict", content=chunks())
    assert response.status_code == 413, response.text
    assert response.json()["detail"].startswith("upload exceeds")  # caught while reading, not by header
    multipart = client.post("/v1/predict", files={"image": ("big.jpg", too_big, "image/jpeg")})
    assert multipart.status_code == 413


def test_bad_images_are_answered_with_the_decode_error(client, photos):
    not_image = client.post("/v1/predict", files={"image": ("notes.txt", b"hello, not a dog", "text/plain")})
    assert not_image.status_code == 415 and "notes.txt" in not_image.json()["detail"]
    assert "not an image" in not_image.json()["detail"]
    truncated = client.post("/v1/predict", content=_jpeg(photos[0])[:3000])
    assert truncated.status_code == 422 and "re-download" in truncated.json()["detail"]
    empty = client.post("/v1/predict", content=b"")
    assert empty.status_code == 415
    missing_field = client.post("/v1/predict", files={"photo": ("a.jpg", _jpeg(photos[0]), "image/jpeg")})
    assert missing_field.status_code == 422 and "'image'" in missing_field.json()["detail"]


def test_pixel_limit(predictor, photos):
    with TestClient(create_app(predictor, ServeSettings(max_pixels=10_000))) as client:
        response = client.post("/v1/predict", content=_jpeg(photos[0]))
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
    predictor.max_pixels = ServeSettings().max_pixels  # the module-scoped predictor is shared


class SlowCountingForward:
    """Wraps a backend's forward: counts calls and batch sizes, optionally sleeps."""

    def __init__(self, forward, delay_s: float):
        self.forward, self.delay_s = forward, delay_s
        self.batch_sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.batch_sizes.append(len(batch))
        time.sleep(self.delay_s)
        return self.forward(batch)


def _post_all(client, bodies, workers):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda body: client.post("/v1/predict?top=20", content=body), bodies))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(serve_run, photos, monkeypatch):
    predictor = Predictor.from_run(serve_run)
    expected = predictor.predict(photos, top_k=20)
    counter = SlowCountingForward(predictor.backend.forward, delay_s=0.3)
    monkeypatch.setattr(predictor.backend, "forward", counter)
    settings = ServeSettings(max_batch=16, max_wait_ms=50)
    with TestClient(create_app(predictor, settings)) as client:
        responses = _post_all(client, [_jpeg(p) for p in photos], workers=len(photos))
        stats = client.get("/healthz").json()["batcher"]
    assert [r.status_code for r in responses] == [200] * 8
    assert len(counter.batch_sizes) < 8 and sum(counter.batch_sizes) == 8
    assert max(counter.batch_sizes) > 1 and stats["max_batch_seen"] == max(counter.batch_sizes)
    for response, want in zip(responses, expected):  # rows went back to the right requests
        got = {t["breed_id"]: t["prob"] for t in response.json()["top"]}
        assert max(abs(got[s.breed_id] - s.prob) for s in want.top) < 1e-5


def test_overload_answers_503_with_retry_after(serve_run, photos, monkeypatch):
    predictor = Predictor.from_run(serve_run)
    counter = SlowCountingForward(predictor.backend.forward, delay_s=0.8)
    monkeypatch.setattr(predictor.backend, "forward", counter)
    settings = ServeSettings(max_batch=1, max_wait_ms=0, max_queue=1)
    with TestClient(create_app(predictor, settings)) as client:
        responses = _post_all(client, [_jpeg(photos[0])] * 8, workers=8)
        assert client.get("/healthz").json()["in_flight"] == 0  # nothing leaks after the burst
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_explain_returns_a_png_of_the_photo_size(client, photos):
    response = client.post("/v1/explain", files={"image": ("dog.jpg", _jpeg(photos[1]), "image/jpeg")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == Image.open(photos[1]).size
    assert response.headers["x-breed"] == response.headers["x-top-breed"]
    assert client.post("/v1/explain?breed=zebra", content=_jpeg(photos[1])).status_code == 422


def test_serve_warns_when_binding_beyond_loopback(serve_run, monkeypatch, capsys):
    import uvicorn

    from dogbreeds.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level, **_: seen.update(host=host, port=port))
    assert main(["serve", str(serve_run), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert seen == {"host": "0.0.0.0", "port": 8123}
    assert "warning: binding 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", str(serve_run)]) == 0
    assert seen["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--max-upload-mb", "0"], ["--max-upload-mb", "-5"], ["--max-upload-mb", "nan"],
                                 ["--max-wait-ms", "-1"], ["--max-wait-ms", "inf"], ["--max-queue", "0"]])
def test_serve_refuses_bad_limits_before_loading_the_model(bad, tmp_path, capsys):
    from dogbreeds.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse, before the (missing) model is read
        main(["serve", str(tmp_path / "no-such-run"), *bad])
    assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err


def test_explain_without_a_pytorch_model_is_501(predictor, photos):
    class OnnxLikeBackend:  # what an .onnx file's backend offers: no `.model`, no run checkpoint behind it
        def __init__(self, inner):
            self.classes, self.preprocessing, self.name, self.path = inner.classes, inner.preprocessing, "onnx-like", inner.path
            self.metadata, self.kind, self.description, self.checkpoint = inner.metadata, inner.kind, "fake", None
            self.preprocess, self.forward, self.embed = inner.preprocess, inner.forward, inner.embed

    with TestClient(create_app(Predictor(OnnxLikeBackend(predictor.backend)))) as client:
        assert client.post("/v1/predict", content=_jpeg(photos[0])).status_code == 200
        response = client.post("/v1/explain", content=_jpeg(photos[0]))
        assert client.get("/healthz").json()["backend"] == "onnx"
    assert response.status_code == 501 and "run directory" in response.json()["detail"]


def test_engine_option_picks_the_backend_and_explain_works_on_both(serve_run, photos, monkeypatch):
    import uvicorn

    from dogbreeds.cli import main
    from dogbreeds.infer.runtime_onnxruntime import OrtBackend
    from dogbreeds.infer.runtime_torch import TorchBackend

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level, **_: apps.append(app))
    assert main(["serve", str(serve_run)]) == 0
    assert main(["serve", str(serve_run), "--engine", "torch"]) == 0
    default, eager = (app.state.predictor for app in apps)
    assert isinstance(default.backend, OrtBackend) and isinstance(eager.backend, TorchBackend)
    for app, kind in zip(apps, ("onnxruntime", "torch")):
        with TestClient(app) as client:
            assert client.get("/healthz").json()["backend"] == kind
            response = client.post("/v1/explain?breed=papillon", content=_jpeg(photos[2]))
            assert response.status_code == 200, response.text
            assert response.headers["x-breed"] == "papillon"
            assert Image.open(io.BytesIO(response.content)).size == Image.open(photos[2]).size
            assert client.post("/v1/predict", content=_jpeg(photos[2])).status_code == 200
    # Grad-CAM loaded its own torch model: predictions still run on the engine, with no model added
    assert isinstance(default.backend, OrtBackend) and not hasattr(default.backend, "model")
    # and the torch backend's own model carries no leftover hooks from the CAM (it ran on a copy)
    assert not any(m._forward_hooks or m._backward_hooks for m in eager.backend.model.modules())
