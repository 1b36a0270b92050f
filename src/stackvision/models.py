"""Loading any saved model by the ``kind`` in its manifest.

Every model kind implements the contract of :class:`stackvision.base.ModelBase`, so
``predict``, ``evaluate``, export, serving and ensembles treat them alike. Adding a kind is one
module with a ``ModelBase`` subclass and one line in :data:`MODEL_KINDS`.
"""

from __future__ import annotations

import importlib

from .errors import StackvisionError
from .model_dir import read_manifest
from .runtime import Runtime

# kind -> "module:Class"; the class's ``load(path, runtime, weights=...)`` reads that kind's directory.
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


def load_model(
    path: str,
    runtime: Runtime | dict | None = None,
    *,
    weights: dict[str, str] | None = None,
    **options,
):
    """Load the model directory at ``path`` whatever its kind, to run with ``runtime``.

    ``weights``: backbone name -> local weights file, for backbones whose weights moved since
    training. ``options``: :class:`Runtime` fields as keywords (``cache_dir=...``,
    ``device=...``), applied over ``runtime``, for callers that hold them as a dict.
    """
    runtime = Runtime.of(runtime, **options)
    kind = read_manifest(path).get("kind", "stack")
    return model_class(kind).load(path, runtime, weights=weights)
