"""Fitting an :class:`~stackvision.ensemble.EnsembleClassifier`'s combiners on members'
probabilities, the ``best`` selection, and the combiners' tensors in the model directory.

``best`` (never below the best member): the candidates are every member alone (nothing fitted)
and the combiners ``mean``, ``weighted``, ``calibrated`` (and ``stacked`` where there are at
least :data:`STACKED_ROWS_PER_INPUT` rows per input of its dense layer); each is scored by its
log loss out-of-fold (inner k-fold on the rows given; a member alone is scored directly), the
lowest wins and is refitted on all rows. A member that wins is kept as the ``weighted`` method
with a one-hot weight, so the saved model is an ordinary ensemble. In the comparison table
``best`` is itself scored out-of-fold (the selection rerun inside each outer fold).

:func:`fit_combiners` is the body of ``EnsembleClassifier.fit`` once the members' probabilities
``P`` (K, N, C) on held-out rows are known; :mod:`.best_pipeline` calls it with out-of-fold
probabilities of members trained in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ensemble_methods import METHODS, apply_method, combine_mean, fit_method
from .errors import StackvisionError
from .heads import LogRegHead
from .metrics import classification_metrics, log_loss, summary_row

BEST = "best"
#: ``stacked`` is a candidate of ``best`` only with this many rows per input (K x C) or more
STACKED_ROWS_PER_INPUT = 10


@dataclass
class Selection:
    """What ``best`` chose: ``name`` (``member:NAME`` or a method), the ``method`` and ``fitted``
    state that reproduce it, and every candidate's out-of-fold log loss."""

    name: str
    method: str
    fitted: object
    scores: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"by": BEST, "chosen": self.name, "oof_log_loss": self.scores}


def _splits(y: np.ndarray, folds: int, seed: int, groups=None):
    from .validation import kfold_splits

    counts = np.bincount(y)
    k = int(min(folds, counts[counts > 0].min()))
    return kfold_splits(y, k, seed, groups) if k >= 2 else None


def oof_proba(method: str, P: np.ndarray, y: np.ndarray, n_classes: int, splits, seed: int = 0):
    """Out-of-fold probabilities of ``method`` (``mean``: direct; ``best``: the selection rerun in
    each fold)."""
    if method == "mean":
        return combine_mean(P)
    out = np.zeros((P.shape[1], n_classes))
    for fi, (tr, va) in enumerate(splits):
        if method == BEST:
            sel = fit_best(P[:, tr], y[tr], n_classes, seed + fi)
            out[va] = apply_method(sel.method, P[:, va], sel.fitted)
        else:
            out[va] = apply_method(method, P[:, va], fit_method(method, P[:, tr], y[tr], n_classes))
    return out


def fit_best(P, y, n_classes: int, seed: int = 0, names=None, folds: int = 3) -> Selection:
    """The ``best`` selection on rows ``P`` (K, N, C), labels ``y`` (see the module doc)."""
    K = P.shape[0]
    names = names or [str(k) for k in range(K)]
    scores = {f"member:{n}": log_loss(y, P[k]) for k, n in enumerate(names)}
    splits = _splits(y, folds, seed)
    methods = [m for m in METHODS if m != "stacked"]
    if len(y) >= STACKED_ROWS_PER_INPUT * K * n_classes:
        methods.append("stacked")
    if splits is not None:
        for m in methods:
            scores[m] = log_loss(y, oof_proba(m, P, y, n_classes, splits, seed))
    else:
        scores["mean"] = log_loss(y, combine_mean(P))
    chosen = min(scores, key=scores.get)
    if chosen.startswith("member:"):
        onehot = np.zeros(K)
        onehot[names.index(chosen[len("member:") :])] = 1.0
        return Selection(chosen, "weighted", onehot, scores)
    return Selection(chosen, chosen, fit_method(chosen, P, y, n_classes, seed), scores)


