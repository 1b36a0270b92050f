"""The data doctor: likely label errors, near-duplicates and train/val leaks, outliers and class
problems, found on cached features only.

Input: stacked features ``X`` (N, views, D) of the training images with their labels, optionally
the features of a validation set, and optionally out-of-fold probabilities already computed (a
``train`` run has them). What it does:

1. **Neighbours** (:mod:`stackvision.neighbours`): train and validation rows together, centred and
   L2-normalised; the 10 nearest neighbours of each. Two rows are near-duplicates when their
   CSLS score ``2 cos(a, b) - r_a - r_b`` (``r``: mean cosine to the 10 nearest neighbours) is at
   least ``DUP_CSLS``: a plain cosine threshold cannot tell a re-encoded copy (cosine 0.66-0.99 on
   cub86) from two photos of one species in a dense class (up to 0.95); measuring against each
   row's own neighbourhood can (see BENCHMARKS.md, "doctor"). Pairs are joined into groups
   (union-find, identical bytes included); a group with rows on both sides is a **leak**.
2. **Out-of-fold probabilities**: k-fold logistic heads on the stacked features (the training
   code: :func:`stackvision.validation.cross_validate`), with near-duplicate groups kept in one
   fold so a copy cannot vouch for its own label, temperature-calibrated.
3. **Label issues**: cleanlab's ``find_label_issues`` (confident learning: as many rows as the
   confident joint estimates are mislabelled, those of lowest self-confidence; ``low_self_confidence``
   had P 0.90 / R 0.94 on cub86 with 5% flips where the default ``prune_by_noise_rate`` had 0.63 / 0.75)
   on those probabilities, ranked by self-confidence, each with its suggested label (the most
   probable class), the probability of the given label and of the top class.
4. **Outliers**: robust z-scores (median / MAD) of the neighbourhood density ``r`` and of the
   cosine to the nearest class centre; an image low on both (mean z below ``OUTLIER_Z``) is far
   from every class.
5. **Class problems**: classes with few images, and pairs of classes the out-of-fold predictions
   confuse often (both ways, as a share of the two classes' images).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import StackvisionError
from .neighbours import DUP_CSLS, K, duplicate_pairs, embed, groups_from_pairs

#: an image is an outlier when the mean of its robust z-scores (neighbourhood density, cosine to
#: the nearest class centre) is below this
OUTLIER_Z = -3.5
#: a class is tiny below max(TINY_MIN, TINY_SHARE x the median class size)
TINY_MIN, TINY_SHARE = 5, 0.25
#: class pairs confused at least this share of their images are listed; above HARD, "indistinguishable"
CONFUSED_SHARE, CONFUSED_HARD = 0.10, 0.30


@dataclass
class Diagnosis:
    """Everything the doctor found; rows refer to ``paths`` (training rows first, then ``--val``)."""

    paths: list[str]
    split: list[str]  # "train" or "val" per row
    labels: list[str]  # given label per row
    classes: list[str]
    label_issues: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # near-duplicate groups (leaks flagged)
    outliers: list[dict] = field(default_factory=list)
    class_problems: list[dict] = field(default_factory=list)
    train_groups: np.ndarray | None = None  # group id per training row (for k-fold)
    oof: np.ndarray | None = None  # out-of-fold probabilities of the training rows
    problems: list = field(default_factory=list)  # files left out (unreadable, conflicting copies)
    stats: dict = field(default_factory=dict)

    @property
    def leaks(self) -> list[dict]:
        return [g for g in self.groups if g["leak"]]

    def summary(self) -> dict:
        return {
            "n_train": self.split.count("train"),
            "n_val": self.split.count("val"),
            "label_issues": len(self.label_issues),
            "duplicate_groups": sum(not g["leak"] for g in self.groups),
            "duplicate_files": sum(len(g["paths"]) for g in self.groups if not g["leak"]),
            "leaks": len(self.leaks),
            "outliers": len(self.outliers),
            "class_problems": len(self.class_problems),
        }


def robust_z(v: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 MAD): a z-score that a few extreme values do not move."""
    v = np.asarray(v, np.float64)
    med = np.median(v) if len(v) else 0.0
    mad = 1.4826 * np.median(np.abs(v - med)) if len(v) else 0.0
    return (v - med) / (mad if mad > 1e-12 else 1.0)


