"""``EnsembleClassifier``: combine saved models of any kind (feature stacks, fine-tuned networks,
other ensembles) into one model.

Methods, all working on the members' class probabilities for the same images:

* ``mean``: the average of the members' probabilities (nothing is fitted).
* ``weighted``: a weighted average, weights ``softmax(a)`` (positive, summing to one) fitted with
  L-BFGS to minimise the log loss.
* ``calibrated``: member weights plus one temperature per member, fitted jointly (2K numbers, so
  it does not overfit with many classes).
* ``stacked``: a learned combiner: the members' log-probabilities concatenated -> one dense layer
  -> softmax (a multinomial logistic regression on standardised inputs, L2 strength chosen by an
  inner 3-fold CV).

``best`` picks, by out-of-fold log loss, among each member alone and the combiners
(:mod:`.ensemble_combiners`): never below the best member on those rows. ``all`` fits every
combiner and keeps the one with the lowest out-of-fold log loss.

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

import numbers
import os
import shutil
from collections.abc import Sequence

import numpy as np

from . import __version__
from .base import ModelBase, Predictions, largest_input
from .data import Problem
from .ensemble_combiners import BEST, combiner_tensors, combiners_from_tensors, fit_combiners
from .ensemble_methods import (
    METHODS,
    apply_method,
    as_array,
    combine_mean,
    combine_stacked,
    combine_weighted,
    ensemble_module,
    fit_stacked,
    fit_weights,
)
from .errors import StackvisionError
from .metrics import summary_row
from .model_dir import file_hashes, read_manifest, read_tensors, read_training_hashes
from .params import Interval, InvalidParameter, Options
from .preprocess import Preprocess
from .runtime import Runtime

__all__ = [
    "METHODS",
    "EnsembleClassifier",
    "combine_mean",
    "combine_stacked",
    "combine_weighted",
    "fit_stacked",
    "fit_weights",
]


# ---------------------------------------------------------------------- the model
class EnsembleClassifier(ModelBase):
    """Saved models of any kind combined by ``mean``, ``weighted`` or ``stacked`` (see module doc).

    ``members``: model directories, or fitted models (``clone`` of an ensemble gives unfitted
    copies of member objects, as scikit-learn does: pass directories to use it in
    ``GridSearchCV``). ``method``: one of :data:`METHODS`, or ``"all"`` to fit every method and
    keep the one with the lowest out-of-fold log loss. ``weights`` (backbone name -> file) and
    ``runtime`` go to the members loaded from directories.
    """

    kind = "ensemble"
    _fitted_attribute = "method_"
    _parameter_constraints = {
        "members": [list, tuple],
        "method": [Options([*METHODS, "all", BEST])],
        "folds": [Interval(numbers.Integral, 2, None)],
        "seed": [Interval(numbers.Integral, 0, None)],
        "weights": [dict, None],
        "runtime": [Runtime, None],
    }
    _parameter_fixes = {"folds": "e.g. 5", "members": "pass two or more model directories"}
    metrics_: dict | None = None
    selection_ = None  # method "best": what it chose (ensemble_combiners.Selection)

    def __init__(
        self,
        members: Sequence | None = None,
        *,
        method: str = "all",
        folds: int = 5,
        seed: int = 0,
        weights: dict[str, str] | None = None,
        runtime: Runtime | None = None,
    ):
        self.members = members
        self.method = method
        self.folds = folds
        self.seed = seed
        self.weights = weights
        self.runtime = runtime

    def _check_params(self) -> None:
        bad = [m for m in self.members if not isinstance(m, str | os.PathLike | ModelBase)]
        if len(self.members) < 2 or bad:
            raise InvalidParameter(
                "members", bad[0] if bad else len(self.members),
                "two or more model directories or fitted stackvision models",
                "pass two or more model directories", type(self).__name__,
            )  # fmt: skip

    # ------------------------------------------------------------------ members
    def _load_members(self) -> None:
        from .models import load_model

        self.members_, self.member_dirs_, self.member_names_ = [], [], []
        for m in self.members:
            if isinstance(m, ModelBase):
                m.check_is_fitted()
                model = m
                self.member_dirs_.append(None)
                self.member_names_.append(f"{model.kind}{len(self.members_)}")
            else:
                model = load_model(str(m), self.runtime, weights=self.weights)
                self.member_dirs_.append(os.path.abspath(str(m)))
                self.member_names_.append(os.path.basename(os.path.abspath(str(m))))
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
        self._set_columns()

    def _set_columns(self) -> None:
        """Each member's probability columns in ``classes_`` order."""
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
        return paths, as_array(P), problems

    # ------------------------------------------------------------------ fit

    def fit(self, X: Sequence[str], y: Sequence):
        """Fit the combiners on held-out images ``X`` with labels ``y`` (see the module doc)."""
        self._validate_params()
        X, y = self._labelled(X, y)
        self._load_members()
        unknown = sorted(set(y) - set(self.classes_))
        if unknown:
            raise StackvisionError(
                f"labels not known to the members: {', '.join(unknown[:5])}",
                "use held-out data with the members' class names",
            )
        X, y, hashes, left_out = self._without_members_images(X, y)
        label_of = dict(zip(X, y))
        index = {c: i for i, c in enumerate(self.classes_)}
        paths, P, problems = self._member_probas(X)
        yk = np.asarray([index[label_of[p]] for p in paths], np.int64)
        self.problems_ = left_out + problems
        from .duplicates import content_groups

        # identical files in one fold: the combiners' out-of-fold scores stay honest
        fit_combiners(self, paths, P, yk, content_groups(paths))
        self.training_hashes_ = self._fitted_on(hashes)
        self.manifest_ = None
        return self

    def _without_members_images(self, X, y):
        """``X``, ``y`` and their hashes without the images a member was trained on (copies of
        them too: the combiners would learn to trust what it memorised), and those as problems;
        refused when they are half of ``X`` or more (the wrong folder, not a few duplicates)."""
        hashes = file_hashes(X)
        trained = [(n, m.training_hashes_) for n, m in zip(self.member_names_, self.members_)]
        trained = [(n, seen) for n, seen in trained if seen]
        owner = [next((n for n, seen in trained if h in seen), None) for h in hashes]
        bad = [i for i, n in enumerate(owner) if n is not None]
        if bad and 2 * len(bad) >= len(X):
            name = max({owner[i] for i in bad}, key=[owner[i] for i in bad].count)
            raise StackvisionError(
                f"{len(bad)} of the {len(X)} images to fit the ensemble on were used to train "
                f"member '{name}' or another member: its weights and scores would trust what "
                "it memorised",
                "fit the ensemble on images no member was trained on (a held-out split)",
            )
        left_out = [
            Problem(X[i], f"a member ('{owner[i]}') was trained on this image or a copy of it: "
                    "left out of the ensemble's fit")
            for i in bad
        ]  # fmt: skip
        keep = [i for i in range(len(X)) if owner[i] is None]
        return [X[i] for i in keep], [y[i] for i in keep], [hashes[i] for i in keep], left_out

    def _fitted_on(self, hashes) -> frozenset[str]:
        """What the ensemble as a whole was fitted on: its members' images and the images with
        content ``hashes`` (:func:`~stackvision.model_dir.file_hashes`; None: unreadable)."""
        return frozenset(h for h in hashes if h).union(
            *(m.training_hashes_ or () for m in self.members_)
        )

    # ------------------------------------------------------------------ predict
    @property
    def weights_(self) -> np.ndarray | None:
        """The fitted member weights of the ``weighted`` method (None when not fitted)."""
        self.check_is_fitted()
        w = self.fitted_.get("weighted")
        return None if w is None else np.asarray(w)

    def _combine(self, P: np.ndarray, method: str | None = None) -> np.ndarray:
        method = method or self.method_
        if method != "mean" and method not in self.fitted_:
            raise StackvisionError(
                f"method '{method}' was not fitted for this ensemble",
                f"use one of: mean, {', '.join(self.fitted_)}",
            )
        if P.shape[1] == 0:
            return np.zeros((0, len(self.classes_)))
        return apply_method(method, P, self.fitted_.get(method))

    def predict_paths(self, X: Sequence[str], method: str | None = None) -> Predictions:
        """Combined probabilities for the images every member could use; others in ``problems``.
        ``method``: another fitted method than the chosen ``method_``."""
        self.check_is_fitted()
        paths, P, problems = self._member_probas(X)
        return Predictions(paths, self._combine(P, method), list(self.classes_), problems)

    def member_probas(self, X: Sequence[str]):
        """(paths, (K, N, C) probabilities of each member in ``classes_`` order, problems)."""
        self.check_is_fitted()
        return self._member_probas(X)

    # ------------------------------------------------------------------ fixed-size input (export, serving)
    def input_preprocess(self) -> Preprocess:
        """The uint8 input of :meth:`forward_uint8` and the export: the preprocessing of the
        member with the largest input size (RGB order). Members with a smaller input get their
        own size inside the model by a fixed antialiased resize
        (:func:`stackvision.export.resize_uint8`), as a stack's smaller backbones do."""
        self.check_is_fitted()
        return largest_input([m.input_preprocess() for m in self.members_])

    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """Combined calibrated probabilities for a uint8 RGB batch (N, S, S, 3) made by
        :func:`stackvision.export.prepare_image` (S = ``input_preprocess().input_size``)."""
        from .export import check_uint8_batch, resize_uint8

        self.check_is_fitted()
        batch = check_uint8_batch(batch, self.input_preprocess().input_size)
        P = []
        for m, cols in zip(self.members_, self._columns):
            pp = m.input_preprocess()
            P.append(m.forward_uint8(resize_uint8(batch, pp.input_size, pp.interpolation))[:, cols])
        return self._combine(as_array(P))

    def to_torch_module(self):
        """:meth:`forward_uint8` as one ``torch.nn.Module``: every member's module (after the
        in-graph resize to its input size), its columns in ``classes_`` order, the combiner."""
        from .export import ResizeUint8

        self.check_is_fitted()
        size = self.input_preprocess().input_size
        subs = []
        for m in self.members_:
            pp = m.input_preprocess()
            subs.append((ResizeUint8(size, pp.input_size, pp.interpolation), m.to_torch_module()))
        return ensemble_module(subs, self._columns, self.method_, self.fitted_.get(self.method_))

    def describe(self) -> dict:
        """What serving shows at GET /model: kind, classes, method, member weights, each
        member's description, the backbones of all members, metrics, versions."""
        self.check_is_fitted()
        members = [{"name": n, **m.describe()} for n, m in zip(self.member_names_, self.members_)]
        manifest = self.manifest_ or {}
        return {
            "kind": self.kind,
            "classes": list(self.classes_),
            "method": self.method_,
            "member_weights": None if self.weights_ is None else self.weights_.tolist(),
            "members": members,
            "backbones": [b for m in members for b in m.get("backbones") or []],
            "metrics": summary_row(self.metrics_) if self.metrics_ else manifest.get("metrics"),
            "created": manifest.get("created"),
            "stackvision_version": manifest.get("stackvision_version", __version__),
        }

    # ------------------------------------------------------------------ persistence
    def _manifest(self, member_entries: list[dict]) -> dict:
        return {
            **self._manifest_head(),
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
            "calibrated": (
                {
                    "weights": [float(v) for v in self.fitted_["calibrated"][0]],
                    "temperatures": [float(v) for v in self.fitted_["calibrated"][1]],
                }
                if self.fitted_.get("calibrated") is not None
                else None
            ),  # fmt: skip
            "selection": self.selection_.record() if self.selection_ else None,
            "folds": self.folds,
            "seed": self.seed,
            "metrics": summary_row(self.metrics_) if self.metrics_ else None,
        }

    def save(self, path: str, *, report: bool = True) -> str:
        """Write the ensemble directory, with a copy of every member under ``members/``."""
        self.check_is_fitted()
        entries = []
        for i, (name, m) in enumerate(zip(self.member_names_, self.members_)):
            entries.append(
                {
                    "name": name,
                    "kind": m.kind,
                    "dir": f"members/{i:02d}-{name}",
                }
            )
        tensors = combiner_tensors(self.fitted_)

        def add(tmp):
            for entry, src, m in zip(entries, self.member_dirs_, self.members_):
                dst = os.path.join(tmp, entry["dir"])
                if src and os.path.abspath(src) != os.path.abspath(dst):
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".tmp-*"))
                else:
                    m.save(dst)

        out = self._write_dir(
            path,
            self._manifest(entries),
            tensors,
            histories=[],
            title=f"stackvision ensemble ({self.method_}): {', '.join(self.member_names_)}",
            report=report,
            files={"comparison.json": self.table_} if self.metrics_ else None,
            extra=add,
        )
        # From now on the members live inside the ensemble directory.
        self.member_dirs_ = [os.path.join(out, e["dir"]) for e in entries]
        return out

    @classmethod
    def load(
        cls, path: str, runtime: Runtime | None = None, *, weights: dict[str, str] | None = None
    ) -> EnsembleClassifier:
        """Load an ensemble directory and its members (``runtime`` and ``weights`` go to every
        member)."""
        from .models import load_model

        manifest = read_manifest(path)
        if manifest.get("kind") != cls.kind:
            raise StackvisionError(
                f"{path} holds a '{manifest.get('kind', 'stack')}' model, not an ensemble",
                "use stackvision.load_model()",
            )
        dirs = [os.path.abspath(os.path.join(path, e["dir"])) for e in manifest["members"]]
        model = cls(
            dirs,
            method=manifest["method"],
            folds=manifest.get("folds", 5),
            seed=manifest.get("seed", 0),
            weights=weights,
            runtime=runtime,
        )
        tensors = read_tensors(path, manifest)  # validated before loading the members
        for d in dirs:
            if not os.path.isdir(d):
                raise StackvisionError(
                    f"ensemble member missing: {d}",
                    "the ensemble directory is incomplete; rebuild it",
                )
        model.members_ = [load_model(d, runtime, weights=weights) for d in dirs]
        model.member_dirs_, model.member_names_ = dirs, [e["name"] for e in manifest["members"]]
        model.classes_ = list(manifest["classes"])
        model._set_columns()
        model.fitted_ = combiners_from_tensors(tensors, manifest)
        model.selection_ = None
        model.manifest_, model.training_hashes_ = manifest, read_training_hashes(path)
        model.metrics_, model.eval_, model.problems_, model.table_ = None, None, [], []
        model.method_ = manifest["method"]
        return model
