"""The extraction pipeline: listing -> decode workers -> engines -> feature cache -> feature blocks.

Every image is hashed first; only (image, view) pairs missing from a backbone's store are decoded
and pushed through that backbone. Each image is decoded once for all backbones that need it
(resized per backbone), decoding of the next batch overlaps inference of the current one, and the
batch's features are committed to the cache before the next batch starts, so a killed run resumes
where it stopped and peak memory is a few batches, whatever the number of images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .backbones import BackboneSpec
from .cache import VIEWS, FeatureCache, store_fields
from .data import Problem
from .decoding import DecodePool, default_kind, default_workers
from .engines import create_engine, numbers_id
from .errors import StackvisionError
from .gpu_decode import TorchvisionPool, pixels_id, resolve_decoder
from .images import ImageDecodeError
from .one_pass import one_pass, read_hashed
from .progress import progress as progress_bar
from .progress import say
from .train_views import ViewCrop, is_train_view

#: seconds of hashing before its progress shows (a bar on a terminal, else lines)
HASH_DELAY = 2.0
#: threads for hashing: more only contend for the GIL (500 small JPEGs here: 37 ms on 1 thread,
#: 66 ms on 4, 52 ms on 16; on a 16-core GPU machine 4 threads beat 16, BENCHMARKS.md)
HASH_THREADS = 4


@dataclass
class Features:
    """Per-backbone feature blocks for the images that could be used."""

    paths: list[str]  # kept paths, input order
    index: np.ndarray  # position of each kept path in the input sequence
    hashes: list[str]
    views: tuple[str, ...]
    blocks: dict[str, np.ndarray]  # backbone name -> float32 (N, n_views, dim)
    problems: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def stacked(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Concatenate the named backbones' features: float32 (N, n_views, sum of dims)."""
        names = list(names or self.blocks)
        return np.concatenate([self.blocks[n] for n in names], axis=-1)

    def subset(self, rows: np.ndarray) -> Features:
        """The same features for ``rows`` only (positions in ``paths``)."""
        if len(rows) == len(self.paths):
            return self
        return Features(
            [self.paths[i] for i in rows], self.index[rows], [self.hashes[i] for i in rows],
            self.views, {n: b[rows] for n, b in self.blocks.items()}, self.problems, self.stats,
        )  # fmt: skip


def model_device(engine: str = "auto", device: str = "auto", precision: str = "fp32") -> str:
    """Where the backbones will run: ``cuda...`` for the torch engine on a GPU, else ``cpu``."""
    from .engines import resolve_device, resolve_engine

    if resolve_engine(engine, device, precision) != "torch":
        return "cpu"
    return resolve_device(device)


def _hash_file(path: str) -> str | ImageDecodeError:
    got = read_hashed(path)
    return got if isinstance(got, ImageDecodeError) else got[0]