def fit_combiners(ens, paths, P: np.ndarray, yk: np.ndarray, groups=None) -> None:
    """Score every member and the requested method(s) on the same rows, choose, refit on all
    rows; sets the ensemble's ``table_``, ``eval_``, ``metrics_``, ``fitted_``, ``method_``."""
    from .validation import fold_scores

    classes, n_classes = ens.classes_, len(ens.classes_)
    splits = _splits(yk, ens.folds, ens.seed, groups)
    if splits is None:
        raise StackvisionError(
            "too few held-out images per class to fit and score the combiners",
            "give --data at least 2 images of every class (better: 20 or more)",
        )
    methods = list(METHODS) if ens.method == "all" else [ens.method]
    rows, oof = [], {}
    for k, name in enumerate(ens.member_names_):
        m = classification_metrics(yk, P[k], classes)
        rows.append(
            {"model": name, "kind": ens.members_[k].kind, "scored": "directly", **summary_row(m)}
        )
    for method in methods:
        oof[method] = oof_proba(method, P, yk, n_classes, splits, ens.seed)
        how = "directly (nothing fitted)" if method == "mean" else f"{len(splits)}-fold out-of-fold"
        m = classification_metrics(yk, oof[method], classes)
        rows.append(
            {"model": f"ensemble:{method}", "kind": "ensemble", "scored": how, **summary_row(m)}
        )
    chosen = min(methods, key=lambda k: log_loss(yk, oof[k])) if ens.method == "all" else methods[0]
    ens.selection_ = None
    if chosen == BEST:
        sel = fit_best(P, yk, n_classes, ens.seed, list(ens.member_names_))
        ens.selection_, ens.fitted_ = sel, {sel.method: sel.fitted}
        method_ = sel.method
    else:
        ens.fitted_ = {k: fit_method(k, P, yk, n_classes, ens.seed) for k in methods}
        method_ = chosen
    ens.fitted_.setdefault("mean", None)
    ens.table_ = rows
    ens.eval_ = (paths, yk, oof[chosen])
    picked = f"'{chosen}'" + (f" ({ens.selection_.name})" if ens.selection_ else "")
    ens.metrics_ = {
        "validation": f"ensemble {picked} on the held-out data "
        + ("(directly)" if chosen == "mean" else f"({len(splits)}-fold out-of-fold)"),
        **classification_metrics(yk, oof[chosen], classes),
        "table": rows,
    }
    if chosen != "mean":  # fitted per fold: the report shows the spread across folds
        ens.metrics_["folds"] = fold_scores(yk, oof[chosen], splits)
    ens.method_ = method_


# ---------------------------------------------------------------------- persistence
def combiner_tensors(fitted: dict) -> dict[str, np.ndarray]:
    """The fitted combiners as named float32 arrays (``weighted.w``, ``calibrated.w``/``.t``,
    ``stacked.*``)."""
    tensors: dict[str, np.ndarray] = {}
    if fitted.get("weighted") is not None:
        tensors["weighted.w"] = np.asarray(fitted["weighted"], np.float32)
    if fitted.get("calibrated") is not None:
        w, t = fitted["calibrated"]
        tensors["calibrated.w"] = np.asarray(w, np.float32)
        tensors["calibrated.t"] = np.asarray(t, np.float32)
    if fitted.get("stacked") is not None:
        for k, v in fitted["stacked"].state().items():
            tensors[f"stacked.{k}"] = np.asarray(v, np.float32)
    if not tensors:
        tensors["mean.placeholder"] = np.zeros(1, np.float32)  # safetensors needs one array
    return tensors


def combiners_from_tensors(tensors: dict, manifest: dict) -> dict:
    """:func:`combiner_tensors` read back (the manifest gives the stacked head's C)."""
    fitted: dict = {"mean": None}
    if "weighted.w" in tensors:
        fitted["weighted"] = tensors["weighted.w"].astype(np.float64)
    if "calibrated.w" in tensors:
        fitted["calibrated"] = (
            tensors["calibrated.w"].astype(np.float64),
            tensors["calibrated.t"].astype(np.float64),
        )
    state = {k[len("stacked.") :]: v for k, v in tensors.items() if k.startswith("stacked.")}
    if state:
        C = (manifest.get("stacked") or {}).get("C", 1.0)
        fitted["stacked"] = LogRegHead(C=C, max_iter=500).load_state(state)
    return fitted
