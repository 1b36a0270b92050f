"""Compiled CPU engines (ONNX Runtime, OpenVINO) against the eager torch engine, on real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stackvision.backbones import resolve
from stackvision.engines import (
    ENGINES,
    Calibration,
    available_engines,
    compiled,
    create_engine,
    numbers_id,
    resolve_engine,
)
from stackvision.errors import StackvisionError
from stackvision.images import load_rgb

DATA = Path(__file__).parents[1].parent / "shared" / "data" / "imagewoof" / "val"
HAVE = set(available_engines())
needs_onnx = pytest.mark.skipif("onnx" not in HAVE, reason="onnxruntime/onnx not installed")
needs_ov = pytest.mark.skipif("openvino" not in HAVE, reason="openvino/onnx not installed")


def _files(n: int, offset: int) -> list[str]:
    if not DATA.is_dir():
        pytest.skip(f"no test images at {DATA}")
    files = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    return [str(p) for p in files[offset :: max(1, len(files) // 64)][:n]]


@pytest.fixture(scope="module")
def spec():
    return resolve("lite0")


@pytest.fixture(scope="module")
def batch(spec):
    return np.stack([spec.preprocess.to_uint8(load_rgb(f, 256)) for f in _files(16, 0)])


@pytest.fixture(scope="module")
def calib_paths():
    return _files(32, 7)  # different images from the test batch


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("svcache"))


@pytest.fixture(scope="module")
def reference(spec, batch, cache_dir):
    return create_engine(spec, engine="torch", device="cpu", cache_dir=cache_dir).features(batch)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    "name", [pytest.param("onnx", marks=needs_onnx), pytest.param("openvino", marks=needs_ov)]
)
def test_fp32_engines_match_torch(name, spec, batch, reference, cache_dir):
    eng = create_engine(spec, engine=name, cache_dir=cache_dir)
    assert eng.numbers_id == "fp32" == numbers_id(name, "fp32")
    out = eng.features(batch)
    assert out.dtype == np.float32 and out.shape == (len(batch), spec.feature_dim)
    assert np.abs(out - reference).max() < 1e-3
    # Dynamic batch axis: a ragged last batch, and a single image.
    np.testing.assert_allclose(eng.features(batch[:5]), reference[:5], atol=1e-3, rtol=0)
    np.testing.assert_allclose(eng.features(batch[3:4]), reference[3:4], atol=1e-3, rtol=0)


@needs_onnx
def test_export_is_cached_and_reused(spec, cache_dir):
    path = compiled.export_onnx(spec, "avg", cache_dir)
    assert Path(path).parent == Path(cache_dir) / "engines"
    assert path.endswith(".onnx") and os.path.exists(path[: -len(".onnx")] + ".json")
    mtime, exports = os.stat(path).st_mtime_ns, compiled.counters["exports"]
    create_engine(spec, engine="onnx", cache_dir=cache_dir)
    if "openvino" in HAVE:
        create_engine(spec, engine="openvino", cache_dir=cache_dir)
    assert compiled.counters["exports"] == exports
    assert os.stat(path).st_mtime_ns == mtime
    assert not [f for f in os.listdir(Path(path).parent) if ".tmp" in f]
    # Another pooling is another graph.
    assert compiled.export_onnx(spec, "max", cache_dir) != path


@needs_ov
def test_openvino_compiled_blob_is_reused_and_a_damaged_one_rebuilt(
    spec, batch, reference, tmp_path
):
    first = create_engine(spec, engine="openvino", cache_dir=str(tmp_path))
    blobs = list((tmp_path / "engines").glob("*.blob"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 100_000
    calls = []
    import openvino as ov

    orig = ov.Core.compile_model

    def spy(self, *a, **k):
        calls.append(a)
        return orig(self, *a, **k)

    ov.Core.compile_model = spy
    try:
        again = create_engine(spec, engine="openvino", cache_dir=str(tmp_path))
        assert calls == []  # imported from the blob, not compiled
        np.testing.assert_array_equal(again.features(batch), first.features(batch))
        # Another thread count is another blob; a damaged blob is compiled again and replaced.
        create_engine(spec, engine="openvino", cache_dir=str(tmp_path), threads=1)
        assert len(calls) == 1 and len(list((tmp_path / "engines").glob("*.blob"))) == 2
        blobs[0].write_bytes(b"not a compiled model")
        fixed = create_engine(spec, engine="openvino", cache_dir=str(tmp_path))
        assert len(calls) == 2 and blobs[0].stat().st_size > 100_000
    finally:
        ov.Core.compile_model = orig
    assert np.abs(fixed.features(batch) - reference).max() < 1e-3
    assert not [f for f in os.listdir(tmp_path / "engines") if ".tmp" in f]


@needs_ov
def test_int8_openvino(spec, batch, reference, calib_paths, cache_dir):
    calib = Calibration.from_images(calib_paths, spec)
    eng = create_engine(
        spec, engine="openvino", precision="int8", calibration=calib, cache_dir=cache_dir
    )
    assert eng.numbers_id.startswith("int8-") and calib.key in eng.numbers_id
    assert eng.numbers_id == numbers_id("openvino", "int8", calib)
    out = eng.features(batch)
    assert out.shape == reference.shape and out.dtype == np.float32
    assert _cosine(out, reference).mean() > 0.95
    # Cached by calibration set: the same set (any order) is not quantised again...
    n = compiled.counters["quantizations"]
    again = Calibration.from_images(list(reversed(calib_paths)), spec)
    assert again.key == calib.key
    create_engine(spec, engine="openvino", precision="int8", calibration=again, cache_dir=cache_dir)
    # ...and a lookup-only calibration (no images) finds it; an unknown one is a clear error.
    create_engine(
        spec,
        engine="openvino",
        precision="int8",
        calibration=Calibration(calib.key),
        cache_dir=cache_dir,
    )
    assert compiled.counters["quantizations"] == n
    with pytest.raises(StackvisionError, match="calibrated"):
        create_engine(
            spec,
            engine="openvino",
            precision="int8",
            calibration=Calibration("0" * 16),
            cache_dir=cache_dir,
        )


@needs_onnx
def test_int8_onnxruntime(spec, batch, reference, cache_dir):
    calib = Calibration.from_arrays([batch[:11], batch[11:]])  # ragged, as real sets are
    eng = create_engine(
        spec, engine="onnx", precision="int8", calibration=calib, cache_dir=cache_dir
    )
    assert eng.numbers_id == f"int8-ort-{calib.key}"
    out = eng.features(batch)
    assert _cosine(out, reference).mean() > 0.9


def test_auto_picks_a_cpu_engine(spec, cache_dir):
    picked = resolve_engine("auto", "cpu")
    assert picked == next(e for e in ("openvino", "onnx", "torch") if e in HAVE)
    eng = create_engine(spec, cache_dir=cache_dir, device="cpu")  # engine="auto" is the default
    assert (
        type(eng).__name__
        == {
            "openvino": "OpenVINOEngine",
            "onnx": "OnnxRuntimeEngine",
            "torch": "TorchEngine",
        }[picked]
    )
    assert eng.numbers_id == "fp32"


def test_bad_names_and_combinations(spec, cache_dir):
    assert ENGINES == ("torch", "onnx", "openvino")
    with pytest.raises(StackvisionError, match="unknown engine"):
        create_engine(spec, engine="tensorrt", cache_dir=cache_dir)
    with pytest.raises(StackvisionError, match="unknown precision"):
        create_engine(spec, engine="auto", precision="fp8", cache_dir=cache_dir)
    with pytest.raises(StackvisionError, match="not available for engine 'torch'"):
        create_engine(spec, engine="torch", precision="int8", cache_dir=cache_dir)
    with pytest.raises(StackvisionError, match="calibration"):
        create_engine(spec, engine="auto", precision="int8", cache_dir=cache_dir)
    assert numbers_id("torch", "fp32") == numbers_id("auto", "fp32") == "fp32"
    assert numbers_id("auto", "int8") == "int8"


def _no_ci_env(home: Path) -> dict:
    """The environment of a user's shell: OpenVINO's telemetry is off in CI, so the CI variables
    go (else this test could not fail there); HOME is a fresh folder to look into afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.pop("STACKVISION_OPENVINO_TELEMETRY", None)
    env["HOME"] = str(home)
    return env


