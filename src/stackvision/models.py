"""Loading any saved model by the ``kind`` in its manifest.

Every model kind offers the same surface, so ``predict``, ``evaluate``, export and serving treat
them alike: ``classes_``, ``predict_paths(paths) -> Predictions``, ``predict_proba(paths)``,
``predict(paths)``, ``save(path)`` and the classmethod ``load(path, **runtime)``.
"""

from __future__ import annotations

import importlib

from .errors import StackvisionError
from .model_dir import read_manifest

# kind -> "module:Class"; the class's ``load(path, **runtime)`` reads that kind's directory.
MODEL_KINDS = {
    "stack": "stackvision.classifier:StackedClassifier",
    "finetune": "stackvision.finetune:FineTunedClassifier",
    "ensemble": "stackvision.ensemble:EnsembleClassifier",
}


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
