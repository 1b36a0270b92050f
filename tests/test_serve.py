"""The HTTP service, as a real `stackvision serve` process talked to over HTTP."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from stackvision import load_model
from stackvision.cli import main
from stackvision.export import prepare_images

from .serving_helpers import Server, images_of, train_tiny

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def model_dir(woof_train, cache_dir, tmp_path_factory):
    return train_tiny(woof_train, cache_dir, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = Server(
        model_dir,
        "--api-key", KEY,
        "--max-upload-mb", "1",
        "--max-images", "4",
        "--max-pixels", "4000000",
        "--max-wait-ms", "20",
        log=log,
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(model_dir, woof_val, cache_dir):
    """The library's answer for the validation images, on the same uint8 input."""
    model = load_model(str(model_dir), cache_dir=cache_dir)
    paths = images_of(woof_val)
    return paths, model.forward_uint8(prepare_images(paths, model)), model.classes_


def post_files(url, paths, headers=AUTH, **kw):
    files = [("file", (p.rsplit("/", 1)[-1], Path(p).read_bytes(), "image/jpeg")) for p in paths]
    return httpx.post(url + "/predict", files=files, headers=headers, timeout=120, **kw)


def check_answer(pred, proba_row, classes, k=5):
    order = np.argsort(-proba_row)[: min(k, len(classes))]
    assert [t["class"] for t in pred["top"]] == [classes[j] for j in order]
    got = np.array([t["probability"] for t in pred["top"]])
    np.testing.assert_allclose(got, proba_row[order], atol=1e-5)


