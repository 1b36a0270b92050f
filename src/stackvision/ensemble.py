"""``EnsembleClassifier``: combine saved models of any kind (feature stacks, fine-tuned networks,
other ensembles) into one model.

Methods, all working on the members' class probabilities for the same images:

* ``mean``: the average of the members' probabilities (nothing is fitted).
* ``weighted``: a weighted average, weights ``softmax(a)`` (positive, summing to one) fitted with
  L-BFGS to minimise the log loss.
* ``stacked``: a learned combiner: the members' log-probabilities concatenated -> one dense layer
  -> softmax (a multinomial logistic regression on standardised inputs, L2 strength chosen by an
  inner 3-fold CV).

The combiners are fitted on ``fit``'s data, which must be images the members were **not** trained
on (a held-out split): on their own training images members are over-confident and a combiner
learns to trust them too much. The numbers ``fit`` reports for ``weighted`` and ``stacked`` are
out-of-fold (k-fold on that data: fit on k-1 folds, score the remaining one), so each row of the
comparison table is an honest estimate on the same images; the saved combiners are then refitted
on all of it. ``mean`` and the members alone need no fitting and are scored directly.

The ensemble's model directory is self-contained: each member's directory is copied to
``members/NN-name/`` inside it.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Sequence

import numpy as np

from . import __version__
from .classifier import Predictions
from .errors import StackvisionError
from .heads import LogRegHead, softmax
from .metrics import classification_metrics, log_loss, summary_row
from .model_dir import read_manifest, read_tensors, write_model_dir
from .models import PredictMixin

METHODS = ("mean", "weighted", "stacked")
STACKED_C_GRID = (0.01, 0.1, 1.0)
_EPS = 1e-6


# ---------------------------------------------------------------------- combiners (numpy)
def _as_array(P: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(p, np.float64) for p in P])  # (K, N, C)


def combine_mean(P: np.ndarray) -> np.ndarray:
    return P.mean(axis=0)


def combine_weighted(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.tensordot(w, P, axes=1)


def fit_weights(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Member weights (softmax-parametrised, so positive and summing to 1) minimising log loss."""
    from scipy.optimize import minimize

    K = P.shape[0]
    py = np.clip(P[:, np.arange(len(y)), y], 1e-15, 1.0)  # (K, N): each member's p(true class)

    def f(a):
        w = softmax(a[None])[0]
        mix = np.clip(w @ py, 1e-15, None)
        loss = -np.mean(np.log(mix))
        # d loss / d w_k = -mean(py_k / mix); chain rule through the softmax.
        gw = -np.mean(py / mix, axis=1)
        ga = w * (gw - w @ gw)
        return loss, ga

    r = minimize(f, np.zeros(K), jac=True, method="L-BFGS-B")
    return softmax(r.x[None])[0]


def _stack_inputs(P: np.ndarray) -> np.ndarray:
    K, N, C = P.shape
    return np.log(np.clip(P, _EPS, 1.0)).transpose(1, 0, 2).reshape(N, K * C).astype(np.float32)