def extract(
    paths: Sequence[str],
    specs: Sequence[BackboneSpec],
    *,
    views: Sequence[str] = ("orig",),
    pool: str = "avg",
    cache: FeatureCache | None = None,
    engine: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = False,
    assemble: bool = True,
    calibration: dict[str, str] | None = None,
    decoder: str = "auto",
) -> Features:
    """Features of ``paths`` for each backbone and view, computing only what the cache lacks.

    ``assemble=False`` fills the cache only (``blocks`` stays empty): for data sets whose features
    do not fit in memory, read them back with :mod:`stackvision.shards`.

    ``precision="int8"``: each backbone is quantised on a calibration set drawn from ``paths``
    (chosen by content hash), unless ``calibration`` maps its name to the key of a set used
    before (prediction with a model trained in int8). The keys used are in ``stats["calibration"]``
    and are part of the store key, since int8 features depend on the calibration images.
    """
    check_args(views, batch_size, train_views=True)
    views = tuple(views)
    crops = [v for v in views if is_train_view(v)]  # augmented training views: their own crops
    mdev = model_device(engine, device, precision)
    decoder = resolve_decoder(decoder, mdev)  # pil, threads, processes or torchvision
    if crops and decoder == "torchvision":  # random-resized crops are made by PIL
        decoder = "threads"
    workers = workers or default_workers(mdev)
    cache = cache or FeatureCache()
    t0 = time.perf_counter()
    if decoder == "torchvision" and precision != "int8":  # int8 calibrates on hashes first
        return _one_pass_extract(
            paths, specs, views, pool, cache, engine, precision, device, mdev,
            batch_size, strict, progress, assemble,
        )  # fmt: skip

    # 1. Content hashes (cheap next to inference; they are what the cache is keyed by).
    hashes: list[str | None] = [None] * len(paths)
    failed: dict[int, str] = {}
    # usually instant; 13k files on a slow disk are not: lines only if it lasts (see HASH_DELAY)
    hash_bar = progress_bar(len(paths), "hash", "file", progress, delay=HASH_DELAY)
    with ThreadPoolExecutor(min(workers, HASH_THREADS)) as pool_ex:
        for i, res in enumerate(pool_ex.map(_hash_file, paths, chunksize=64)):
            if isinstance(res, ImageDecodeError):
                failed[i] = res.reason
            else:
                hashes[i] = res
            hash_bar.update(1)
    hash_bar.close()
    t_hash = time.perf_counter() - t0
    calibs = _calibrations(paths, hashes, specs, precision, calibration or {})
    stores = _stores(cache, specs, pool, engine, precision, device, decoder, calibs)

    # 2. Which (image, backbone) pairs are missing any requested view.
    live, lacking = missing_by_view(stores, hashes, views)  # only these (hash, view) are computed
    todo = {name: set().union(*lack.values()) for name, lack in lacking.items()}
    plain = {n: set().union(*(s for v, s in lack.items() if v not in crops))
             for n, lack in lacking.items()}  # fmt: skip
    need = [i for i, h in enumerate(hashes) if h is not None and any(h in t for t in todo.values())]
    need = list(dict.fromkeys(need))
    n_cached = len(live) - len(need)

    # 3. Decode (worker threads, one batch ahead) and run the engines on what is missing.
    computed = {name: 0 for name in stores}
    t1 = time.perf_counter()
    if need:
        active = [s for s in specs if todo[s.name]]
        engines = {
            s.name: create_engine(
                s,
                pool=pool,
                engine=engine,
                device=device,
                precision=precision,
                cache_dir=cache.base,
                calibration=calibs.get(s.name),
            )
            for s in active
        }
        batches = [need[i : i + batch_size] for i in range(0, len(need), batch_size)]
        names = "+".join(s.name for s in active)
        say(
            f"extract: {len(need):,} image(s) x {len(views)} view(s) to compute through {names}; "
            f"{n_cached:,} from the cache",
            progress,
        )
        bar = progress_bar(len(need), f"extract {names}", "img", progress)
        seen: set[tuple[str, str]] = set()

        def work(batch):  # (path, [(key, what to crop)]): a backbone's crop, or a view's
            return [
                (paths[i], [(s.name, s.preprocess) for s in active if hashes[i] in plain[s.name]]
                 + [((s.name, v), ViewCrop(s.preprocess, v, hashes[i])) for s in active
                    for v in crops if hashes[i] in lacking[s.name][v]])
                for i in batch
            ]  # fmt: skip

        if decoder == "torchvision":  # int8: decode on the model's device, hashes known
            decode_pool = TorchvisionPool(mdev, workers)
        else:
            kind = default_kind(mdev, workers, len(need)) if decoder == "pil" else decoder
            decode_pool = DecodePool(workers, kind)
        with decode_pool as decoding:
            for batch, results in zip(batches, decoding.run(work(b) for b in batches)):
                per_backbone: dict[str, list[tuple[str, np.ndarray]]] = {s.name: [] for s in active}
                per_view: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = {}
                for i, res in zip(batch, results):
                    if isinstance(res, ImageDecodeError):
                        if strict:
                            raise StackvisionError(
                                f"bad image {paths[i]}: {res.reason}",
                                "remove or replace it, or run without --strict to skip bad images",
                            )
                        failed[i] = res.reason
                        continue
                    for name, arr in res.items():
                        key = (name, hashes[i])
                        if key not in seen:  # duplicate files are computed once
                            seen.add(key)
                            if isinstance(name, tuple):  # (backbone, view): a training view
                                per_view.setdefault(name, []).append((hashes[i], arr))
                            else:
                                per_backbone[name].append((hashes[i], arr))
                for name, items in per_backbone.items():
                    if not items:
                        continue
                    hs = [h for h, _ in items]
                    x = np.stack([a for _, a in items])
                    rows = []
                    for v in views:  # a view already cached (orig, when flip is added) is kept
                        if v in crops:
                            continue
                        sel = [k for k, h in enumerate(hs) if h in lacking[name][v]]
                        if not sel:
                            continue
                        xs = x if len(sel) == len(hs) else x[sel]
                        xv = xs if v == "orig" else np.ascontiguousarray(xs[:, :, ::-1])
                        feats = engines[name].features(xv)
                        rows += [(hs[k], v, f) for k, f in zip(sel, feats)]
                    stores[name].put_many(rows)
                for (name, v), items in per_view.items():
                    feats = engines[name].features(np.stack([a for _, a in items]))
                    stores[name].put_many([(h, v, f) for (h, _), f in zip(items, feats)])
                for name, items in per_backbone.items():  # images computed, in any view
                    done = {h for h, _ in items}.union(
                        *({h for h, _ in it} for (n, _), it in per_view.items() if n == name)
                    )
                    computed[name] += len(done)
                bar.update(len(batch))
        bar.close()
    t_compute = time.perf_counter() - t1

    # 4. Assemble the blocks for every usable image.
    keep, kept_hashes, blocks, problems = collect(
        paths, hashes, failed, stores, specs, views, strict=strict, assemble=assemble
    )
    n_new = len(need) - sum(1 for i in need if i in failed)
    stats = _stats(paths, keep, failed, n_cached, n_new, computed, t_hash, t_compute, t0)
    stats["calibration"] = {name: c.key for name, c in calibs.items()}
    stats["pixels"] = pixels_id(decoder)
    return Features(
        [paths[i] for i in keep], np.asarray(keep, dtype=np.int64), kept_hashes, views, blocks,
        problems, stats,
    )  # fmt: skip


