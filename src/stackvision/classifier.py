"""``StackedClassifier``: the scikit-learn style API that strings the stages together.

paths -> :mod:`extract` (cached backbone features) -> stacked matrix -> :mod:`validation` (heads,
folds, TTA, calibration) -> :mod:`model_dir` (save / load). The CLI only calls this class.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from .backbones import DEFAULT_STACK, BackboneSpec, resolve
from .base import ModelBase, Predictions, largest_input
from .cache import FeatureCache
from .data import check_trainable
from .duplicates import find_duplicates
from .errors import StackvisionError
from .extract import Features
from .head_select import choose_head
from .heads import HEADS, make_head
from .params import Interval, InvalidParameter, Options
from .preprocess import Preprocess
from .readout import PoolOption, expand_named
from .runners import extract_features
from .runtime import Runtime
from .stack_io import head_tensors, load_stack, stack_manifest
from .train_views import MAX_VIEWS, view_names
from .validation import TTA_MODES, apply_temperature, ensemble_proba, fit_stack_heads

__all__ = ["Predictions", "StackedClassifier", "TTA_MODES"]


class StackedClassifier(ModelBase):
    """Frozen pretrained backbones -> concatenated pooled features -> k-fold heads, flip TTA,
    temperature-calibrated fold ensemble.

    ``fit(paths, labels)`` takes image file paths and their class labels. Parameters are stored
    as given and checked by :meth:`fit` against ``_parameter_constraints``. ``weights`` maps a
    backbone name to a local weights file; ``runtime`` (:class:`Runtime`) says how and where
    features are computed, and its ``precision`` the numbers the heads are trained on.
    """

    kind = "stack"
    _fitted_attribute = "temperature_"
    _parameter_constraints = {
        "backbones": [str, list, tuple],
        "head": [Options((*HEADS, "auto"))],
        "head_params": [dict, None],
        "folds": [Interval(numbers.Integral, 2, None), Options([0])],
        "val_split": [Interval(numbers.Real, 0, 1, "neither"), None],
        "tta": [Options(TTA_MODES)],
        "train_views": [Interval(numbers.Integral, 0, MAX_VIEWS)],
        "pool": [PoolOption()],
        "class_weight": [Options(["balanced", "none"]), None],
        "calibrate": [bool],
        "group_duplicates": [bool],
        "weights": [dict, None],
        "seed": [Interval(numbers.Integral, 0, None)],
        "runtime": [Runtime, None],
    }
    _parameter_fixes = {
        "folds": "0 for no k-fold, e.g. 5",
        "val_split": "e.g. 0.1",
        "backbones": f"e.g. {list(DEFAULT_STACK)}",
    }
    # Fitted state a model may lack (an fp32 model; one trained from shards).
    calibration_: dict | None = None
    averaging_: str = "logits"  # of heads and views; models saved before: "proba" (AVERAGING)
    manifest_: dict | None = None
    _precision: str | None = None

    def __init__(
        self,
        backbones: Sequence[str] | str = DEFAULT_STACK,
        *,
        head: str = "logreg",
        head_params: dict | None = None,
        folds: int = 5,
        val_split: float | None = None,
        tta: str = "flip",
        train_views: int = 0,
        pool: str = "avg",
        class_weight: str | None = None,
        calibrate: bool = True,
        group_duplicates: bool = False,
        weights: dict[str, str] | None = None,
        seed: int = 0,
        runtime: Runtime | None = None,
    ):
        self.backbones = backbones
        self.head = head
        self.head_params = head_params
        self.folds = folds
        self.val_split = val_split
        self.tta = tta
        self.train_views = train_views  # random crops of the training images: more head rows
        self.pool = pool
        self.class_weight = class_weight
        self.calibrate = calibrate
        self.group_duplicates = group_duplicates  # near-duplicates (doctor) in one fold
        self.weights = weights
        self.seed = seed
        self.runtime = runtime

    def _check_params(self) -> None:
        if not self._backbone_names() or not all(isinstance(b, str) for b in self.backbones):
            raise InvalidParameter(
                "backbones",
                self.backbones,
                "a non-empty list of backbone names",
                f"e.g. {list(DEFAULT_STACK)}",
                "StackedClassifier",
            )
        if self.head == "auto" and self.head_params:
            raise InvalidParameter("head_params", self.head_params, "None with head='auto'",
                                   "leave them out", "StackedClassifier")  # fmt: skip
        make_head(self._head_kind, self.head_params)  # validates head_params

    def _backbone_names(self) -> list[str]:
        b = self.backbones
        names = [n.strip() for n in b.split(",")] if isinstance(b, str) else list(b)
        return list(dict.fromkeys(n for n in expand_named(names) if n))

    @property
    def _head_kind(self) -> str:
        """The head trained: ``head``, or with ``head="auto"`` the one fit chose."""
        return self.__dict__.get("head_kind_") or ("logreg" if self.head == "auto" else self.head)

    @property
    def _views(self) -> tuple[str, ...]:
        return ("orig", "flip") if self.tta == "flip" else ("orig",)

    @property
    def n_views_(self) -> int:
        return len(self._views)

    @property
    def precision_(self) -> str:
        """The numbers the heads read (fp32, bf16, int8): fixed by fit and load."""
        return self._precision or self._runtime().precision or "fp32"

    def _specs(self) -> list[BackboneSpec]:
        return [resolve(n, self.weights, self.pool) for n in self._backbone_names()]

    def _features(self, paths: Sequence[str], views: tuple[str, ...] | None = None) -> Features:
        rt = self._runtime()
        local = views is not None  # training views: the local runner makes them (train_views)
        return extract_features(
            list(paths),
            self.specs_,
            runner="local" if local else rt.runner,
            ray_address=None if local else rt.ray_address,
            ray_actors=None if local else rt.ray_actors,
            views=views or self._views,
            pool=self.pool,
            cache=FeatureCache(rt.cache_dir),
            engine=rt.engine,
            precision=self.precision_,
            device=rt.device,
            batch_size=rt.batch_size,
            workers=rt.workers,
            decoder=rt.decoder,
            strict=rt.strict,
            progress=rt.progress,
            **({"calibration": self.calibration_} if self.calibration_ else {}),
        )

    def features(self, X: Sequence[str]) -> Features:
        """The (cached) features of the images ``X`` with this estimator's backbones, views and
        runtime, fitted or not: fills the feature cache ahead of :meth:`fit` (``--preset best``
        measures a stack's extraction rate this way). Unfitted, int8 needs the training images'
        calibration, so it is refused."""
        self._validate_params()
        if "specs_" not in self.__dict__:
            if self.precision_ == "int8":
                raise StackvisionError("int8 features need a fitted model's calibration",
                                       "fit the model first, or use fp32 or bf16")  # fmt: skip
            self.specs_ = self._specs()
        return self._features(list(X))

    # ------------------------------------------------------------------ fit
    def fit(
        self, X: Sequence[str], y: Sequence, *, val: tuple[Sequence[str], Sequence] | None = None
    ):
        """Extract (cached) features of the images ``X`` and train heads on labels ``y``.

        ``val``: optional (paths, labels) held out for early stopping, calibration and metrics.
        With ``folds >= 2`` the model is the ensemble of the fold heads and ``metrics_`` are
        cross-validated (out-of-fold); with ``val_split`` a stratified hold-out is used instead.
        """
        self._validate_params()
        X, y = self._labelled(X, y)
        check_trainable(y, self.folds)
        self.specs_ = self._specs()
        self.classes_ = sorted(set(y))
        index = {c: i for i, c in enumerate(self.classes_)}
        self._precision = self._runtime().precision or "fp32"
        self.calibration_ = None
        feats = self._features(X)
        # int8: validation and later predictions reuse the training images' calibration sets
        self.calibration_ = feats.stats.get("calibration") or None
        dups = find_duplicates(
            feats.paths, feats.hashes, [y[i] for i in feats.index], strict=self._runtime().strict
        )
        feats = feats.subset(dups.keep)  # copies with two labels left out (listed problems)
        self.problems_ = list(feats.problems) + dups.problems
        yk = np.asarray([index[y[i]] for i in feats.index], np.int64)
        check_trainable([self.classes_[i] for i in yk], self.folds)
        Xs = feats.stacked()
        self.extract_stats_ = feats.stats
        cw = None if self.class_weight in (None, "none") else self.class_weight
        groups = dups.groups
        if self.group_duplicates:
            from .neighbours import near_duplicate_groups

            groups = near_duplicate_groups(Xs, dups.groups)

        val_feats = vyk = None
        if val is not None:
            vX, vy = self._validation_data(val)
            val_feats = self._features(vX)
            self.problems_ += val_feats.problems
            vyk = np.asarray([index[vy[i]] for i in val_feats.index], np.int64)

        kfold = self.folds >= 2  # the LDA weight from the folds' own out-of-fold rows
        self.head_kind_, self.head_params_, self.head_selection_, lda = choose_head(
            self.head, self.head_params, Xs, yk, len(self.classes_), n_views=self.n_views_,
            groups=groups, class_weight=cw, seed=self.seed, progress=self._runtime().progress,
            lda_by_inner_cv=not kfold,
        )  # fmt: skip
        if self.train_views:  # extra rows for the heads only: scores use the views above
            more = self._features(feats.paths, view_names(self.train_views))
            if more.hashes != feats.hashes:
                raise StackvisionError("training images changed while training", "run it again")
            Xs = np.concatenate([Xs, more.stacked()], axis=1)
        lda_auto = kfold and self.head_kind_ == "logreg" and "lda" not in (self.head_params_ or {})
        res = fit_stack_heads(
            self.head_kind_,
            self.head_params_,
            Xs,
            yk,
            self.classes_,
            folds=self.folds,
            val_split=self.val_split,
            val=None if val_feats is None else (val_feats.stacked(), vyk),
            n_views=self.n_views_,
            class_weight=cw,
            calibrate=self.calibrate,
            seed=self.seed,
            progress=self._runtime().progress,
            groups=groups,
            lda_auto=lda_auto,
            train_views=self.train_views,
        )
        if res.lda:
            lda, self.head_params_ = res.lda, {**(self.head_params_ or {}), "lda": res.lda["lda"]}
        if res.metrics is not None:
            res.metrics["duplicates"] = dups.summary()
            if self.group_duplicates:  # how many groups the splits kept whole
                res.metrics["duplicates"]["split_groups"] = int(groups.max(initial=-1) + 1)
            if self.head_selection_:
                res.metrics["head_selection"] = self.head_selection_
            if lda:  # how the weight of the LDA logits in the logreg head was chosen
                res.metrics["lda"] = lda
        self.heads_, self.histories_, self.splits_ = res.heads, res.histories, res.splits
        self.train_paths_ = [feats.paths[i] for i in res.train_idx]
        self.training_hashes_ = frozenset(feats.hashes[i] for i in res.train_idx)
        self.train_y_ = yk[res.train_idx]
        self.oof_proba_, self.metrics_, self.eval_ = res.oof_proba, res.metrics, None
        if res.eval is not None:
            where, rows, ey, ep = res.eval
            src = feats.paths if where == "train" else val_feats.paths
            self.eval_ = ([src[i] for i in rows], ey, ep)  # what metrics_ were computed on
        self._features_cache, self._feature_y = feats, yk
        self._val_data = (val_feats, vyk) if val_feats is not None else None
        self.manifest_ = None
        self.temperature_, self.averaging_ = res.temperature, "logits"
        return self

    # ------------------------------------------------------------------ predict
    def predict_features(self, Xs: np.ndarray) -> np.ndarray:
        """Calibrated ensemble probabilities from stacked features (N, n_views, D)."""
        self.check_is_fitted()
        p = ensemble_proba(self.heads_, Xs, self.n_views_, self.averaging_)
        return apply_temperature(p, self.temperature_)

    def predict_paths(self, X: Sequence[str]) -> Predictions:
        """Probabilities for every usable image in ``X``; unusable ones are listed in ``problems``."""
        self.check_is_fitted()
        feats = self._features(list(X))
        n = len(self.classes_)
        proba = self.predict_features(feats.stacked()) if feats.paths else np.zeros((0, n))
        return Predictions(feats.paths, proba, list(self.classes_), feats.problems, feats.stats)

    # ------------------------------------------------------------------ fixed-size input (export, serving)
    def input_preprocess(self) -> Preprocess:
        """The preprocessing that makes the uint8 input of :meth:`forward_uint8`, ONNX export
        and serving: that of the backbone with the largest input size (RGB order).

        Smaller backbones get their own size from that input inside the model, by a fixed
        antialiased resize (see :func:`stackvision.export.resize_uint8`).
        """
        self.check_is_fitted()
        return largest_input([s.preprocess for s in self.specs_])

    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a uint8 RGB batch (N, S, S, 3) made by
        :func:`stackvision.export.prepare_image` (S = ``input_preprocess().input_size``).

        Runs the same engines and heads as :meth:`predict_paths`, without the feature cache.
        """
        from .export import check_uint8_batch
        from .stack_forward import uint8_features

        self.check_is_fitted()
        batch = check_uint8_batch(batch, self.input_preprocess().input_size)
        if not len(batch):
            return np.zeros((0, len(self.classes_)), np.float32)
        engines = self.__dict__.setdefault("_engines", {})
        feats = uint8_features(
            batch, self.specs_, self._runtime(), engines, pool=self.pool,
            precision=self.precision_, calibration=self.calibration_, n_views=self.n_views_,
        )  # fmt: skip
        return self.predict_features(feats)

    def to_torch_module(self):
        """One ``torch.nn.Module``: uint8 RGB NHWC batch at ``input_preprocess()`` size ->
        calibrated class probabilities (backbones, heads, fold averaging, flip TTA, temperature).
        This is what :mod:`stackvision.export` exports."""
        from .backbones import build_model
        from .export import StackModule

        self.check_is_fitted()
        return StackModule(
            [(spec, build_model(spec, self.pool)) for spec in self.specs_],
            [h.state() for h in self.heads_],
            n_views=self.n_views_,
            temperature=self.temperature_,
            averaging=self.averaging_,
            input_size=self.input_preprocess().input_size,
        )

    def describe(self) -> dict:
        """What serving shows at GET /model: kind, classes, backbones, head, metrics, versions."""
        self.check_is_fitted()
        manifest = self.manifest_ or self._manifest()
        return {
            "kind": self.kind,
            "classes": list(self.classes_),
            "backbones": [s.to_dict() for s in self.specs_],
            "head": manifest.get("head"),
            "folds": manifest.get("folds"),
            "tta": manifest.get("tta"),
            "temperature": self.temperature_,
            "precision": self.precision_,
            "calibration": self.calibration_,
            "metrics": manifest.get("metrics"),
            "created": manifest.get("created"),
            "stackvision_version": manifest.get("stackvision_version"),
        }

    # ------------------------------------------------------------------ persistence
    def _manifest(self) -> dict:
        return {**self._manifest_head(), **stack_manifest(self)}

    def _tensors(self) -> dict[str, np.ndarray]:
        return head_tensors(self.heads_)

    def save(self, path: str, *, report: bool = True) -> str:
        """Write the model directory (see :mod:`stackvision.model_dir`), with metrics and report."""
        self.check_is_fitted()
        return self._write_dir(
            path,
            self.manifest_ or self._manifest(),  # a loaded model keeps its own
            self._tensors(),
            histories=self.histories_,
            title=f"stackvision model: {'+'.join(s.name for s in self.specs_)} / {self._head_kind}",
            report=report,
        )

    @classmethod
    def load(
        cls, path: str, runtime: Runtime | None = None, *, weights: dict[str, str] | None = None
    ) -> StackedClassifier:
        """Load a model directory, to run with ``runtime``; ``weights`` (backbone name -> file)
        points at backbone weights that moved since training."""
        return load_stack(cls, path, runtime, weights)
