"""The Ray runner on a real local Ray cluster (one per module: start-up is slow on small machines).

Checks: features equal the local runner's, a cache filled by one runner is fully reused by the
other, a backbone actor killed in the middle of a run loses nothing and stores nothing twice, bad
images come back as problems, and Ray stays optional.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stackvision.backbones import resolve
from stackvision.cache import FeatureCache, store_fields
from stackvision.errors import StackvisionError
from stackvision.extract import extract

VIEWS = ("orig", "flip")


def _images(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.JPEG")) or sorted(
        str(p) for p in root.rglob("*") if p.is_file()
    )


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'stackvision[ray]')")
    pytest.importorskip("ray.data", reason="ray[data] is not installed")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def lite0():
    return [resolve("lite0")]


@pytest.fixture()
def bad_file(tmp_path) -> str:
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return str(p)


def _store(cache_root, spec):
    return FeatureCache(cache_root).store(store_fields(spec, "avg", "fp32"), spec.feature_dim)


def test_ray_equals_local_and_local_reuses_ray_cache(
    ray_cluster, lite0, woof_train, cache_dir, tmp_path, bad_file
):
    from stackvision.runners import extract_features

    paths = _images(woof_train)[:24] + [bad_file]
    ray_cache = str(tmp_path / "ray-cache")
    got = extract_features(
        paths, lite0, runner="ray", views=VIEWS, cache=FeatureCache(ray_cache), batch_size=8
    )
    assert got.stats["n_computed"] == 24 and got.stats["runner"] == "ray"
    assert [p.path for p in got.problems] == [bad_file]
    assert "not an image" in got.problems[0].reason or got.problems[0].reason
    ref = extract(paths, lite0, views=VIEWS, cache=FeatureCache(cache_dir), batch_size=8)
    assert got.paths == ref.paths and got.hashes == ref.hashes
    assert np.abs(got.blocks["lite0"] - ref.blocks["lite0"]).max() <= 1e-5

    # The local runner finds everything the Ray runner stored: nothing computed.
    again = extract(paths, lite0, views=VIEWS, cache=FeatureCache(ray_cache), batch_size=8)
    assert again.stats["n_computed"] == 0 and again.stats["n_cached"] == 24
    assert np.array_equal(again.blocks["lite0"], got.blocks["lite0"])
    assert len(_store(ray_cache, lite0[0])) == 24 * len(VIEWS)


def test_ray_reuses_local_cache_and_finishes_a_partial_run(
    ray_cluster, lite0, woof_train, cache_dir, tmp_path
):
    from stackvision.runners.ray_runner import extract_ray

    paths = _images(woof_train)[:24]
    # Everything already in the local session cache (filled by the previous test or here).
    extract(paths, lite0, views=VIEWS, cache=FeatureCache(cache_dir), batch_size=8)
    full = extract_ray(paths, lite0, views=VIEWS, cache=FeatureCache(cache_dir), batch_size=8)
    assert full.stats["n_computed"] == 0 and full.stats["n_cached"] == 24

    # Started locally on 8 images (+ a duplicate file), finished on Ray: only the rest is computed.
    part = str(tmp_path / "partial")
    extract(paths[:8], lite0, views=VIEWS, cache=FeatureCache(part), batch_size=8)
    dup = str(tmp_path / "copy.jpg")
    with open(paths[9], "rb") as src, open(dup, "wb") as dst:
        dst.write(src.read())
    rest = extract_ray(
        [*paths, dup], lite0, views=VIEWS, cache=FeatureCache(part), batch_size=8, actors=1
    )
    assert rest.stats["n_cached"] == 8
    assert rest.stats["computed_per_backbone"] == {"lite0": 16}  # the copy is computed once
    assert np.abs(rest.blocks["lite0"][:24] - full.blocks["lite0"]).max() <= 1e-5
    assert np.array_equal(rest.blocks["lite0"][-1], rest.blocks["lite0"][9])
    assert len(_store(part, lite0[0])) == 24 * len(VIEWS)

    # orig cached locally, flip added on Ray: the flip rows are filled, orig ones kept
    views_part = str(tmp_path / "views")
    extract(paths[:8], lite0, views=("orig",), cache=FeatureCache(views_part), batch_size=8)
    both = extract_ray(
        paths[:8], lite0, views=VIEWS, cache=FeatureCache(views_part), batch_size=8, actors=1
    )
    assert np.abs(both.blocks["lite0"] - full.blocks["lite0"][:8]).max() <= 1e-5
    assert len(_store(views_part, lite0[0])) == 8 * len(VIEWS)


def test_killed_actor_loses_nothing_and_computes_nothing_twice(
    ray_cluster, lite0, woof_val, tmp_path
):
    from stackvision.runners.ray_runner import extract_ray

    paths = _images(woof_val)[:20]
    flag, logs = tmp_path / "kill-once", tmp_path / "logs"
    flag.write_text("the first actor to reach its second batch exits the process")
    logs.mkdir()
    cache = str(tmp_path / "fault-cache")
    got = extract_ray(
        paths,
        lite0,
        views=VIEWS,
        cache=FeatureCache(cache),
        batch_size=4,
        actors=1,
        _testing={"kill_flag": str(flag), "log_dir": str(logs)},
    )
    assert not flag.exists() and Path(str(flag) + ".taken").exists(), "no actor was killed"
    # Nothing lost: every image has both views, in the store and in the result.
    assert got.stats["n_computed"] == 20 and not got.problems
    assert len(_store(cache, lite0[0])) == 20 * len(VIEWS)
    assert np.isfinite(got.blocks["lite0"]).all() and np.abs(got.blocks["lite0"]).sum(-1).min() > 0
    # Nothing computed twice: every finished batch is logged once per image, across all actor
    # processes (the killed one and its replacement), and the driver stored no row twice.
    done = Counter(
        line.strip() for f in logs.iterdir() for line in f.read_text().splitlines() if line
    )
    assert len(list(logs.iterdir())) >= 2, "the actor was not replaced"
    assert set(done) == set(got.hashes) and max(done.values()) == 1
    assert got.stats["duplicate_rows_skipped"] == 0
    # And the local runner agrees with what survived the fault.
    ref = extract(paths, lite0, views=VIEWS, cache=FeatureCache(cache), batch_size=8)
    assert ref.stats["n_computed"] == 0


def test_cli_runner_ray(ray_cluster, woof_val, tmp_path, capsys):
    from stackvision.cli import main

    cache = str(tmp_path / "cli-cache")
    data = str(woof_val)
    args = ["extract", data, "--backbones", "lite0", "--tta", "none", "--cache", cache, "-q"]
    assert main([*args, "--runner", "ray", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "24" in out
    assert main([*args, "--runner", "local"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:5] == ["24", "24", "0", "24", "0"]  # images used bad cached computed
    assert main([*args, "--ray-address", "auto"]) == 2
    assert "--runner ray" in capsys.readouterr().err


def test_ray_is_optional(monkeypatch):
    code = (
        "import sys, stackvision, stackvision.cli, stackvision.runners, stackvision.shards;"
        "assert 'ray' not in sys.modules, 'stackvision imported ray'"
    )
    env = {**os.environ}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

    from stackvision.runners import extract_features

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(StackvisionError, match=r"pip install 'stackvision\[ray\]'"):
        extract_features(["x.jpg"], [], runner="ray")
    with pytest.raises(StackvisionError, match="unknown runner"):
        extract_features(["x.jpg"], [], runner="spark")


def test_the_local_cluster_starts_without_usage_stats(monkeypatch):
    """Ray reports usage statistics from a cluster it starts unless RAY_USAGE_STATS_ENABLED=0;
    the local cluster the runner starts has them off, and a user's own setting wins."""
    ray = pytest.importorskip("ray", reason="ray is not installed")
    pytest.importorskip("ray.data", reason="ray[data] is not installed")
    from stackvision.runners.ray_runner import connect

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: seen.append((a, k, dict(os.environ))))
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    connect(num_cpus=1)
    assert seen[-1][2]["RAY_USAGE_STATS_ENABLED"] == "0" and seen[-1][1]["num_cpus"] == 1
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    connect(num_cpus=1)
    assert seen[-1][2]["RAY_USAGE_STATS_ENABLED"] == "1"
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED")
    connect("host:6379")  # someone else's cluster: its own settings
    assert seen[-1][1]["address"] == "host:6379"
    assert "RAY_USAGE_STATS_ENABLED" not in seen[-1][2]
