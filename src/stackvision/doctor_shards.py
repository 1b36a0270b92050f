"""The data doctor on a sharded feature set (``extract --export-shards``): for features larger
than memory.

The stacked features stay on disk (memory-mapped, read a chunk at a time). What is held in memory
is one row of ``project`` floats per image (2 KB at 512) and the out-of-fold probabilities:

1. two streamed passes over the first view: its mean, then each chunk centred, randomly projected
   to ``project`` dimensions (the same fixed projection as :func:`stackvision.neighbours.knn` uses
   for wide rows; on cub86 it kept 99.1% of the 10 nearest neighbours) and L2-normalised;
2. near-duplicate groups on those rows (exact search up to 40k rows, faiss HNSW above);
3. k-fold heads trained by streaming (:func:`stackvision.streaming.fit_streaming`: minibatch
   logistic regression, early-stopped on the fold it then predicts), groups kept in one fold;
4. :func:`stackvision.doctor.diagnose` on those rows and probabilities.

Shards hold image hashes, not paths: rows are named ``shard row I (image HASH)`` unless the data
the shards came from is given (``paths_by_hash``).
"""

from __future__ import annotations

import time

import numpy as np

from .doctor import Diagnosis, diagnose
from .errors import StackvisionError
from .neighbours import PROJECT_DIMS, _unit, duplicate_pairs, groups_from_pairs


def streamed_embedding(
    feats, chunk_rows: int = 8192, project: int | None = PROJECT_DIMS, frame=None
):
    """Unit rows (N, min(D, project)) of the first view, centred, projected; two passes.
    ``frame``: the (mean, projection) of another set to use instead (val rows are put in the
    training rows' frame); the frame used is returned beside the rows."""
    n, d = len(feats), feats.dim
    if frame is None:
        total = np.zeros(d, np.float64)
        for _, x in feats.chunks(None, chunk_rows):
            total += x[:, 0].astype(np.float64).sum(0)
        mean = (total / max(n, 1)).astype(np.float32)
        P = None
        if project and d > project:
            P = np.random.default_rng(0).standard_normal((d, project)).astype(np.float32)
        frame = (mean, P)
    mean, P = frame
    Z = np.empty((n, P.shape[1] if P is not None else d), np.float32)
    for ids, x in feats.chunks(None, chunk_rows):
        z = x[:, 0] - mean
        Z[ids] = _unit(z @ P if P is not None else z)
    return Z, frame


def _val_rows(path: str, train, classes: list[str], chunk_rows, frame, names: dict):
    """The validation shards' rows in the training rows' frame, their names and class indices."""
    from .shards import ShardedFeatures

    val = ShardedFeatures(path)
    if val.dim != train.dim or val.backbones != train.backbones:
        raise StackvisionError(
            f"the validation shards at {path} hold other features than the training shards",
            "export both with the same --backbones (and --pool): stackvision extract VAL "
            "--backbones ... --export-shards DIR",
        )
    Zv, _ = streamed_embedding(val, chunk_rows, frame=frame)
    pos = {c: i for i, c in enumerate(classes)}
    vy = np.full(len(val), -1, np.int64)
    if val.classes:
        vc = list(val.classes)
        vy = np.asarray([pos.get(vc[i], -1) if i >= 0 else -1 for i in val.labels()], np.int64)
    hashes = val.hashes()
    vnames = [names.get(h) or f"val shard row {i} (image {h[:12]})" for i, h in enumerate(hashes)]
    return Zv, vnames, vy, hashes


def diagnose_shards(
    path: str,
    *,
    folds: int = 5,
    seed: int = 0,
    chunk_rows: int = 8192,
    project: int | None = PROJECT_DIMS,
    paths_by_hash: dict[str, str] | None = None,
    val_path: str | None = None,
) -> Diagnosis:
    """``val_path``: the validation set's shards (same backbones): searched for leaks and
    outliers, as ``doctor --val`` does in memory."""
    from .shards import ShardedFeatures
    from .streaming import fit_streaming
    from .validation import apply_temperature, fit_temperature, kfold_splits

    t0 = time.perf_counter()
    feats = ShardedFeatures(path)
    if not feats.classes:
        raise StackvisionError(
            f"the sharded feature set at {path} has no labels",
            "export it from labelled data: stackvision extract DATA --export-shards DIR",
        )
    y = feats.labels().astype(np.int64)
    if (y < 0).any():
        raise StackvisionError(f"{int((y < 0).sum())} unlabelled rows in {path}", "export again")
    classes = list(feats.classes)
    hashes = feats.hashes()
    Z, frame = streamed_embedding(feats, chunk_rows, project)
    val = None
    all_hashes = list(hashes)
    if val_path:
        Zv, vnames, vy, vhashes = _val_rows(
            val_path, feats, classes, chunk_rows, frame, paths_by_hash or {}
        )
        val, all_hashes = (None, vnames, vy), all_hashes + vhashes
        Z = np.concatenate([Z, Zv])
    base = np.unique(np.asarray(all_hashes), return_inverse=True)[1]
    n = len(y)
    neighbours = duplicate_pairs(Z)  # also the diagnosis's: searched once
    groups = groups_from_pairs(len(Z), neighbours[0], base)[:n]
    counts = np.bincount(y, minlength=len(classes))
    k = int(max(2, min(folds, counts[counts > 0].min())))
    oof = np.full((len(y), len(classes)), 1.0 / len(classes))
    for fi, (tr, va) in enumerate(kfold_splits(y, k, seed, groups)):
        tr, va = np.sort(tr), np.sort(va)
        _, vp = fit_streaming(feats, y, "logreg", None, tr, va, len(classes), seed=seed + fi)
        oof[va] = vp
    oof = apply_temperature(oof, fit_temperature(oof, y))
    names = [
        (paths_by_hash or {}).get(h) or f"shard row {i} (image {h[:12]})"
        for i, h in enumerate(hashes)
    ]
    d = diagnose(
        None,
        y,
        classes,
        names,
        val=val,
        embedding=Z,
        oof=oof,
        base_groups=base,
        seed=seed,
        neighbours=neighbours,
    )
    d.stats["seconds"] = round(time.perf_counter() - t0, 3)
    d.stats["out_of_fold"] = f"{k}-fold streamed logreg"
    d.stats["search"] += (
        f" on a {Z.shape[1]}-dim projection, streamed from {feats.n_shards} shard(s)"
    )
    return d
