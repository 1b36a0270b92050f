"""``ModelBase``: the one contract every model kind implements.

Estimator side (scikit-learn conventions, so ``get_params``/``set_params``/``clone``,
``GridSearchCV`` and ``cross_val_score`` work):

* the constructor stores its parameters as given, nothing else; an unknown keyword raises
  :class:`~stackvision.params.UnknownParameter` with the closest parameter name;
* ``fit(X, y)`` (image paths and labels) checks the parameters against the class's
  ``_parameter_constraints`` table (:mod:`stackvision.params`), never changes them (derived values
  go to attributes ending in ``_``) and returns ``self``;
* :meth:`check_is_fitted`, and ``predict_proba``/``predict``/``score`` written once here on top of
  the kind's ``predict_paths``.

Prediction side (used by export, serving, ensembles):

* ``input_preprocess()`` -> :class:`Preprocess`: the fixed-size uint8 input, as data;
* ``forward_uint8(batch)``: uint8 (N, S, S, 3) RGB -> (N, n_classes) calibrated probabilities
  (flip views and temperature inside), S = ``input_preprocess().input_size``;
* ``to_torch_module()``: the same function as one ``torch.nn.Module`` (ONNX export);
* ``describe()`` (GET /model), ``predict_paths(paths) -> Predictions``, ``save(path)`` and the
  classmethod ``load(path, runtime=None, *, weights=None)``.

A new kind is one module with a subclass of :class:`ModelBase` plus one line in
:data:`stackvision.models.MODEL_KINDS`.
"""

from __future__ import annotations

import abc
import functools
import inspect
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from .data import Problem
from .errors import StackvisionError
from .params import check_known, validate_params
from .preprocess import Preprocess
from .runtime import FIELDS as RUNTIME_FIELDS
from .runtime import Runtime


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and odd types: not equal for printing's sake
        return False


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


def largest_input(pps: Sequence[Preprocess]) -> Preprocess:
    """The input of a model made of parts with their own input sizes (a stack's backbones, an
    ensemble's members): the preprocessing of the largest, in RGB order. The parts resize it to
    their own size inside, by :func:`stackvision.export.resize_uint8`."""
    return replace(max(pps, key=lambda p: p.input_size), channel_order="RGB")


@functools.cache
def _not_fitted_class() -> type:
    # scikit-learn's NotFittedError too, so its tools recognise it; made on first use because
    # importing scikit-learn costs ~0.9 s, paid only on this error path (or inside sklearn).
    from sklearn.exceptions import NotFittedError

    class NotFitted(StackvisionError, NotFittedError):
        """A model used before ``fit`` or ``load`` (scikit-learn's ``NotFittedError`` too)."""

    NotFitted.__module__ = __name__
    return NotFitted


def __getattr__(name: str):
    if name == "NotFitted":
        return _not_fitted_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _runtime_hint(name: str) -> str:
    return f"'{name}' is a runtime option: pass runtime=Runtime({name}=...)"