@needs_ov
def test_openvino_runs_without_its_usage_telemetry(spec, cache_dir, tmp_path):
    """`import openvino` sends a usage event and writes ~/intel/stats unless opted out; a
    stackvision process runs OpenVINO with none of it (engines/no_telemetry.py)."""
    import subprocess
    import sys

    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(_files(2, 3)):
        load_rgb(f, 256).save(folder / f"{i}.jpg")
    home = tmp_path / "home"
    home.mkdir()
    env = _no_ci_env(home)
    # The way a user runs it: the CLI, the OpenVINO engine, images not in the cache.
    cli = [sys.executable, "-m", "stackvision.cli", "extract", str(folder), "--backbones",
           "lite0", "--tta", "none", "--engine", "openvino", "--cache", cache_dir, "-q"]  # fmt: skip
    r = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (home / "intel").exists(), sorted(os.listdir(home / "intel"))
    # And in-process: OpenVINO really ran, its telemetry never loaded, and it stays importable.
    code = (
        "import sys, numpy as np\n"
        "from stackvision.backbones import resolve\n"
        "from stackvision.engines import create_engine\n"
        f"e = create_engine(resolve('lite0'), engine='openvino', cache_dir={cache_dir!r})\n"
        "assert e.features(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1, 1280)\n"
        "assert 'openvino' in sys.modules and 'openvino_telemetry.main' not in sys.modules\n"
        "import openvino_telemetry\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert not (home / "intel").exists(), sorted(os.listdir(home / "intel"))