def fit_stacked(P: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> LogRegHead:
    """The dense-layer combiner on concatenated log-probabilities; C by inner 3-fold CV."""
    from .validation import kfold_splits

    Z = _stack_inputs(P)
    counts = np.bincount(y, minlength=n_classes)
    best_c = STACKED_C_GRID[len(STACKED_C_GRID) // 2]
    k = int(min(3, counts[counts > 0].min()))
    if k >= 2 and len(STACKED_C_GRID) > 1:
        splits = kfold_splits(y, k, seed)
        scores = []
        for c in STACKED_C_GRID:
            oof = np.zeros((len(y), n_classes))
            for tr, va in splits:
                h = LogRegHead(C=c, max_iter=500).fit(Z[tr], y[tr], n_classes)
                oof[va] = h.predict_proba(Z[va])
            scores.append(log_loss(y, oof))
        best_c = STACKED_C_GRID[int(np.argmin(scores))]
    return LogRegHead(C=best_c, max_iter=500).fit(Z, y, n_classes)


def combine_stacked(P: np.ndarray, head: LogRegHead) -> np.ndarray:
    return head.predict_proba(_stack_inputs(P)).astype(np.float64)


# ---------------------------------------------------------------------- the model
class EnsembleClassifier(PredictMixin):
    """Saved models of any kind combined by ``mean``, ``weighted`` or ``stacked`` (see module doc).

    ``members``: model directories (or loaded models that have a ``save``). ``method``: one of
    :data:`METHODS`, or ``"all"`` to fit every method and keep the one with the lowest out-of-fold
    log loss. ``runtime`` options (cache_dir, device, batch_size, ...) go to the members.
    """

    kind = "ensemble"

    def __init__(
        self,
        members: Sequence | None = None,
        *,
        method: str = "all",
        folds: int = 5,
        seed: int = 0,
        **runtime,
    ):
        self.members = list(members or [])
        self.method = method
        self.folds = folds
        self.seed = seed
        self.runtime = runtime

    # ------------------------------------------------------------------ members
    def _load_members(self) -> None:
        from .models import load_model

        if len(self.members) < 2:
            raise StackvisionError(
                f"an ensemble needs at least two models, got {len(self.members)}",
                "pass two or more model directories",
            )
        self.members_, self.member_dirs_, self.member_names_ = [], [], []
        for m in self.members:
            if isinstance(m, str | os.PathLike):
                model = load_model(str(m), **self.runtime)
                self.member_dirs_.append(os.path.abspath(str(m)))
                self.member_names_.append(os.path.basename(os.path.abspath(str(m))))
            else:
                model = m
                self.member_dirs_.append(None)
                self.member_names_.append(f"{getattr(model, 'kind', 'stack')}{len(self.members_)}")
            self.members_.append(model)
        # Unique names for the table and the members/ folder.
        seen: dict[str, int] = {}
        for i, n in enumerate(self.member_names_):
            if n in seen:
                seen[n] += 1
                self.member_names_[i] = f"{n}-{seen[n]}"
            else:
                seen[n] = 0
        first = list(self.members_[0].classes_)
        for name, m in zip(self.member_names_, self.members_):
            if sorted(m.classes_) != sorted(first):
                raise StackvisionError(
                    f"member '{name}' has other classes than '{self.member_names_[0]}'",
                    "ensemble only models trained on the same class names",
                )
        self.classes_ = sorted(first)
        self._columns = [
            np.asarray([list(m.classes_).index(c) for c in self.classes_]) for m in self.members_
        ]

    def _member_probas(self, X: Sequence[str]):
        """Each member's probabilities on the images every member could use (X order)."""
        X = list(X)
        preds = [m.predict_paths(X) for m in self.members_]
        problems, seen = [], set()
        for pr in preds:
            for p in pr.problems:
                if p.path not in seen:
                    seen.add(p.path)
                    problems.append(p)
        usable = set(X) - seen
        paths = [p for p in X if p in usable]  # input order, duplicates kept
        P = []
        for pr, cols in zip(preds, self._columns):
            row = {p: i for i, p in enumerate(pr.paths)}
            P.append(
                pr.proba[[row[p] for p in paths]][:, cols] if paths else np.zeros((0, len(cols)))
            )
        return paths, _as_array(P), problems

    # ------------------------------------------------------------------ fit
    def _fit_method(self, method: str, P: np.ndarray, y: np.ndarray, seed: int):
        if method == "mean":
            return None
        if method == "weighted":
            return fit_weights(P, y)
        return fit_stacked(P, y, len(self.classes_), seed)

    def _apply(self, method: str, P: np.ndarray, fitted) -> np.ndarray:
        if method == "mean":
            return combine_mean(P)
        if method == "weighted":
            return combine_weighted(P, fitted)
        return combine_stacked(P, fitted)

    def fit(self, X: Sequence[str], y: Sequence):
        """Fit the combiners on held-out images ``X`` with labels ``y`` (see the module doc)."""
        if self.method not in (*METHODS, "all"):
            raise StackvisionError(
                f"unknown ensemble method '{self.method}'", f"use {', '.join(METHODS)} or all"
            )
        if not isinstance(self.folds, int) or self.folds < 2:
            raise StackvisionError(
                f"--folds must be at least 2, got {self.folds}", "e.g. --folds 5"
            )
        self._load_members()
        X, y = list(X), [str(v) for v in y]
        if len(X) != len(y):
            raise StackvisionError(
                f"{len(X)} images but {len(y)} labels", "give one label per image"
            )
        unknown = sorted(set(y) - set(self.classes_))
        if unknown:
            raise StackvisionError(
                f"labels not known to the members: {', '.join(unknown[:5])}",
                "use held-out data with the members' class names",
            )
        label_of = dict(zip(X, y))
        index = {c: i for i, c in enumerate(self.classes_)}
        paths, P, problems = self._member_probas(X)
        yk = np.asarray([index[label_of[p]] for p in paths], np.int64)
        counts = np.bincount(yk, minlength=len(self.classes_))
        folds = int(min(self.folds, counts[counts > 0].min()))
        if folds < 2:
            raise StackvisionError(
                "too few held-out images per class to fit and score the combiners",
                "give --data at least 2 images of every class (better: 20 or more)",
            )
        self.problems_ = problems
        from .validation import kfold_splits

        splits = kfold_splits(yk, folds, self.seed)
        methods = list(METHODS) if self.method == "all" else [self.method]
        rows, oof = [], {}
        for name, Pk in zip(self.member_names_, P):
            m = classification_metrics(yk, Pk, self.classes_)
            rows.append(
                {
                    "model": name,
                    "kind": getattr(self.members_[len(rows)], "kind", "stack"),
                    "scored": "directly",
                    **summary_row(m),
                }
            )
        for method in methods:
            if method == "mean":
                proba = combine_mean(P)
                how = "directly (nothing fitted)"
            else:
                proba = np.zeros((len(yk), len(self.classes_)))
                for fi, (tr, va) in enumerate(splits):
                    fitted = self._fit_method(method, P[:, tr], yk[tr], self.seed + fi)
                    proba[va] = self._apply(method, P[:, va], fitted)
                how = f"{folds}-fold out-of-fold"
            oof[method] = proba
            m = classification_metrics(yk, proba, self.classes_)
            rows.append(
                {"model": f"ensemble:{method}", "kind": "ensemble", "scored": how, **summary_row(m)}
            )
        chosen = (
            min(methods, key=lambda k: log_loss(yk, oof[k]))
            if self.method == "all"
            else self.method
        )
        self.method_ = chosen
        self.fitted_ = {k: self._fit_method(k, P, yk, self.seed) for k in methods}
        self.table_ = rows
        self.eval_ = (paths, yk, oof[chosen])
        self.metrics_ = {
            "validation": f"ensemble '{chosen}' on the held-out data "
            + ("(directly)" if chosen == "mean" else f"({folds}-fold out-of-fold)"),
            **classification_metrics(yk, oof[chosen], self.classes_),
            "table": rows,
        }
        return self

    # ------------------------------------------------------------------ predict
    def _check_fitted(self):
        if not hasattr(self, "method_"):
            raise StackvisionError(
                "this EnsembleClassifier is not fitted yet",
                "call fit() or EnsembleClassifier.load()",
            )

    @property
    def weights_(self) -> np.ndarray | None:
        w = self.fitted_.get("weighted")
        return None if w is None else np.asarray(w)

    def predict_paths(self, X: Sequence[str], method: str | None = None) -> Predictions:
        """Combined probabilities for the images every member could use; others in ``problems``."""
        self._check_fitted()
        method = method or self.method_
        if method != "mean" and method not in self.fitted_:
            raise StackvisionError(
                f"method '{method}' was not fitted for this ensemble",
                f"use one of: mean, {', '.join(self.fitted_)}",
            )
        paths, P, problems = self._member_probas(X)
        proba = (
            self._apply(method, P, self.fitted_.get(method))
            if paths
            else np.zeros((0, len(self.classes_)))
        )
        return Predictions(paths, proba, list(self.classes_), problems)

    def member_probas(self, X: Sequence[str]):
        """(paths, (K, N, C) probabilities of each member in ``classes_`` order, problems)."""
        self._check_fitted()
        return self._member_probas(X)

    def to_torch_module(self):
        """uint8 (N, S, S, 3) -> (N, C) probabilities of the chosen method, for export.

        Possible when every member offers ``to_torch_module`` and all members take the same
        pixels (same input size, crop and interpolation; normalisation may differ, it is inside
        each member's module). Input contract: as each member's (see
        :meth:`FineTunedClassifier.to_torch_module`), with S = ``self.input_size_``.
        """
        import torch
        import torch.nn as nn

        self._check_fitted()
        subs, pps = [], []
        for name, m in zip(self.member_names_, self.members_):
            if not hasattr(m, "to_torch_module"):
                raise StackvisionError(
                    f"member '{name}' ({getattr(m, 'kind', 'stack')}) cannot be exported as one "
                    "torch module",
                    "export the members separately, or ensemble only fine-tuned models",
                )
            subs.append(m.to_torch_module())
            pps.append(getattr(m, "preprocess", None))
        sig = {
            (p.input_size, p.crop_pct, p.crop_mode, p.interpolation, p.channel_order)
            for p in pps
            if p is not None
        }
        if len(sig) != 1 or any(p is None for p in pps):
            raise StackvisionError(
                "the members need different input pixels (input size / crop differ), so one "
                "module cannot take a single uint8 batch for all",
                "fine-tune the members with the same backbone input size, or export them separately",
            )
        self.input_size_ = pps[0].input_size
        self.preprocess = pps[0]
        method, fitted = self.method_, self.fitted_.get(self.method_)
        cols = [torch.as_tensor(c, dtype=torch.long) for c in self._columns]

        class EnsembleExport(nn.Module):
            def __init__(self):
                super().__init__()
                self.members = nn.ModuleList(subs)
                for k, c in enumerate(cols):
                    self.register_buffer(f"cols{k}", c)
                if method == "weighted":
                    self.register_buffer("w", torch.as_tensor(fitted, dtype=torch.float32))
                if method == "stacked":
                    self.register_buffer("mean", torch.as_tensor(fitted.mean_))
                    self.register_buffer("scale", torch.as_tensor(fitted.scale_))
                    self.register_buffer("W", torch.as_tensor(fitted.coef_))
                    self.register_buffer("b", torch.as_tensor(fitted.intercept_))

            def forward(self, x):
                P = torch.stack(
                    [m(x)[:, getattr(self, f"cols{k}")] for k, m in enumerate(self.members)]
                )
                if method == "mean":
                    return P.mean(0)
                if method == "weighted":
                    return (self.w.view(-1, 1, 1) * P).sum(0)
                z = torch.log(torch.clamp(P, _EPS, 1.0)).permute(1, 0, 2).reshape(P.shape[1], -1)
                return torch.softmax(((z - self.mean) / self.scale) @ self.W.T + self.b, dim=1)

        return EnsembleExport().eval()

    # ------------------------------------------------------------------ persistence
    def _manifest(self, member_entries: list[dict]) -> dict:
        return {
            "kind": self.kind,
            "stackvision_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "classes": list(self.classes_),
            "method": self.method_,
            "methods_fitted": ["mean", *[k for k in self.fitted_ if k != "mean"]],
            "members": member_entries,
            "member_weights": (
                None if self.weights_ is None else [float(v) for v in self.weights_]
            ),
            "stacked": (
                {"C": self.fitted_["stacked"].params["C"], "input": "log-probabilities"}
                if "stacked" in self.fitted_
                else None
            ),
            "folds": self.folds,
            "seed": self.seed,
            "metrics": summary_row(self.metrics_) if getattr(self, "metrics_", None) else None,
        }

    def save(self, path: str, *, report: bool = True) -> str:
        """Write the ensemble directory, with a copy of every member under ``members/``."""
        self._check_fitted()
        entries = []
        for i, (name, m) in enumerate(zip(self.member_names_, self.members_)):
            entries.append(
                {
                    "name": name,
                    "kind": getattr(m, "kind", "stack"),
                    "dir": f"members/{i:02d}-{name}",
                }
            )
        tensors: dict[str, np.ndarray] = {}
        if self.weights_ is not None:
            tensors["weighted.w"] = np.asarray(self.weights_, np.float32)
        if "stacked" in self.fitted_:
            for k, v in self.fitted_["stacked"].state().items():
                tensors[f"stacked.{k}"] = np.asarray(v, np.float32)
        if not tensors:
            tensors["mean.placeholder"] = np.zeros(1, np.float32)  # safetensors needs one array
        files: dict = {"history.json": []}
        metrics = getattr(self, "metrics_", None)
        if metrics:
            files["metrics.json"] = {
                **metrics,
                "problems": [p.__dict__ for p in getattr(self, "problems_", [])],
            }
            files["comparison.json"] = self.table_

        def add(tmp):
            for entry, src, m in zip(entries, self.member_dirs_, self.members_):
                dst = os.path.join(tmp, entry["dir"])
                if src and os.path.abspath(src) != os.path.abspath(dst):
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".tmp-*"))
                else:
                    m.save(dst)
            if report and metrics and getattr(self, "eval_", None):
                from .report import write_report

                paths, y, proba = self.eval_
                write_report(
                    os.path.join(tmp, "report"),
                    metrics,
                    paths,
                    y,
                    proba,
                    self.classes_,
                    problems=getattr(self, "problems_", []),
                    title=f"stackvision ensemble ({self.method_}): {', '.join(self.member_names_)}",
                )

        out = write_model_dir(path, self._manifest(entries), tensors, files, add)
        # From now on the members live inside the ensemble directory.
        self.member_dirs_ = [os.path.join(out, e["dir"]) for e in entries]
        return out

    @classmethod
    def load(cls, path: str, **runtime) -> EnsembleClassifier:
        """Load an ensemble directory and its members (``runtime`` goes to every member)."""
        from .models import load_model

        manifest = read_manifest(path)
        if manifest.get("kind") != cls.kind:
            raise StackvisionError(
                f"{path} holds a '{manifest.get('kind', 'stack')}' model, not an ensemble",
                "use stackvision.load_model()",
            )
        model = cls(
            method=manifest["method"],
            folds=manifest.get("folds", 5),
            seed=manifest.get("seed", 0),
            **runtime,
        )
        tensors = read_tensors(path, manifest)  # validated before loading the members
        model.members_, model.member_dirs_, model.member_names_ = [], [], []
        for e in manifest["members"]:
            d = os.path.join(path, e["dir"])
            if not os.path.isdir(d):
                raise StackvisionError(
                    f"ensemble member missing: {d}",
                    "the ensemble directory is incomplete; rebuild it",
                )
            model.members_.append(load_model(d, **runtime))
            model.member_dirs_.append(os.path.abspath(d))
            model.member_names_.append(e["name"])
        model.classes_ = list(manifest["classes"])
        model._columns = [
            np.asarray([list(m.classes_).index(c) for c in model.classes_]) for m in model.members_
        ]
        model.fitted_ = {"mean": None}
        if "weighted.w" in tensors:
            model.fitted_["weighted"] = tensors["weighted.w"].astype(np.float64)
        state = {k[len("stacked.") :]: v for k, v in tensors.items() if k.startswith("stacked.")}
        if state:
            C = (manifest.get("stacked") or {}).get("C", 1.0)
            model.fitted_["stacked"] = LogRegHead(C=C, max_iter=500).load_state(state)
        model.method_ = manifest["method"]
        model.manifest_ = manifest
        model.metrics_ = None
        return model
