"""Every verb that takes a model, for every model kind, the way a user runs it: the CLI.

Export and serving of fine-tuned models once broke unnoticed because tests called library
internals; here each kind goes through `predict`, `evaluate`, `info`, `export` (the file then run
in ONNX Runtime alone) and `serve` (a real server process), and the answers must agree.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from stackvision.cli import main
from stackvision.export import prepare_images

from .conftest import FLOWER_CLASSES, KINDS
from .serving_helpers import Server, images_of, run_onnx_alone


@pytest.fixture(scope="module", params=list(KINDS))
def kind_dir(request):
    fixture, kind = KINDS[request.param]
    return kind, request.getfixturevalue(fixture)


@pytest.fixture(scope="module")
def predicted(kind_dir, heldout, cache_dir):
    """`predict --top-k 3` (all classes) for the held-out images: path -> [(class, prob)]."""
    _, path = kind_dir
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["predict", str(path), str(heldout), "--top-k", "3", "--cache", cache_dir,
                     "--device", "cpu", "-q"])  # fmt: skip
    assert code == 0
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    return {r[0]: [(r[i], float(r[i + 1])) for i in (1, 3, 5)] for r in rows[1:]}


def test_predict(predicted, heldout):
    assert sorted(predicted) == images_of(heldout)
    for top in predicted.values():
        probs = [p for _, p in top]
        assert sorted(c for c, _ in top) == FLOWER_CLASSES
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4


def test_evaluate(kind_dir, heldout, cache_dir, tmp_path, predicted):
    _, path = kind_dir
    out = tmp_path / "ev"
    args = ["evaluate", str(path), str(heldout), "--out", str(out), "--cache", cache_dir, "-q"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 12
    # the same images, the same model: evaluate's accuracy is predict's top-1 against the folders
    acc = np.mean(
        [top[0][0] == os.path.basename(os.path.dirname(p)) for p, top in predicted.items()]
    )
    assert metrics["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert (out / "report" / "report.html").is_file()


def test_info(kind_dir, capsys):
    kind, path = kind_dir
    assert main(["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == kind and d["classes"] == FLOWER_CLASSES and d["format_version"] == 2
    assert d["size_bytes"] > 10_000
    if kind == "ensemble":
        assert [m["kind"] for m in d["members"]] == ["stack", "finetune"]
    else:
        assert d["backbones"][0]["architecture"] == "tf_efficientnet_lite0"
    # 30 training images; a fine-tuned model's own 30% validation split is not among them
    assert d["training_images_recorded"] == {"finetune": 21}.get(
        kind, 30 + 12 * (kind == "ensemble")
    )
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"kind            {kind}" in out and "training images " in out


def test_export_runs_in_onnxruntime_alone(kind_dir, heldout, tmp_path, capsys):
    from stackvision import load_model

    _, path = kind_dir
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(path), "--out", str(onnx_path)]) == 0
    assert "check: ONNX Runtime vs torch" in capsys.readouterr().out
    model = load_model(str(path), device="cpu")
    batch = prepare_images(images_of(heldout), model)
    proba, meta = run_onnx_alone(onnx_path, batch, tmp_path)
    assert meta["classes"] == FLOWER_CLASSES and meta["loaded"] == []
    np.testing.assert_allclose(proba, model.forward_uint8(batch), atol=1e-4, rtol=0)


def test_serve_answers_like_forward_uint8(kind_dir, heldout, tmp_path):
    from stackvision import load_model

    _, path = kind_dir
    paths = images_of(heldout)[::4]
    model = load_model(str(path), device="cpu")
    want = model.forward_uint8(prepare_images(paths, model))
    server = Server(path, log=tmp_path / "serve.log")
    try:
        files = [("file", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in paths]
        r = httpx.post(server.url + "/predict", files=files, timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
    finally:
        server.stop()
    for pred, row in zip(got, want):
        assert pred["top"][0]["class"] == FLOWER_CLASSES[int(np.argmax(row))]
        assert pred["top"][0]["probability"] == pytest.approx(row.max(), abs=1e-4)


LIGHT = (
    "import sys; from stackvision.cli import main; code = main(sys.argv[1:]); "
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'torchvision', "
    "'sklearn'}); print('HEAVY', heavy, file=sys.stderr); sys.exit(code)"
)


def test_a_warm_predict_imports_no_torch_timm_or_sklearn(stack_dir, heldout, cache_dir, tmp_path):
    """With the engine compiled and the features cached, predicting one image needs neither the
    network nor scikit-learn: those imports alone cost seconds a process (issue 14)."""
    import subprocess
    import sys

    from PIL import Image

    from .serving_helpers import child_env

    image = images_of(heldout)[0]
    fresh = tmp_path / "fresh.jpg"  # bytes no cache has seen: features computed, engine warm
    Image.open(image).convert("RGB").rotate(3).save(fresh)
    run = ["predict", str(stack_dir), "--cache", cache_dir, "--device", "cpu", "-q"]
    assert main([*run, image]) == 0  # fills the engine folder and this image's features
    for path in (image, str(fresh)):
        p = subprocess.run([sys.executable, "-c", LIGHT, *run, path], capture_output=True,
                           text=True, env=child_env(), timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert "HEAVY []" in p.stderr, p.stderr
        assert p.stdout.splitlines()[1].split(",")[1] in FLOWER_CLASSES