def out_of_fold(X, y, n_classes, *, n_views=1, folds=5, groups=None, seed=0, progress=False):
    """Calibrated out-of-fold probabilities of k-fold logistic heads (the training code's).

    ``n_views=1`` (the doctor's default): the original view only. On cub86 with 5% flips it found
    the same label errors as both views (P 0.90 / R 0.93 vs 0.90 / 0.94) in about half the time.
    """
    from .validation import apply_temperature, cross_validate, fit_temperature, kfold_splits

    counts = np.bincount(y, minlength=n_classes)
    k = int(max(2, min(folds, counts[counts > 0].min() if counts.any() else 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            splits = kfold_splits(y, k, seed, groups)
        except ValueError:  # every class smaller than 2 folds
            raise StackvisionError(
                "every class has a single image: no out-of-fold predictions are possible",
                "the doctor needs classes of at least 2 images: add images",
            ) from None
        res = cross_validate("logreg", None, X, y, n_classes, splits, n_views, seed=seed, progress=progress)  # fmt: skip
    proba = np.full((len(y), n_classes), 1.0 / n_classes)
    proba[res.oof_index] = res.oof_proba
    return apply_temperature(proba, fit_temperature(proba, y)), k


def find_label_issues(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Rows whose label is likely wrong, most certain first (cleanlab, self-confidence order)."""
    from cleanlab.filter import find_label_issues as cl_find

    present = np.unique(y)
    if len(present) < 2 or len(y) < 4:
        return np.zeros(0, np.int64)
    # cleanlab wants every column to be a class that occurs: restrict to present classes
    col = {c: i for i, c in enumerate(present.tolist())}
    yy = np.asarray([col[c] for c in y.tolist()], np.int64)
    p = proba[:, present]
    p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = cl_find(
            yy,
            p,
            filter_by="low_self_confidence",
            return_indices_ranked_by="self_confidence",
            n_jobs=1,
        )
    return np.asarray(rows, np.int64)


def _class_problems(y, proba, classes) -> list[dict]:
    n = len(classes)
    counts = np.bincount(y, minlength=n)
    out = []
    limit = max(TINY_MIN, TINY_SHARE * float(np.median(counts[counts > 0])))
    for c in np.flatnonzero((counts > 0) & (counts < limit)):
        out.append({"kind": "tiny_class", "classes": [classes[c]], "images": int(counts[c]),
                    "detail": f"{counts[c]} image(s); the median class has {np.median(counts):.0f}"})  # fmt: skip
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y, proba.argmax(1)), 1)
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            both = cm[a, b] + cm[b, a]
            share = both / max(counts[a] + counts[b], 1)
            if both >= 2 and share >= CONFUSED_SHARE:
                pairs.append((share, a, b, both))
    for share, a, b, both in sorted(pairs, reverse=True)[:15]:
        kind = "indistinguishable" if share >= CONFUSED_HARD else "confusable"
        out.append({"kind": kind, "classes": [classes[a], classes[b]], "images": int(counts[a] + counts[b]),
                    "share": round(float(share), 4),
                    "detail": f"{both} of {counts[a] + counts[b]} images taken for the other class (out-of-fold)"})  # fmt: skip
    return out


def diagnose(
    X: np.ndarray | None,
    y: np.ndarray,
    classes: Sequence[str],
    paths: Sequence[str],
    *,
    n_views: int = 1,
    val: tuple[np.ndarray, Sequence[str], np.ndarray | None] | None = None,
    oof: np.ndarray | None = None,
    base_groups: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    dup_csls: float = DUP_CSLS,
    progress: bool = False,
    embedding: np.ndarray | None = None,
    neighbours: tuple | None = None,
) -> Diagnosis:
    """Examine training features ``X`` (N, views, D) with class indices ``y``.

    ``embedding``: the unit rows to search (train then val) when ``X`` is not in memory (the shard
    path gives them, with ``oof``; ``X`` may then be None). ``neighbours``: what
    :func:`duplicate_pairs` gave on ``embedding`` with ``dup_csls``, when the caller already
    searched it (the shard path, for its folds): the search is not run twice.

    ``val``: (features, paths, class indices or None) of a validation set, searched for leaks and
    outliers. ``oof``: out-of-fold probabilities for every training row (else computed).
    ``base_groups``: one id per row of train then val, equal for identical bytes.
    """
    t0 = time.perf_counter()
    classes = list(classes)
    y = np.asarray(y, np.int64)
    n = len(y)
    Xa = X[:, 0] if X is not None else None
    vpaths, vy = [], np.zeros(0, np.int64)
    if val is not None:
        Xa = np.concatenate([Xa, val[0][:, 0]]) if Xa is not None else None
        vpaths = list(val[1])
        vy = np.asarray(val[2] if val[2] is not None else np.full(len(vpaths), -1), np.int64)
    m = len(Xa) if embedding is None else len(embedding)
    split = ["train"] * n + ["val"] * (m - n)
    labels = [classes[i] for i in y] + [classes[i] if i >= 0 else "" for i in vy]
    d = Diagnosis(list(paths) + vpaths, split, labels, classes)

    # 1. neighbours, near-duplicates, leaks
    E = embed(Xa).vectors if embedding is None else embedding
    k = min(K, max(m - 1, 1))
    pairs, r = neighbours if neighbours is not None else duplicate_pairs(E, k, dup_csls)
    gid = groups_from_pairs(m, pairs, base_groups)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(gid.tolist()):
        members.setdefault(g, []).append(i)
    best = {}
    for a, _b, s in pairs:
        best[gid[a]] = max(best.get(gid[a], -np.inf), s)
    for g, rows in members.items():
        if len(rows) < 2:
            continue
        sides = {split[i] for i in rows}
        d.groups.append({
            "group": len(d.groups), "rows": rows, "paths": [d.paths[i] for i in rows],
            "splits": [split[i] for i in rows], "labels": [labels[i] for i in rows],
            "score": round(float(best.get(g, 1.0)), 4), "leak": sides == {"train", "val"},
            "identical": g not in best,
        })  # fmt: skip
    d.groups.sort(key=lambda g: (not g["leak"], -g["score"]))
    for i, g in enumerate(d.groups):
        g["group"] = i
    d.train_groups = np.unique(gid[:n], return_inverse=True)[1] if n else np.zeros(0, np.int64)
    t_nn = time.perf_counter() - t0

    # 2. out-of-fold probabilities, 3. label issues
    k_used = None
    if oof is None:
        oof, k_used = out_of_fold(
            X, y, len(classes), n_views=1, folds=folds, groups=d.train_groups, seed=seed,
            progress=progress,
        )  # fmt: skip
    t_oof = time.perf_counter() - t0 - t_nn
    for rank, i in enumerate(find_label_issues(y, oof).tolist()):
        top = int(oof[i].argmax())
        d.label_issues.append({
            "row": i, "rank": rank + 1, "path": d.paths[i], "given_label": classes[y[i]],
            "suggested_label": classes[top], "given_prob": round(float(oof[i, y[i]]), 4),
            "top_prob": round(float(oof[i, top]), 4),
        })  # fmt: skip

    # 4. outliers: sparse neighbourhood and far from every class centre
    cent = np.zeros((len(classes), E.shape[1]), np.float32)
    np.add.at(cent, y, E[:n])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    near_centre = (E @ cent.T).max(1) if n else np.zeros(m)
    zd, zc = robust_z(r), robust_z(near_centre)
    for i in np.flatnonzero((zd + zc) / 2 <= OUTLIER_Z):
        d.outliers.append({
            "row": int(i), "path": d.paths[i], "split": split[i], "label": labels[i],
            "density_z": round(float(zd[i]), 2), "centre_z": round(float(zc[i]), 2),
            "nearest_class": classes[int((E[i] @ cent.T).argmax())],
        })  # fmt: skip
    d.outliers.sort(key=lambda o: o["density_z"] + o["centre_z"])

    # 5. class problems
    d.class_problems = _class_problems(y, oof, classes)
    d.stats = {
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_neighbours": round(t_nn, 3),
        "seconds_out_of_fold": round(t_oof, 3),
        "out_of_fold": "given" if k_used is None else f"{k_used}-fold logreg",
        "search": "exact" if m <= 40_000 else "faiss HNSW",
        "dup_csls": dup_csls,
        "k": k,
    }
    d.oof = oof
    return d


def examine(
    paths: Sequence[str],
    labels: Sequence[str],
    *,
    val: tuple[Sequence[str], Sequence[str]] | None = None,
    backbones: Sequence[str] = (),
    weights: dict | None = None,
    tta: str = "flip",
    pool: str = "avg",
    runtime=None,
    folds: int = 5,
    seed: int = 0,
) -> Diagnosis:
    """Features of the images through the normal cache (computing only what is missing), then
    :func:`diagnose`. ``val``: (paths, labels) of a validation set; labels it has that the
    training data lacks are fine (those rows are searched for leaks and outliers only)."""
    from .backbones import DEFAULT_STACK, resolve
    from .cache import FeatureCache
    from .duplicates import find_duplicates
    from .runners import extract_features
    from .runtime import Runtime

    rt = runtime or Runtime()
    specs = [resolve(n, weights) for n in (backbones or DEFAULT_STACK)]
    views = ("orig", "flip") if tta == "flip" else ("orig",)

    def feats(ps):
        return extract_features(
            list(ps), specs, runner=rt.runner, ray_address=rt.ray_address,
            ray_actors=rt.ray_actors, views=views, pool=pool, cache=FeatureCache(rt.cache_dir),
            engine=rt.engine, precision=rt.precision or "fp32", device=rt.device,
            batch_size=rt.batch_size, workers=rt.workers, strict=rt.strict, progress=rt.progress,
        )  # fmt: skip

    F = feats(paths)
    dups = find_duplicates(F.paths, F.hashes, [labels[i] for i in F.index], strict=rt.strict)
    F = F.subset(dups.keep)
    classes = sorted({labels[i] for i in F.index})
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[labels[i]] for i in F.index], np.int64)
    problems = list(F.problems) + dups.problems
    hashes, vset = list(F.hashes), None
    if val is not None:
        VF = feats(val[0])
        problems += VF.problems
        vy = np.asarray([index.get(val[1][i], -1) for i in VF.index], np.int64)
        vset, hashes = (VF.stacked(), VF.paths, vy), hashes + list(VF.hashes)
    base = np.unique(np.asarray(hashes), return_inverse=True)[1] if hashes else None
    d = diagnose(
        F.stacked(), y, classes, F.paths, n_views=len(views), val=vset, base_groups=base,
        folds=folds, seed=seed, progress=rt.progress,
    )  # fmt: skip
    d.problems = problems
    d.stats["extract"] = F.stats
    return d


def from_model(model) -> Diagnosis:
    """The doctor on a just-fitted :class:`~stackvision.classifier.StackedClassifier`: its
    features, its out-of-fold probabilities (k-fold; else computed) and its ``--val`` set."""
    F, y = model._features_cache, model._feature_y
    oof = model.oof_proba_
    if model.folds < 2 or oof is None or len(oof) != len(y):
        oof = None
    vset, hashes = None, list(F.hashes)
    if model._val_data is not None:
        vf, vy = model._val_data
        vset, hashes = (vf.stacked(), vf.paths, vy), hashes + list(vf.hashes)
    base = np.unique(np.asarray(hashes), return_inverse=True)[1] if hashes else None
    return diagnose(
        F.stacked(), y, model.classes_, F.paths, n_views=model.n_views_, val=vset, oof=oof,
        base_groups=base, seed=model.seed,
    )  # fmt: skip
