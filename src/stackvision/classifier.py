"""``StackedClassifier``: the scikit-learn style API that strings the stages together.

paths -> :mod:`extract` (cached backbone features) -> stacked matrix -> :mod:`validation` (heads,
folds, TTA, calibration) -> :mod:`model_dir` (save / load). The CLI only calls this class.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .backbones import DEFAULT_STACK, POOLS, BackboneSpec, resolve
from .cache import FeatureCache
from .data import Problem, check_trainable
from .errors import StackvisionError
from .extract import Features
from .heads import HEADS, make_head
from .metrics import classification_metrics, summary_row
from .model_dir import read_manifest, read_tensors, write_model_dir
from .models import PredictMixin
from .runners import extract_features
from .validation import (
    apply_temperature,
    cross_validate,
    ensemble_proba,
    fit_head,
    fit_temperature,
    holdout_split,
    kfold_splits,
    predict_views,
)

TTA_MODES = ("none", "flip")


@dataclass
class Predictions:
    """Probabilities for the usable images among the inputs, and what was left out."""

    paths: list[str]
    proba: np.ndarray
    classes: list[str]
    problems: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def top_k(self, k: int = 5) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.classes))
        order = np.argsort(-self.proba, axis=1)[:, :k]
        return [
            [(self.classes[j], float(self.proba[i, j])) for j in row] for i, row in enumerate(order)
        ]


class StackedClassifier(PredictMixin):
    """Frozen pretrained backbones -> concatenated pooled features -> k-fold heads, flip TTA,
    temperature-calibrated fold ensemble.

    Parameters are stored as given and validated by :meth:`fit` (scikit-learn convention).
    ``fit(paths, labels)`` takes image file paths and their class labels.
    """

    def __init__(
        self,
        backbones: Sequence[str] = DEFAULT_STACK,
        *,
        head: str = "logreg",
        head_params: dict | None = None,
        folds: int = 5,
        val_split: float | None = None,
        tta: str = "flip",
        pool: str = "avg",
        class_weight: str | None = None,
        calibrate: bool = True,
        weights: dict[str, str] | None = None,
        cache_dir: str | None = None,
        engine: str = "auto",
        precision: str = "fp32",
        device: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        seed: int = 0,
        strict: bool = False,
        progress: bool = False,
        runner: str = "local",
        ray_address: str | None = None,
        ray_actors: int | None = None,
    ):
        self.backbones = backbones
        self.head = head
        self.head_params = head_params
        self.folds = folds
        self.val_split = val_split
        self.tta = tta
        self.pool = pool
        self.class_weight = class_weight
        self.calibrate = calibrate
        self.weights = weights
        self.cache_dir = cache_dir
        self.engine = engine
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.seed = seed
        self.strict = strict
        self.progress = progress
        self.runner = runner
        self.ray_address = ray_address
        self.ray_actors = ray_actors

    # ------------------------------------------------------------------ validation of parameters
    def _check_params(self) -> None:
        if isinstance(self.backbones, str):
            self.backbones = [b for b in self.backbones.split(",") if b.strip()]
        if not self.backbones:
            raise StackvisionError(
                "no backbones given", f"e.g. --backbones {','.join(DEFAULT_STACK)}"
            )
        if self.head not in HEADS:
            raise StackvisionError(f"unknown head '{self.head}'", f"use one of: {', '.join(HEADS)}")
        make_head(self.head, self.head_params)  # validates head_params
        if not isinstance(self.folds, int) or self.folds < 0 or self.folds == 1:
            raise StackvisionError(
                f"--folds must be 0 (no k-fold) or at least 2, got {self.folds}", "e.g. --folds 5"
            )
        if self.val_split is not None and not 0 < self.val_split < 1:
            raise StackvisionError(
                f"--val-split must be between 0 and 1, got {self.val_split}", "e.g. --val-split 0.1"
            )
        if self.tta not in TTA_MODES:
            raise StackvisionError(f"unknown TTA mode '{self.tta}'", "use --tta flip or --tta none")
        if self.pool not in POOLS:
            raise StackvisionError(
                f"unknown pooling '{self.pool}'", f"use one of: {', '.join(POOLS)}"
            )
        if self.class_weight not in (None, "none", "balanced"):
            raise StackvisionError(
                f"unknown class weight '{self.class_weight}'", "use --class-weight balanced"
            )

    @property
    def _views(self) -> tuple[str, ...]:
        return ("orig", "flip") if self.tta == "flip" else ("orig",)

    @property
    def n_views_(self) -> int:
        return len(self._views)

    def _specs(self) -> list[BackboneSpec]:
        names = list(dict.fromkeys(self.backbones))
        return [resolve(n, self.weights) for n in names]

    def _features(self, paths: Sequence[str]) -> Features:
        return extract_features(
            list(paths),
            self.specs_,
            runner=getattr(self, "runner", "local"),
            ray_address=getattr(self, "ray_address", None),
            ray_actors=getattr(self, "ray_actors", None),
            views=self._views,
            pool=self.pool,
            cache=FeatureCache(self.cache_dir),
            engine=self.engine,
            precision=self.precision,
            device=self.device,
            batch_size=self.batch_size,
            workers=self.workers,
            strict=self.strict,
            progress=self.progress,
            **({"calibration": self.calibration_} if getattr(self, "calibration_", None) else {}),
        )

    # ------------------------------------------------------------------ fit
    def fit(
        self, X: Sequence[str], y: Sequence, *, val: tuple[Sequence[str], Sequence] | None = None
    ):
        """Extract (cached) features of the images ``X`` and train heads on labels ``y``.

        ``val``: optional (paths, labels) held out for early stopping, calibration and metrics.
        With ``folds >= 2`` the model is the ensemble of the fold heads and ``metrics_`` are
        cross-validated (out-of-fold); with ``val_split`` a stratified hold-out is used instead.
        """
        self._check_params()
        X, y = list(X), [str(v) for v in y]
        if len(X) != len(y):
            raise StackvisionError(
                f"{len(X)} images but {len(y)} labels", "give one label per image"
            )
        check_trainable(y, self.folds)
        self.specs_ = self._specs()
        self.classes_ = sorted(set(y))
        index = {c: i for i, c in enumerate(self.classes_)}
        self.calibration_ = None
        feats = self._features(X)
        # int8: validation and later predictions reuse the training images' calibration sets
        self.calibration_ = feats.stats.get("calibration") or None
        self.problems_ = list(feats.problems)
        yk = np.asarray([index[y[i]] for i in feats.index], np.int64)
        check_trainable([self.classes_[i] for i in yk], self.folds)
        yk_all = yk
        Xs = feats.stacked()
        self.extract_stats_ = feats.stats
        self.train_paths_, self.train_y_ = feats.paths, yk
        n_classes = len(self.classes_)
        hp, kind, nv = self.head_params, self.head, self.n_views_
        cw = None if self.class_weight in (None, "none") else self.class_weight

        val_feats = None
        if val is not None:
            vX, vy = list(val[0]), [str(v) for v in val[1]]
            unknown = sorted(set(vy) - set(self.classes_))
            if unknown:
                raise StackvisionError(
                    f"validation labels not in the training classes: {', '.join(unknown[:5])}",
                    "use the same class names in --val as in the training data",
                )
            val_feats = self._features(vX)
            self.problems_ += val_feats.problems
            vyk = np.asarray([index[vy[i]] for i in val_feats.index], np.int64)
            Xv = val_feats.stacked()

        self.histories_: list[list[dict]] = []
        self.eval_ = None  # (paths, y, proba) the metrics were computed on
        if self.folds >= 2:
            self.splits_ = kfold_splits(yk, self.folds, self.seed)
            res = cross_validate(kind, hp, Xs, yk, n_classes, self.splits_, nv, cw, self.seed)
            self.heads_ = res.heads
            self.histories_ = res.histories
            oof = res.oof_proba
            self.temperature_ = fit_temperature(oof, yk) if self.calibrate else 1.0
            self.oof_proba_ = apply_temperature(oof, self.temperature_)
            self.eval_ = (
                [feats.paths[i] for i in res.oof_index],
                yk[res.oof_index],
                self.oof_proba_,
            )
            self.metrics_ = {
                "validation": f"{self.folds}-fold out-of-fold",
                **classification_metrics(yk, self.oof_proba_, self.classes_),
            }
            if val_feats is not None:
                vp = apply_temperature(ensemble_proba(self.heads_, Xv, nv), self.temperature_)
                self.metrics_["holdout"] = classification_metrics(vyk, vp, self.classes_)
                self.eval_ = (val_feats.paths, vyk, vp)
        else:
            if val_feats is None and self.val_split:
                tr, va = holdout_split(yk, self.val_split, self.seed)
                Xv, vyk, vpaths = Xs[va], yk[va], [feats.paths[i] for i in va]
                Xs, yk = Xs[tr], yk[tr]
                self.train_paths_, self.train_y_ = [feats.paths[i] for i in tr], yk
            elif val_feats is not None:
                vpaths = val_feats.paths
            else:
                Xv = None
            if Xv is not None:
                Xc = np.concatenate([Xs, Xv])
                yc = np.concatenate([yk, vyk])
                tr, va = np.arange(len(yk)), np.arange(len(yk), len(yc))
                head = fit_head(kind, hp, Xc, yc, n_classes, tr, va, nv, cw, self.seed)
                self.heads_ = [head]
                self.histories_ = [head.history]
                vp = predict_views(head, Xv, nv)
                self.temperature_ = fit_temperature(vp, vyk) if self.calibrate else 1.0
                vp = apply_temperature(vp, self.temperature_)
                self.eval_ = (vpaths, vyk, vp)
                self.metrics_ = {
                    "validation": "hold-out",
                    **classification_metrics(vyk, vp, self.classes_),
                }
            else:
                head = fit_head(
                    kind, hp, Xs, yk, n_classes, np.arange(len(yk)), None, nv, cw, self.seed
                )
                self.heads_ = [head]
                self.histories_ = [head.history]
                self.temperature_ = 1.0
                self.metrics_ = None
        self._features_cache, self._feature_y = feats, yk_all
        self._val_data = (val_feats, vyk) if val_feats is not None else None
        return self

    # ------------------------------------------------------------------ predict
    def _check_fitted(self):
        if not hasattr(self, "heads_"):
            raise StackvisionError(
                "this StackedClassifier is not fitted yet", "call fit() or StackedClassifier.load()"
            )

    def predict_features(self, Xs: np.ndarray) -> np.ndarray:
        """Calibrated ensemble probabilities from stacked features (N, n_views, D)."""
        self._check_fitted()
        return apply_temperature(ensemble_proba(self.heads_, Xs, self.n_views_), self.temperature_)

    def predict_paths(self, X: Sequence[str]) -> Predictions:
        """Probabilities for every usable image in ``X``; unusable ones are listed in ``problems``."""
        self._check_fitted()
        feats = self._features(list(X))
        proba = (
            self.predict_features(feats.stacked())
            if feats.paths
            else np.zeros((0, len(self.classes_)))
        )
        return Predictions(feats.paths, proba, list(self.classes_), feats.problems, feats.stats)

    # ------------------------------------------------------------------ fixed-size input (export, serving)
    def input_preprocess(self):
        """The preprocessing that makes the uint8 input of :meth:`forward_uint8`, ONNX export
        and serving: that of the backbone with the largest input size (RGB order).

        Smaller backbones get their own size from that input inside the model, by a fixed
        antialiased resize (see :func:`stackvision.export.resize_uint8`).
        """
        self._check_fitted()
        from dataclasses import replace

        big = max(self.specs_, key=lambda s: s.preprocess.input_size)
        return replace(big.preprocess, channel_order="RGB")

    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a uint8 RGB batch (N, S, S, 3) made by
        :func:`stackvision.export.prepare_image` (S = ``input_preprocess().input_size``).

        Runs the same engines and heads as :meth:`predict_paths`, without the feature cache.
        """
        from .engines import Calibration, create_engine
        from .export import check_uint8_batch, resize_uint8

        self._check_fitted()
        batch = check_uint8_batch(batch, self.input_preprocess().input_size)
        engines = getattr(self, "_engines", None)
        if engines is None:
            engines = self._engines = {}
        blocks = []
        for spec in self.specs_:
            if spec.name not in engines:
                engines[spec.name] = create_engine(
                    spec,
                    pool=self.pool,
                    engine=self.engine,
                    device=self.device,
                    precision=self.precision,
                    cache_dir=FeatureCache(self.cache_dir).base,
                    calibration=Calibration(self.calibration_[spec.name])
                    if getattr(self, "calibration_", None)
                    else None,
                )
            x = resize_uint8(batch, spec.preprocess.input_size)
            if spec.preprocess.channel_order == "BGR":
                x = x[..., ::-1]
            eng, bs = engines[spec.name], self.batch_size
            feats = []
            for v in [x, x[:, :, ::-1]][: self.n_views_]:
                parts = [
                    eng.features(np.ascontiguousarray(v[i : i + bs])) for i in range(0, len(v), bs)
                ]
                feats.append(np.concatenate(parts) if parts else np.zeros((0, spec.feature_dim)))
            blocks.append(np.stack(feats, axis=1).astype(np.float32))
        return self.predict_features(np.concatenate(blocks, axis=-1))

    def to_torch_module(self):
        """One ``torch.nn.Module``: uint8 RGB NHWC batch at ``input_preprocess()`` size ->
        calibrated class probabilities (backbones, heads, fold averaging, flip TTA, temperature).
        This is what :mod:`stackvision.export` exports."""
        from .backbones import build_model
        from .export import StackModule

        self._check_fitted()
        return StackModule(
            [(spec, build_model(spec, self.pool)) for spec in self.specs_],
            [h.state() for h in self.heads_],
            n_views=self.n_views_,
            temperature=self.temperature_,
            input_size=self.input_preprocess().input_size,
        )

    def describe(self) -> dict:
        """What serving shows at GET /model: kind, classes, backbones, head, metrics, versions."""
        manifest = getattr(self, "manifest_", None) or self._manifest()
        return {
            "kind": "stack",
            "classes": list(self.classes_),
            "backbones": [s.to_dict() for s in self.specs_],
            "head": manifest.get("head"),
            "folds": manifest.get("folds"),
            "tta": manifest.get("tta"),
            "temperature": self.temperature_,
            "precision": self.precision,
            "calibration": getattr(self, "calibration_", None),
            "metrics": manifest.get("metrics"),
            "created": manifest.get("created"),
            "stackvision_version": manifest.get("stackvision_version"),
        }

    # ------------------------------------------------------------------ persistence
    def _manifest(self) -> dict:
        counts = Counter(self.classes_[i] for i in self.train_y_)
        return {
            "kind": "stack",
            "stackvision_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "classes": list(self.classes_),
            "backbones": [
                {
                    **s.to_dict(),
                    "pool": self.pool,
                    "weights_path": s.weights_path if s.source == "file" else None,
                }
                for s in self.specs_
            ],
            "views": list(self._views),
            "tta": self.tta,
            "head": {"kind": self.head, "params": make_head(self.head, self.head_params).params},
            "folds": self.folds,
            "n_heads": len(self.heads_),
            "temperature": self.temperature_,
            "precision": self.precision,
            "calibration": getattr(self, "calibration_", None),
            "class_weight": self.class_weight,
            "seed": self.seed,
            "training": {
                "n_images": int(len(self.train_y_)),
                "per_class": dict(sorted(counts.items())),
                "n_problems": len(getattr(self, "problems_", [])),
            },
            "metrics": summary_row(self.metrics_) if self.metrics_ else None,
        }

    def _tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for k, h in enumerate(self.heads_):
            for name, arr in h.state().items():
                out[f"head{k}.{name}"] = np.asarray(arr, np.float32)
        return out

    def save(self, path: str, *, report: bool = True) -> str:
        """Write the model directory (see :mod:`stackvision.model_dir`), with metrics and report."""
        self._check_fitted()
        files = {"history.json": self.histories_}
        if self.metrics_:
            files["metrics.json"] = {
                **self.metrics_,
                "problems": [p.__dict__ for p in self.problems_],
            }

        def add_report(tmp):
            if report and self.metrics_ and self.eval_:
                from .report import write_report

                paths, y, proba = self.eval_
                write_report(
                    os.path.join(tmp, "report"),
                    self.metrics_,
                    paths,
                    y,
                    proba,
                    self.classes_,
                    histories=self.histories_,
                    problems=self.problems_,
                    title=f"stackvision model: {'+'.join(s.name for s in self.specs_)} / {self.head}",
                )

        return write_model_dir(path, self._manifest(), self._tensors(), files, add_report)

    @classmethod
    def load(
        cls, path: str, *, weights: dict[str, str] | None = None, **overrides
    ) -> StackedClassifier:
        """Load a model directory. ``overrides`` set runtime options (cache_dir, device, engine...)."""
        manifest = read_manifest(path)
        if manifest.get("kind", "stack") != "stack":
            raise StackvisionError(
                f"{path} holds a '{manifest.get('kind')}' model, not a feature stack",
                "use stackvision.load_model()",
            )
        tensors = read_tensors(path, manifest)  # validated before the slow backbone set-up
        bb = manifest["backbones"]
        weights = dict(weights or {})
        for b in bb:
            if b.get("weights_path") and b["name"] not in weights:
                weights[b["name"]] = b["weights_path"]
        overrides.setdefault("precision", manifest.get("precision", "fp32"))
        model = cls(
            [b["name"] for b in bb],
            head=manifest["head"]["kind"],
            head_params=manifest["head"]["params"],
            folds=manifest["folds"],
            tta=manifest["tta"],
            pool=bb[0]["pool"],
            class_weight=manifest.get("class_weight"),
            weights=weights,
            seed=manifest.get("seed", 0),
            **overrides,
        )
        model.specs_ = model._specs()
        for spec, saved in zip(model.specs_, bb):
            if spec.weights_id != saved["weights_id"] or spec.architecture != saved["architecture"]:
                raise StackvisionError(
                    f"backbone '{saved['name']}' weights differ from the ones the model was trained with "
                    f"({spec.weights_id[:19]} here, {saved['weights_id'][:19]} in {path})",
                    f"install the same weights, or pass the original file with --weights {saved['name']}=PATH",
                )
        model.heads_ = []
        for k in range(manifest["n_heads"]):
            prefix = f"head{k}."
            state = {n[len(prefix) :]: a for n, a in tensors.items() if n.startswith(prefix)}
            model.heads_.append(
                make_head(manifest["head"]["kind"], manifest["head"]["params"]).load_state(state)
            )
        model.classes_ = list(manifest["classes"])
        model.temperature_ = float(manifest["temperature"])
        model.calibration_ = manifest.get("calibration")
        model.manifest_ = manifest
        model.metrics_ = None
        return model
