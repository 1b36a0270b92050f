"""Start-up and one-image latency (issue 14): what a process imports, what one request costs.

No timing asserts: each test checks the behaviour that makes the time (a module not imported, an
engine called once, a batch that does not wait, a resize with a few taps), on real images.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from stackvision import readout
from stackvision.backbones import _EMBEDDED, FINE_GRAINED, _describe_timm, resolve
from stackvision.cli import main
from stackvision.export import ResizeUint8, resize_matrix, resize_taps, resize_uint8
from stackvision.preprocess import Preprocess
from stackvision.serve.batching import Batcher

from .serving_helpers import child_env, images_of

LIGHT = (
    "import sys; from stackvision.cli import main; code = main(sys.argv[1:]); "
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'torchvision', "
    "'sklearn'}); print('HEAVY', heavy, file=sys.stderr); sys.exit(code)"
)


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_embedded_backbones_resolve_to_timms_own_config(name):
    """The lite configs are data in backbones.py, so resolving them needs no timm; they must say
    exactly what timm's pretrained config says."""
    cfg, dim = _describe_timm(_EMBEDDED[name][0])
    spec = resolve(name)
    assert spec.preprocess == Preprocess.from_timm_cfg(cfg)
    assert spec.feature_dim == dim
    # the stage widths kept as data give the dims a meta-device forward of the network gives
    arch = _EMBEDDED[name][0]
    for ro in ("gem+mid1", "avg+mid2", "max+mid3", "avgmax+mid4", "gem"):
        readout.feature_dim.cache_clear()
        table = readout.feature_dim(arch, ro, 288)
        with pytest.MonkeyPatch.context() as mp:
            mp.delitem(readout.STAGE_CHANNELS, arch)
            readout.feature_dim.cache_clear()
            assert table == readout.feature_dim(arch, ro, 288), (name, ro)
    readout.feature_dim.cache_clear()


