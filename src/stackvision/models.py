"""Loading any saved model by the ``kind`` in its manifest.

Every model kind offers the same surface, so ``predict``, ``evaluate``, export and serving treat
them alike: ``classes_``, ``predict_paths(paths) -> Predictions``, ``predict_proba(paths)``,
``predict(paths)``, ``save(path)`` and the classmethod ``load(path, **runtime)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np

from .errors import StackvisionError
from .model_dir import read_manifest

# kind -> "module:Class"; the class's ``load(path, **runtime)`` reads that kind's directory.
MODEL_KINDS = {
    "stack": "stackvision.classifier:StackedClassifier",
    "finetune": "stackvision.finetune:FineTunedClassifier",
    "ensemble": "stackvision.ensemble:EnsembleClassifier",
}


class PredictMixin:
    """``predict_proba``, ``predict`` and ``score`` on top of a kind's ``predict_paths``."""

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        """(n_images, n_classes) probabilities, columns in ``classes_`` order.

        Raises :class:`StackvisionError` naming the first unusable image, so rows always align
        with ``X``; use ``predict_paths`` to skip bad images instead.
        """
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
        proba = self.predict_proba(X)  # first: it checks the model is fitted
        return np.asarray(self.classes_, dtype=object)[proba.argmax(axis=1)]

    def score(self, X: Sequence[str], y: Sequence) -> float:
        """Mean accuracy on images ``X`` with labels ``y``."""
        return float(np.mean(self.predict(X) == np.asarray([str(v) for v in y], dtype=object)))


def model_class(kind: str):
    target = MODEL_KINDS.get(kind)
    if target is None:
        raise StackvisionError(
            f"model kind '{kind}' is not known to this stackvision",
            f"known kinds: {', '.join(MODEL_KINDS)}; upgrade stackvision if the model is newer",
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def load_model(path: str, **runtime):
    """Load the model directory at ``path`` whatever its kind.

    ``runtime`` holds options that do not change the model (cache_dir, device, engine, batch_size,
    workers, strict, progress, weights).
    """
    kind = read_manifest(path).get("kind", "stack")
    return model_class(kind).load(path, **runtime)
