"""Decode workers: threads and processes give the same pixels, in order, and report bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stackvision.decoding import DecodePool, decode_item, default_kind
from stackvision.errors import StackvisionError
from stackvision.extract import extract
from stackvision.preprocess import Preprocess


@pytest.fixture(scope="module")
def files(woof_val, tmp_path_factory):
    paths = sorted(str(p) for p in woof_val.rglob("*.JPEG"))
    assert len(paths) == 24
    bad = tmp_path_factory.mktemp("bad") / "truncated.jpg"
    bad.write_bytes(Path(paths[0]).read_bytes()[:600])
    return paths[:10] + [str(bad)] + paths[10:]


PPS = [("a", Preprocess(224, 0.875)), ("b", Preprocess(96, 1.0, interpolation="bilinear"))]


def _batches(files, size=4):
    return [[(p, PPS) for p in files[i : i + size]] for i in range(0, len(files), size)]


def test_threads_and_processes_agree_and_keep_order(files):
    expect = [decode_item(p, PPS) for p in files]
    for kind in ("threads", "processes"):
        with DecodePool(3, kind) as pool:
            got = [r for batch in pool.run(_batches(files)) for r in batch]
            assert pool.kind == kind  # the processes really ran (no fallback)
        assert len(got) == len(files)
        for e, g in zip(expect, got):
            if isinstance(e, dict):
                assert set(g) == {"a", "b"}
                assert g["a"].shape == (224, 224, 3) and g["b"].shape == (96, 96, 3)
                np.testing.assert_array_equal(g["a"], e["a"])
                np.testing.assert_array_equal(g["b"], e["b"])
            else:  # the truncated file: the same error, path and reason, from either kind
                assert g.path == e.path and g.reason == e.reason and "truncated" in g.reason


def test_broken_process_pool_falls_back_to_threads(files, monkeypatch, capsys):
    import concurrent.futures.process as cfp

    class Broken:
        def __init__(self, *a, **k):
            pass

        def submit(self, *a, **k):
            from concurrent.futures import Future

            f = Future()
            f.set_exception(cfp.BrokenProcessPool("workers could not start"))
            return f

        def shutdown(self, *a, **k):
            pass

    monkeypatch.setattr("stackvision.decoding.ProcessPoolExecutor", Broken)
    with DecodePool(2, "processes") as pool:
        got = [r for batch in pool.run(_batches(files)) for r in batch]
        assert pool.kind == "threads"
    assert len(got) == len(files) and sum(isinstance(r, dict) for r in got) == len(files) - 1
    assert "decoding in threads instead" in capsys.readouterr().err


def test_default_kind():
    assert default_kind("cpu", 16) == "threads"
    assert default_kind("cuda", 4) == "threads"
    assert default_kind("cuda:0", 16) == "processes"
    assert default_kind("cuda:0", 16, n_images=1000) == "processes"
    assert default_kind("cuda:0", 16, n_images=3) == "threads"  # not worth starting processes


def test_extract_with_process_decoding_matches_threads(files, tmp_path):
    from stackvision.backbones import resolve
    from stackvision.cache import FeatureCache

    spec = resolve("lite0")
    out = {}
    for kind in ("threads", "processes"):
        f = extract(
            files, [spec], cache=FeatureCache(str(tmp_path / kind)), decoder=kind, workers=2
        )
        assert f.stats["n_bad"] == 1 and f.problems[0].path.endswith("truncated.jpg")
        out[kind] = f.blocks["lite0"]
    np.testing.assert_array_equal(out["threads"], out["processes"])
    with pytest.raises(StackvisionError, match="unknown decoder"):
        extract(files, [spec], cache=FeatureCache(str(tmp_path / "x")), decoder="fibers")


def test_processes_do_not_rerun_an_unguarded_script(files, tmp_path):
    """Worker processes must not import the user's __main__: a script without an
    ``if __name__ == "__main__":`` guard would otherwise run its top level once per worker."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        "print('TOP LEVEL', flush=True)\n"
        "from stackvision.decoding import DecodePool\n"
        "from stackvision.preprocess import Preprocess\n"
        "items = [(p, [('a', Preprocess())]) for p in sys.argv[1:]]\n"
        "with DecodePool(3, 'processes') as pool:\n"
        "    out = [r for batch in pool.run([items[:5], items[5:]]) for r in batch]\n"
        "    print('kind', pool.kind, len(out), flush=True)\n"
    )
    good = [f for f in files if not f.endswith("truncated.jpg")][:9]
    p = subprocess.run(
        [sys.executable, str(script), *good], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("TOP LEVEL") == 1, p.stdout + p.stderr
    assert "kind processes 9" in p.stdout and "warning" not in p.stderr