def noise_png(w, h, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_health_needs_no_key_model_does(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert {"requests", "images", "client_errors", "server_errors"} <= set(r.json()["requests"])
    assert len(r.headers["x-request-id"]) == 16
    r = httpx.get(server.url + "/model")
    assert r.status_code == 401 and r.json()["error"] == "missing API key"
    assert r.json()["request_id"] == r.headers["x-request-id"]
    r = httpx.get(server.url + "/model", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and r.json()["error"] == "wrong API key"
    r = httpx.get(server.url + "/model", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    info = r.json()
    assert info["kind"] == "stack" and len(info["classes"]) == 4
    assert [b["name"] for b in info["backbones"]] == ["lite0"]
    assert info["metrics"]["accuracy"] > 0 and "torch" in info["versions"]
    assert info["input"]["size"] == 224 and info["serving"]["limits"]["max_images"] == 4
    assert set(info["serving"]["blas_threads"]) == {1}  # see stackvision.threads


@pytest.fixture()
def first_image(woof_val):
    return images_of(woof_val)[0]


def test_every_route_but_health_and_the_static_pages_needs_the_key(server, first_image):
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    img = first_image
    assert post_files(server.url, [img], headers={}).status_code == 401
    assert post_files(server.url, [img], headers={"X-API-Key": "nope"}).status_code == 401
    spec = httpx.get(server.url + "/openapi.json", params={"api_key": KEY}).json()
    assert "/predict" in spec["paths"] and "/model" in spec["paths"]
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    assert "/predict" in spec["paths"]
    # The page and the docs hold no data: open, and they send the key as a header from JS.
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and '"X-API-Key": apiKey' in page.text
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert 'req.headers["X-API-Key"] = key' in docs.text and "api_key=" not in docs.text
    assert "--api-key is deprecated" in server.output()  # the fixture still passes --api-key


def test_predict_multipart_matches_library(server, expected):
    paths, proba, classes = expected
    r = post_files(server.url, paths[:3], params={"top_k": 3})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["name"] for p in preds] == [p.rsplit("/", 1)[-1] for p in paths[:3]]
    for pred, row in zip(preds, proba[:3]):
        check_answer(pred, row, classes, k=3)


def test_predict_json_base64(server, expected):
    paths, proba, classes = expected
    data = base64.b64encode(Path(paths[5]).read_bytes()).decode()
    body = {"images": [data, {"name": "b.jpg", "data": "data:image/jpeg;base64," + data}]}
    r = httpx.post(server.url + "/predict", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["name"] for p in preds] == ["#1", "b.jpg"]
    for pred in preds:
        check_answer(pred, proba[5], classes)
    r = httpx.post(server.url + "/predict", json={"images": ["%%%"]}, headers=AUTH)
    assert r.status_code == 400 and "not valid base64" in r.json()["error"]
    # top_k in the body: a positive integer; JSON's true (a Python int) or 0 is a 400
    r = httpx.post(server.url + "/predict", json={**body, "top_k": 2}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 2, r.text
    for bad in (True, 0, 1.5, "3"):
        r = httpx.post(server.url + "/predict", json={**body, "top_k": bad}, headers=AUTH)
        assert r.status_code == 400 and "top_k must be a positive integer" in r.json()["error"]


def test_corrupt_and_non_images_get_400_and_server_keeps_serving(server, first_image):
    good = first_image
    data = Path(good).read_bytes()
    cases = {
        "truncated.jpg": (data[: len(data) // 3], "truncated"),
        "garbage.jpg": (b"\x00\x01not an image" * 50, "not a readable image"),
        "empty.jpg": (b"", "empty"),
    }
    for name, (blob, words) in cases.items():
        r = httpx.post(
            server.url + "/predict", files=[("file", (name, blob, "image/jpeg"))], headers=AUTH
        )
        assert r.status_code == 400, (name, r.text)
        assert name in r.json()["error"] and words in r.json()["error"]
        assert r.json()["fix"]
    assert post_files(server.url, [good]).status_code == 200


def test_wrong_content_type_is_415(server):
    r = httpx.post(
        server.url + "/predict", content=b"hello", headers={**AUTH, "content-type": "text/plain"}
    )
    assert r.status_code == 415 and "text/plain" in r.json()["error"]
    r = httpx.post(
        server.url + "/predict",
        files=[("file", ("notes.txt", b"just text", "text/plain"))],
        headers=AUTH,
    )
    assert r.status_code == 415 and "notes.txt" in r.json()["error"]
    r = httpx.post(
        server.url + "/predict", files=[("image", ("a.jpg", b"x", "image/jpeg"))], headers=AUTH
    )
    assert r.status_code == 400 and "no 'file' field" in r.json()["error"]


def test_limits_are_413_naming_the_limit(server):
    big = noise_png(700, 700)  # ~1.4 MB of incompressible pixels, over --max-upload-mb 1
    assert len(big) > 1024 * 1024
    r = httpx.post(
        server.url + "/predict", files=[("file", ("big.png", big, "image/png"))], headers=AUTH
    )
    assert r.status_code == 413 and "big.png" in r.json()["error"] and "limit" in r.json()["error"]

    huge = io.BytesIO()
    Image.new("RGB", (2500, 2000), (90, 120, 30)).save(huge, "PNG")  # 5 MP, tiny file
    r = httpx.post(
        server.url + "/predict",
        files=[("file", ("wide.png", huge.getvalue(), "image/png"))],
        headers=AUTH,
    )
    assert r.status_code == 413 and "2500x2000" in r.json()["error"]

    small = noise_png(16, 16)
    files = [("file", (f"{i}.png", small, "image/png")) for i in range(5)]
    r = httpx.post(server.url + "/predict", files=files, headers=AUTH)
    assert r.status_code == 413 and "5 images" in r.json()["error"]

    r = httpx.post(
        server.url + "/predict",
        content=b"x" * 8_000_000,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 413 and "request body" in r.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_pixel_bombs_are_413_and_needles_400_quickly(server):
    from .hostile_inputs import png_bytes, png_header_only

    # 200 MP in the header: Pillow refuses to open it; it is over the pixel limit, so 413
    r = httpx.post(server.url + "/predict", headers=AUTH,
                   files=[("file", ("bomb.png", png_header_only(20000, 10000), "image/png"))])  # fmt: skip
    assert r.status_code == 413, r.text
    assert "bomb.png" in r.json()["error"] and "limit of 4000000" in r.json()["error"]
    # 1x8000: was 2.1 GB and 5.5 s of resizing; now refused from the header
    r = httpx.post(server.url + "/predict", headers=AUTH,
                   files=[("file", ("needle.png", png_bytes(1, 8000), "image/png"))])  # fmt: skip
    assert r.status_code == 400, r.text
    assert "aspect ratio of 1x8000" in r.json()["error"]
    assert r.elapsed.total_seconds() < 2
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_key_never_reaches_the_log_or_the_process_list(model_dir, tmp_path):
    key = "s3cr3t-Key+/="  # characters that URL-encoding changes
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    srv = Server(model_dir, "--api-key-file", str(key_file), "--log-level", "info",
                 log=tmp_path / "server.log")  # fmt: skip
    try:
        cmdline = Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()
        assert key.encode() not in cmdline
        assert httpx.get(srv.url + "/model", params={"api_key": key}).status_code == 200
        assert httpx.get(srv.url + "/model", params={"API_KEY": "guess-1"}).status_code == 401
        assert httpx.get(srv.url + f"/model?x=1&api_key={key}&y=2").status_code in (200, 401)
        assert httpx.get(srv.url + "/model", headers={"X-API-Key": key}).status_code == 200
        assert httpx.get(srv.url + f"/nowhere/{key}").status_code == 404
    finally:
        srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert '"GET /model?api_key=[redacted] HTTP/1.1" 200' in log  # the access log is on
    assert "API_KEY=[redacted]" in log and "guess-1" not in log
    assert "x=1&api_key=[redacted]&y=2" in log
    assert "/nowhere/[redacted]" in log
    for form in (key, "s3cr3t-Key%2B%2F%3D", "s3cr3t"):
        assert form not in log, log


def test_concurrent_requests_are_batched_and_all_correct(server, expected):
    paths, proba, classes = expected
    before = httpx.get(server.url + "/health").json()["batching"]
    jobs = list(range(len(paths)))

    def one(i):
        return i, post_files(server.url, [paths[i]])

    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, jobs))
    for i, r in results:
        assert r.status_code == 200, r.text
        check_answer(r.json()["predictions"][0], proba[i], classes)
    after = httpx.get(server.url + "/health").json()["batching"]
    images = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert images == len(jobs)
    assert batches < images and after["max_batch_seen"] > 1, after


def test_serve_user_errors(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be an integer >= 1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--api-key-file", str(tmp_path / "nokey")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --api-key-file") and "not found" in err


def test_an_address_that_cannot_be_served_is_a_one_line_error(model_dir, capsys):
    """The socket is bound before the model loads: a wrong host or a port in use is an error at
    once, with the address and what to do, not uvicorn's log line and exit 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(model_dir), "--port", str(port), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "--port" in err
    assert main(["serve", str(model_dir), "--host", "999.1.1.1", "--api-key", KEY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot listen on 999.1.1.1:8000") and "--host" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_port_0_serves_on_the_port_the_system_chose(model_dir, tmp_path):
    import re
    import subprocess
    import sys
    import time

    from .serving_helpers import child_env

    cmd = [sys.executable, "-m", "stackvision.cli", "serve", str(model_dir), "--port", "0",
           "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        line = proc.stderr.readline()  # the banner, printed once the model is loaded
        m = re.match(r"serving .* on http://127\.0\.0\.1:(\d+)/ ", line)
        assert m and int(m.group(1)) > 0, line
        url = f"http://127.0.0.1:{m.group(1)}/health"
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, line
                time.sleep(0.2)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