def _one_pass_extract(
    paths, specs, views, pool, cache, engine, precision, device, mdev, batch_size, strict,
    progress, assemble,
) -> Features:  # fmt: skip
    """:func:`extract` with ``--decoder torchvision``: each file read once (:mod:`.one_pass`)."""
    t0 = time.perf_counter()
    stores = _stores(cache, specs, pool, engine, precision, device, "torchvision", {})
    say(
        f"extract: {len(paths):,} image(s) x {len(views)} view(s) through "
        f"{'+'.join(s.name for s in specs)}, each file read once, decoded on {mdev}",
        progress,
    )

    def make(spec):
        kw = {"pool": pool, "engine": engine, "device": device, "precision": precision}
        return create_engine(spec, **kw, cache_dir=cache.base)

    r = one_pass(
        paths, specs, stores, views, make, device=mdev, batch_size=batch_size, strict=strict,
        progress=progress,
    )  # fmt: skip
    t_compute = time.perf_counter() - t0
    keep, kept_hashes, blocks, problems = collect(
        paths, r.hashes, r.failed, stores, specs, views, strict=strict, assemble=assemble
    )
    n_cached = sum(h is not None for h in r.hashes) - r.n_lacking
    n_new = r.n_lacking - r.n_decode_failed
    stats = _stats(paths, keep, r.failed, n_cached, n_new, r.computed, 0.0, t_compute, t0)
    stats.update(calibration={}, pixels="torchvision")
    return Features(
        [paths[i] for i in keep], np.asarray(keep, dtype=np.int64), kept_hashes, tuple(views),
        blocks, problems, stats,
    )  # fmt: skip


