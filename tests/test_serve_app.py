"""The service in-process (FastAPI TestClient): every model kind served through the model
contract alone, request ids, and server failures counted in /health and logged once.

The models are built by the CLI verbs (train, finetune, ensemble) on 3 flower classes x 10
images, lite0 only, and loaded back with ``load_model`` as ``stackvision serve`` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from stackvision import load_model
from stackvision.export import prepare_images
from stackvision.preprocess import Preprocess

from .conftest import FLOWER_CLASSES, KINDS
from .serving_helpers import images_of

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402 - after the skips

from stackvision.serve import Limits, create_app  # noqa: E402

KEY = "app-key"


@pytest.fixture(scope="module", params=list(KINDS))
def served(request, cache_dir):
    """(kind, model) loaded from its directory the way `stackvision serve` loads it."""
    fixture, kind = KINDS[request.param]
    path = request.getfixturevalue(fixture)
    return kind, load_model(str(path), cache_dir=cache_dir, device="cpu")


@pytest.fixture(scope="module")
def stack_model(stack_dir, cache_dir):
    return load_model(str(stack_dir), cache_dir=cache_dir, device="cpu")


def post_images(client, paths, **kw):
    files = [("file", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]
    return client.post("/predict", files=files, **kw)


def test_every_kind_is_served_like_forward_uint8(served, heldout):
    kind, model = served
    paths = images_of(heldout)
    expected = model.forward_uint8(prepare_images(paths, model))
    with TestClient(create_app(model, api_key=KEY, max_wait_ms=20)) as client:
        r = post_images(client, paths, params={"top_k": 2}, headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        info = client.get("/model", headers={"X-API-Key": KEY}).json()
        health = client.get("/health").json()
    assert [p["name"] for p in preds] == [Path(p).name for p in paths]
    for pred, row in zip(preds, expected):
        assert len(pred["top"]) == 2
        assert pred["top"][0]["class"] == model.classes_[int(np.argmax(row))]
        np.testing.assert_allclose(pred["top"][0]["probability"], row.max(), atol=1e-4)
    assert info["kind"] == kind and info["classes"] == FLOWER_CLASSES
    assert info["input"]["size"] == model.input_preprocess().input_size
    assert health["requests"]["images"] == len(paths)
    assert health["requests"]["server_errors"] == health["requests"]["client_errors"] == 0


def test_mlp_head_is_described(mlp_dir):
    """The MLP case above is really an MLP head (train --head mlp)."""
    assert json.loads((mlp_dir / "manifest.json").read_text())["head"]["kind"] == "mlp"


class ContractOnly:
    """Nothing but the model contract: the service must need no more."""

    classes_ = ["dark", "light"]

    def input_preprocess(self) -> Preprocess:
        return Preprocess(input_size=32, crop_pct=1.0)

    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        light = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
        return np.stack([1.0 - light, light], axis=1)

    def describe(self) -> dict:
        return {"kind": "contract-only", "classes": list(self.classes_)}


def test_service_needs_only_the_contract(heldout):
    with TestClient(create_app(ContractOnly())) as client:
        r = post_images(client, images_of(heldout)[:3])
        assert r.status_code == 200, r.text
        assert {t["class"] for t in r.json()["predictions"][0]["top"]} == {"dark", "light"}
        info = client.get("/model").json()
        assert info["kind"] == "contract-only" and info["input"]["size"] == 32


def test_every_response_has_a_request_id(heldout):
    limits = Limits(max_upload_bytes=1000, max_images=1)
    with TestClient(create_app(ContractOnly(), api_key=KEY, limits=limits)) as client:
        ok = client.get("/health")
        unauthorised = client.get("/model")
        too_big = client.post(
            "/predict",
            content=b"x" * (limits.max_request_bytes + 1),
            headers={"X-API-Key": KEY, "content-type": "application/json"},
        )
        counts = client.get("/health").json()["requests"]
    ids = [r.headers["x-request-id"] for r in (ok, unauthorised, too_big)]
    assert len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    assert unauthorised.status_code == 401 and unauthorised.json()["request_id"] == ids[1]
    assert too_big.status_code == 413 and too_big.json()["request_id"] == ids[2]
    assert counts["client_errors"] == 2 and counts["server_errors"] == 0


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_failed_forward_is_500_with_request_id_counted_and_logged_once(
    stack_model, heldout, monkeypatch, caplog
):
    def broken(batch):
        raise RuntimeError("forward exploded")

    monkeypatch.setattr(stack_model, "forward_uint8", broken)
    caplog.set_level(logging.INFO)
    with TestClient(create_app(stack_model, warmup=False)) as client:
        before = client.get("/health").json()["requests"]
        r = post_images(client, images_of(heldout)[:2])  # two images, one failure to report
        after = client.get("/health").json()["requests"]
    assert r.status_code == 500
    rid, body = r.headers["x-request-id"], r.json()
    assert body["request_id"] == rid and body["status"] == 500
    assert "inference failed" in body["error"] and "forward exploded" in body["error"]
    assert rid in body["fix"]
    assert after["server_errors"] == before["server_errors"] + 1
    assert after["client_errors"] == before["client_errors"] and after["requests"] == 0
    (record,) = _errors(caplog)
    line = record.getMessage()
    assert rid in line and "POST /predict" in line and "RuntimeError: forward exploded" in line
    assert "\n" not in line and record.exc_info is None
    assert "Traceback" not in caplog.text


def test_traceback_is_logged_at_debug_level(stack_model, heldout, monkeypatch, caplog):
    def broken(batch):
        raise RuntimeError("forward exploded")

    monkeypatch.setattr(stack_model, "forward_uint8", broken)
    caplog.set_level(logging.DEBUG, logger="stackvision.serve")
    with TestClient(create_app(stack_model, warmup=False)) as client:
        rid = post_images(client, images_of(heldout)[:1]).headers["x-request-id"]
    (record,) = _errors(caplog)
    assert rid in record.getMessage() and record.exc_info is not None
    assert "Traceback" in caplog.text and "in broken" in caplog.text


def test_unexpected_exception_is_500_without_internals(monkeypatch, caplog):
    model = ContractOnly()

    def describe():
        raise KeyError("secret internal detail")

    monkeypatch.setattr(model, "describe", describe)
    caplog.set_level(logging.INFO)
    with TestClient(create_app(model)) as client:
        r = client.get("/model")
        counts = client.get("/health").json()["requests"]
    assert r.status_code == 500 and r.json()["error"] == "internal server error"
    assert "secret" not in r.text and r.json()["request_id"] == r.headers["x-request-id"]
    assert counts["server_errors"] == 1
    (record,) = _errors(caplog)
    assert r.headers["x-request-id"] in record.getMessage() and "KeyError" in record.getMessage()


# ---------------------------------------------------------------------- the key (issue 11)
def test_key_sources_and_warnings(tmp_path):
    from stackvision.errors import StackvisionError
    from stackvision.serve.auth import resolve_key

    assert resolve_key(None, None, {"STACKVISION_API_KEY": "from-env"}) == ("from-env", [])
    assert resolve_key(None, None, {}) == (None, [])
    key, warnings = resolve_key("on-the-command-line", None, {})
    assert key == "on-the-command-line" and "ps" in warnings[0] and "deprecated" in warnings[0]
    f = tmp_path / "key"
    f.write_text("  from-file\n")
    f.chmod(0o600)
    assert resolve_key(None, str(f), {"STACKVISION_API_KEY": "env"}) == ("from-file", [])
    f.chmod(0o644)
    key, warnings = resolve_key(None, str(f), {})
    assert key == "from-file" and "chmod 600" in warnings[0]
    for bad in ("", "two words\n"):
        f.write_text(bad)
        with pytest.raises(StackvisionError, match="holds no key"):
            resolve_key(None, str(f), {})
    with pytest.raises(StackvisionError, match="both given"):
        resolve_key("k", str(f), {})


def test_redaction_of_every_log_line():
    import logging

    from stackvision.serve.auth import RedactKey, redact

    assert redact("GET /x?api_key=abc&b=1") == "GET /x?api_key=[redacted]&b=1"
    assert redact("GET /x?a=1&Api%5FKey=abc") == "GET /x?a=1&Api%5FKey=[redacted]"
    assert redact("POST /k/p%2Bq%2Fr /k/p+q/r", "p+q/r") == "POST /k/[redacted] /k/[redacted]"
    assert redact("GET /k/p%2bq%2fr", "p+q/r") == "GET /k/[redacted]"
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/model?api_key=abc", "1.1", 200), None,
    )  # fmt: skip
    assert RedactKey("abc").filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /model?api_key=[redacted] HTTP/1.1" 200'