class ModelBase(metaclass=abc.ABCMeta):
    """Base of every model kind (see the module doc).

    Follows scikit-learn's ``BaseEstimator`` + ``ClassifierMixin`` exactly (``get_params``,
    ``set_params``, ``score``, tags) without inheriting them: importing scikit-learn costs ~0.9 s,
    which every ``predict`` of one image would pay. scikit-learn's ``clone``, ``GridSearchCV`` and
    ``cross_val_score`` need nothing else (they go through ``get_params``).
    """

    kind: ClassVar[str]
    # name -> list of accepted values (params.Interval / Options / a type / None), checked by fit
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    # name -> hint shown when the value is refused
    _parameter_fixes: ClassVar[dict[str, str]] = {}
    # the attribute that fit and load set last: its presence means "fitted"
    _fitted_attribute: ClassVar[str] = "classes_"
    # extra sections (report.Section) that save() adds to report.html; set on the instance
    report_sections: Sequence = ()
    #: content hashes of the images the model was fitted on (``training_images.txt``), when known
    training_hashes_: frozenset[str] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        names = [p for p in inspect.signature(init).parameters if p != "self"]

        @functools.wraps(init)  # keeps the signature scikit-learn reads for get_params
        def __init__(self, *args, **kwargs):
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                hints = {n: _runtime_hint(n) for n in RUNTIME_FIELDS}
                check_known(unknown, names, cls.__name__, hints=hints)
            init(self, *args, **kwargs)

        cls.__init__ = __init__

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The constructor's parameter names, sorted (as scikit-learn's)."""
        sig = inspect.signature(cls.__init__)  # follows the wrapper to the real __init__
        return sorted(
            p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD
        )

    def get_params(self, deep: bool = True) -> dict:
        """Parameters by name; with ``deep``, those of parameters that are models too
        (``name__param``, e.g. an ensemble's member objects), as scikit-learn's ``get_params``."""
        out = {}
        for key in self._get_param_names():
            value = vars(self)[key]  # the constructor stored it under its own name
            if deep and isinstance(value, ModelBase):
                out.update((f"{key}__{k}", v) for k, v in value.get_params().items())
            out[key] = value
        return out

    def set_params(self, **params):
        """Set parameters (scikit-learn's ``set_params``; unknown names raise with a suggestion).
        Values are checked by the next ``fit``."""
        if not params:
            return self
        check_known({k.split("__")[0] for k in params}, self.get_params(deep=False),
                    type(self).__name__)  # fmt: skip
        nested: dict[str, dict] = defaultdict(dict)
        for key, value in params.items():
            key, delim, sub = key.partition("__")
            if delim:
                nested[key][sub] = value
            else:
                setattr(self, key, value)
        for key, sub_params in nested.items():
            vars(self)[key].set_params(**sub_params)
        return self

    def __repr__(self) -> str:  # only what differs from the defaults, as scikit-learn prints
        sig = inspect.signature(type(self).__init__).parameters
        changed = []
        for k, v in self.get_params(deep=False).items():
            default = sig[k].default
            same = v is default or (type(v) is type(default) and _equal(v, default))
            if not same:
                changed.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def _validate_params(self) -> None:
        """Check every parameter against ``_parameter_constraints``, then :meth:`_check_params`
        (constraints between parameters). Raises :class:`~stackvision.params.InvalidParameter`."""
        validate_params(
            self._parameter_constraints,
            self.get_params(deep=False),
            owner=type(self).__name__,
            fixes=self._parameter_fixes,
        )
        self._check_params()

    def _check_params(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Constraints a per-parameter table cannot say (override where needed)."""

    def _runtime(self) -> Runtime:
        """The runtime options in use: ``runtime``, or the defaults when it is ``None``."""
        return self.runtime if self.runtime is not None else Runtime()

    @staticmethod
    def _labelled(X: Sequence[str], y: Sequence) -> tuple[list[str], list[str]]:
        X, y = list(X), [str(v) for v in y]
        if len(X) != len(y):
            raise StackvisionError(
                f"{len(X)} images but {len(y)} labels", "give one label per image"
            )
        return X, y

    def _validation_data(self, val: tuple[Sequence[str], Sequence]) -> tuple[list, list]:
        """``fit``'s ``val=(paths, labels)``, checked against the training classes."""
        vX, vy = self._labelled(*val)
        unknown = sorted(set(vy) - set(self.classes_))
        if unknown:
            raise StackvisionError(
                f"validation labels not in the training classes: {', '.join(unknown[:5])}",
                "use the same class names in --val as in the training data",
            )
        return vX, vy

    # ------------------------------------------------------------------ fitted state
    def __sklearn_is_fitted__(self) -> bool:
        return self._fitted_attribute in vars(self)

    def check_is_fitted(self) -> None:
        """Raise :class:`NotFitted` unless the model was fitted or loaded."""
        if not self.__sklearn_is_fitted__():
            name = type(self).__name__
            raise _not_fitted_class()(
                f"this {name} is not fitted yet", f"call fit() or {name}.load()"
            )

    def __sklearn_tags__(self):
        # called by scikit-learn only, so it is imported already
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(two_d_array=False, string=True),  # X: a list of image paths
            non_deterministic=False,
        )

    # ------------------------------------------------------------------ predictions from paths
    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        """(n_images, n_classes) probabilities, columns in ``classes_`` order.

        Raises :class:`StackvisionError` naming the first unusable image, so rows always align
        with ``X``; use ``predict_paths`` to skip bad images instead.
        """
        self.check_is_fitted()
        pred = self.predict_paths(X)
        if pred.problems:
            p = pred.problems[0]
            raise StackvisionError(
                f"bad image {p.path}: {p.reason}",
                "remove it, or use predict_paths() to skip bad images",
            )
        return pred.proba

    def predict(self, X: Sequence[str]) -> np.ndarray:
        """Predicted class name of each image in ``X``."""
        proba = self.predict_proba(X)
        return np.asarray(self.classes_, dtype=object)[proba.argmax(axis=1)]

    def score(self, X: Sequence[str], y: Sequence, sample_weight=None) -> float:
        """Mean accuracy on images ``X`` with labels ``y`` (weighted by ``sample_weight``)."""
        hit = self.predict(X) == np.asarray([str(v) for v in y], dtype=object)
        return float(np.average(hit, weights=sample_weight))

    # ------------------------------------------------------------------ the contract
    @abc.abstractmethod
    def fit(self, X: Sequence[str], y: Sequence):
        """Train on image paths ``X`` with labels ``y``; returns ``self``."""

    @abc.abstractmethod
    def predict_paths(self, X: Sequence[str]) -> Predictions:
        """Probabilities for every usable image in ``X``; unusable ones in ``problems``."""

    @abc.abstractmethod
    def input_preprocess(self) -> Preprocess:
        """The preprocessing that makes :meth:`forward_uint8`'s input (RGB order)."""

    @abc.abstractmethod
    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB -> (N, n_classes) calibrated probabilities."""

    @abc.abstractmethod
    def to_torch_module(self):
        """:meth:`forward_uint8` as one ``torch.nn.Module`` (on the CPU, eval mode)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """What serving shows at GET /model (``kind`` and ``classes`` at least)."""

    @abc.abstractmethod
    def save(self, path: str, *, report: bool = True) -> str:
        """Write the model directory at ``path``; returns its absolute path."""

    def _manifest_head(self) -> dict:
        """The entries every kind's manifest starts with: kind, version, creation time, classes."""
        import datetime as dt

        from . import __version__

        return {
            "kind": self.kind,
            "stackvision_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "classes": list(self.classes_),
        }

    def _write_dir(
        self, path, manifest, tensors, *, histories, title, report, files=None, extra=None
    ):
        """Write the model directory (:func:`stackvision.model_dir.write_model_dir`): manifest,
        tensors, ``history.json``, ``metrics.json`` with the problems, ``files``, what
        ``extra(tmp)`` adds, and (``report`` and evaluation data) the HTML report."""
        from .model_dir import write_model_dir

        files = {"history.json": histories, **(files or {})}
        if self.metrics_:
            files["metrics.json"] = {
                **self.metrics_,
                "problems": [p.__dict__ for p in self.problems_],
            }

        def add(tmp):
            if self.training_hashes_:
                from .model_dir import write_training_hashes

                write_training_hashes(tmp, self.training_hashes_)
            if extra is not None:
                extra(tmp)
            if report and self.metrics_ and self.eval_:
                from .report import write_report

                paths, y, proba = self.eval_
                write_report(
                    os.path.join(tmp, "report"), self.metrics_, paths, y, proba, self.classes_,
                    histories=histories, problems=self.problems_, title=title,
                    sections=self.report_sections,
                )  # fmt: skip

        return write_model_dir(path, manifest, tensors, files, add)

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str, runtime: Runtime | None = None, *, weights=None):
        """Read a model directory of this kind, to run with ``runtime``."""