def _stores(cache, specs, pool, engine, precision, device, decoder, calibs) -> dict:
    return {
        s.name: cache.store(
            store_fields(
                s, pool, numbers_id(engine, precision, calibs.get(s.name), device),
                pixels_id(decoder),
            ),
            s.feature_dim,
        )
        for s in specs
    }  # fmt: skip


def _stats(paths, keep, failed, n_cached, n_new, computed, t_hash, t_compute, t0) -> dict:
    return {
        "n_images": len(paths),
        "n_used": len(keep),
        "n_bad": len(failed),
        "n_cached": n_cached,
        "n_computed": n_new,
        "computed_per_backbone": computed,
        "hash_seconds": round(t_hash, 3),
        "compute_seconds": round(t_compute, 3),
        "images_per_second": round(n_new / t_compute, 2) if n_new and t_compute > 0 else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def check_args(views, batch_size, train_views: bool = False) -> None:
    """The argument checks every runner makes before touching a file; ``train_views``: the
    runner makes augmented training views (:mod:`stackvision.train_views`)."""
    for v in views:
        if is_train_view(v) and not train_views:
            raise StackvisionError(
                f"augmented training views ({v}) are made by the local runner only",
                "use --runner local, or leave out --train-views",
            )
        if v not in VIEWS and not is_train_view(v):
            raise StackvisionError(f"unknown view '{v}'", f"use {' or '.join(VIEWS)}")
    if batch_size < 1:
        raise StackvisionError(
            f"batch size must be at least 1, got {batch_size}", "use --batch-size 32"
        )


def missing_by_view(stores, hashes, views) -> tuple[list[str], dict[str, dict[str, set[str]]]]:
    """The usable hashes, and per backbone and view the hashes its store lacks."""
    live = [h for h in hashes if h is not None]
    return live, {
        name: {v: store.missing(live, v) for v in views} for name, store in stores.items()
    }


def missing(stores, hashes, views) -> tuple[list[str], dict[str, set[str]]]:
    """The usable hashes, and per backbone the hashes that lack any of ``views`` in its store."""
    live, by_view = missing_by_view(stores, hashes, views)
    return live, {name: set().union(*lack.values()) for name, lack in by_view.items()}


def collect(paths, hashes, failed, stores, specs, views, *, strict=False, assemble=True):
    """The end of every runner: stop on a bad image with ``strict``, else read the usable images'
    features back from the stores. Returns (kept indices, their hashes, blocks, problems)."""
    if failed and strict:
        i = min(failed)
        raise StackvisionError(
            f"bad image {paths[i]}: {failed[i]}",
            "remove or replace it, or run without --strict to skip bad images",
        )
    keep = [i for i in range(len(paths)) if i not in failed]
    kept_hashes = [hashes[i] for i in keep]
    blocks = {}
    for s in specs if assemble else ():
        per_view = []
        for v in views:
            got = stores[s.name].get_many(kept_hashes, v)
            per_view.append(
                np.stack([got[h] for h in kept_hashes])
                if keep
                else np.zeros((0, s.feature_dim), np.float32)
            )
        blocks[s.name] = np.stack(per_view, axis=1)
    problems = [Problem(paths[i], failed[i]) for i in sorted(failed)]
    return keep, kept_hashes, blocks, problems


def _calibrations(paths, hashes, specs, precision, given: dict[str, str]) -> dict:
    """The int8 calibration set of each backbone (none for other precisions)."""
    if precision != "int8":
        return {}
    from .engines import Calibration

    return {
        s.name: Calibration(given[s.name])
        if s.name in given
        else Calibration.from_images(paths, s, hashes=hashes)
        for s in specs
    }