def test_resolving_the_default_and_fine_grained_stacks_imports_no_timm():
    code = (
        "import sys; from stackvision.backbones import resolve; "
        f"specs = [resolve(n) for n in ('lite0', 'lite1', 'lite2', *{FINE_GRAINED!r})]; "
        "print([s.preprocess.input_size for s in specs], "
        "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'torchvision'}))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=child_env(), timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[224, 240, 260, 256, 272, 288] []"


def _summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    head = lines.index(next(ln for ln in lines if ln.split()[:1] == ["images"]))
    return dict(zip(lines[head].split(), lines[head + 2].split()))


def test_a_warm_extract_imports_no_timm_or_torch(woof_train, woof_val, tmp_path, capsys):
    """An engine folder with the compiled export: computing new features needs OpenVINO (or ONNX
    Runtime) only; the network is built, and timm/torch imported, only when an export is missing."""
    cache = str(tmp_path / "cache")
    run = ["extract", "--backbones", "lite0", "--tta", "none", "--cache", cache, "-q"]
    run += ["--device", "cpu"]
    assert main([*run, str(woof_val)]) == 0  # exports and compiles lite0 (imports torch here)
    first = _summary(capsys.readouterr().out)
    assert int(first["computed"]) == len(images_of(woof_val))
    p = subprocess.run([sys.executable, "-c", LIGHT, *run, str(woof_train)], capture_output=True,
                       text=True, env=child_env(), timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stderr, p.stderr
    row = _summary(p.stdout)
    assert int(row["computed"]) == len(images_of(woof_train)) and int(row["cached"]) == 0
    # one view, one backbone: a pass per image
    assert float(row["passes/s"]) == pytest.approx(float(row["img/s"]), rel=0.02)


def _dense_resize(batch: np.ndarray, size: int) -> np.ndarray:
    """The resize as the full matrix product it is defined by (the old implementation)."""
    m = resize_matrix(batch.shape[1], size)
    y = np.matmul(np.matmul(m, batch.transpose(0, 3, 1, 2).astype(np.float64)), m.T)
    return np.clip(np.round(y), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [224, 240])
def test_the_tap_resize_equals_the_matrix_product_and_the_graphs_module(woof_val, size):
    """The separable resize reads a few taps per pixel (not all 260), and gives the same bytes as
    the dense product and as the torch module that ONNX export writes."""
    import torch

    from stackvision.export import prepare_images

    idx, w = resize_taps(260, size)
    assert idx.shape == (size, 5) and np.allclose(w.sum(axis=1), 1)
    pp = Preprocess(input_size=260, crop_pct=0.89)
    batch = prepare_images(images_of(woof_val)[:5], pp)
    got = resize_uint8(batch, size)
    assert got.shape == (5, size, size, 3) and got.dtype == np.uint8
    assert (got == _dense_resize(batch, size)).all()
    assert (ResizeUint8(260, size)(torch.from_numpy(batch)).numpy() == got).all()


def test_one_image_with_flip_is_one_engine_call_per_backbone(stack_dir, heldout, cache_dir):
    """forward_uint8 sends the image and its flip to each engine together (one batch of 2)."""
    from stackvision import load_model
    from stackvision.export import prepare_images

    model = load_model(str(stack_dir), cache_dir=cache_dir, device="cpu")
    assert model.n_views_ == 2
    batch = prepare_images(images_of(heldout)[:3], model)
    want = model.forward_uint8(batch)  # builds the engines
    calls = []

    class Counting:
        def __init__(self, engine):
            self.engine = engine

        def features(self, x):
            calls.append(len(x))
            return self.engine.features(x)

    model._engines = {k: Counting(e) for k, e in model._engines.items()}
    one = model.forward_uint8(batch[:1])
    assert calls == [2] * len(model.specs_)
    np.testing.assert_allclose(one, want[:1], atol=1e-5)
    calls.clear()
    np.testing.assert_allclose(model.forward_uint8(batch), want, atol=1e-6)
    assert calls == [6] * len(model.specs_)
    assert model.forward_uint8(batch[:0]).shape == (0, len(model.classes_))


def _batch_sizes(coro_factory, max_wait_ms: float):
    seen = []

    def predict(x):
        seen.append(len(x))
        return np.asarray(x, np.float64).reshape(len(x), -1)[:, :2]

    async def go():
        b = Batcher(predict, max_batch=8, max_wait_ms=max_wait_ms)
        await b.start()
        try:
            return await asyncio.wait_for(coro_factory(b), 60), b.snapshot()
        finally:
            await b.stop()

    out, snap = asyncio.run(go())
    return out, seen, snap


def test_a_lone_request_does_not_wait_for_the_batching_window():
    """An hour-long window: a lone image still comes back at once (the wait_for would fail)."""

    async def lone(b):
        return await b.submit(np.full((2, 2, 3), 7, np.uint8))

    out, seen, snap = _batch_sizes(lone, max_wait_ms=3_600_000)
    assert seen == [1] and out.tolist() == [7.0, 7.0]
    assert snap["incoming"] == 0


def test_a_batch_waits_for_images_still_being_decoded():
    """While another request is on its way (being read or decoded), the batch waits for it."""

    async def two(b):
        with b.expecting(1) as exp:  # request B: being decoded
            first = asyncio.create_task(b.submit(np.zeros((2, 2, 3), np.uint8)))
            await asyncio.sleep(0.05)  # A is queued; the collector must not run it alone
            assert b.incoming == 1 and not first.done()
            second = await b.submit(np.ones((2, 2, 3), np.uint8), exp)
        return [await first, second]

    (a, b_), seen, snap = _batch_sizes(two, max_wait_ms=3_600_000)
    assert seen == [2] and a.tolist() == [0, 0] and b_.tolist() == [1, 1]
    assert snap["incoming"] == 0


def test_the_server_process_runs_blas_on_one_thread():
    """Spinning BLAS threads took the cores from the engines (370 ms vs 55 ms a request)."""
    code = (
        "from stackvision.threads import blas_threads, limit_blas_threads; import numpy; "
        "before = blas_threads(); ok = limit_blas_threads(1); print(ok, set(blas_threads()))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**child_env(), "OPENBLAS_NUM_THREADS": "2"}, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "{1}"]
