"""The OpenAPI contract is complete (issue 12, defect 14): every status the service returns is
documented, every error is {"detail": message} as the schema says, and schemathesis finds
nothing (its config: schemathesis.toml at the project root)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


def test_every_error_status_is_documented_with_the_shape_it_has(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        schema = http.get("/openapi.json").json()
        bad_top = http.post("/v1/predict?top=0", content=b"\xff\xd8\xff")
        empty = http.post("/v1/predict", content=b"")
    predict = schema["paths"]["/v1/predict"]["post"]["responses"]
    assert {"200", "408", "413", "415", "422", "503"} <= set(predict), sorted(predict)
    error_schema = schema["components"]["schemas"]["ErrorMessage"]
    assert error_schema["properties"]["detail"]["type"] == "string"
    for status in ("408", "413", "415", "422", "503"):
        assert predict[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorMessage"}
    assert "Retry-After" in predict["503"]["headers"]
    # what the service sends has that shape, FastAPI's own parameter errors included
    assert bad_top.status_code == 422 and isinstance(bad_top.json()["detail"], str) and "top" in bad_top.json()["detail"]
    assert empty.status_code == 415 and isinstance(empty.json()["detail"], str)
    # an .onnx file cannot explain (501): the operation is not offered in its schema
    assert "/v1/explain" not in schema["paths"]


def test_explain_is_documented_with_501_where_it_is_offered(hostile_onnx):
    from fastapi.testclient import TestClient

    from dogbreeds.infer.predictor import Predictor
    from dogbreeds.serve.app import create_app

    predictor = Predictor.from_run(hostile_onnx.parent, engine="torch")
    with TestClient(create_app(predictor)) as client:
        explain = client.get("/openapi.json").json()["paths"]["/v1/explain"]["post"]["responses"]
    assert {"200", "408", "413", "415", "422", "501", "503"} <= set(explain), sorted(explain)
    assert "image/png" in explain["200"]["content"]


def test_schemathesis_finds_no_failures(server, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if cli is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    # the project's schemathesis.toml, run elsewhere so that its cache (.schemathesis/) stays out of the tree
    result = subprocess.run([cli, "--config-file", str(PROJECT_ROOT / "schemathesis.toml"), "run",
                             f"{server.url}/openapi.json", "--max-examples", "15", "--seed", "12", "--no-color"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "No issues found" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Tested: 3" in result.stdout  # healthz, breeds, predict
