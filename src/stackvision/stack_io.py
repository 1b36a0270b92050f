"""The feature stack's side of the model-directory contract (:mod:`stackvision.model_dir`):
what its manifest records, how its heads become named tensors, and how both are read back."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .backbones import saved_specs
from .errors import StackvisionError
from .heads import make_head
from .metrics import summary_row
from .model_dir import read_manifest, read_tensors, read_training_hashes


def stack_manifest(model) -> dict:
    """The stack-specific manifest fields of a fitted ``StackedClassifier`` (the common head,
    classes and versions, comes from ``ModelBase._manifest_head``)."""
    local = lambda s: s.weights_path if s.source == "file" else None  # noqa: E731
    counts = Counter(model.classes_[i] for i in model.train_y_)
    kind = model._head_kind
    return {
        "backbones": [
            {**s.to_dict(), "pool": model.pool, "weights_path": local(s)} for s in model.specs_
        ],
        "views": list(model._views),
        "tta": model.tta,
        "averaging": model.averaging_,
        "train_views": model.train_views,
        "head": {
            "kind": kind,
            "params": make_head(kind, model.__dict__.get("head_params_")).params,
            **({"selected_by": "auto"} if model.head == "auto" else {}),
        },
        "folds": model.folds,
        "n_heads": len(model.heads_),
        "temperature": model.temperature_,
        "precision": model.precision_,
        "calibration": model.calibration_,
        "class_weight": model.class_weight,
        "seed": model.seed,
        "training": {
            "n_images": int(len(model.train_y_)),
            "per_class": dict(sorted(counts.items())),
            "n_problems": len(model.problems_),
        },
        "metrics": summary_row(model.metrics_) if model.metrics_ else None,
    }


def head_tensors(heads) -> dict[str, np.ndarray]:
    """Every fold head's state as float32 tensors named ``head{k}.{name}``."""
    out = {}
    for k, h in enumerate(heads):
        for name, arr in h.state().items():
            out[f"head{k}.{name}"] = np.asarray(arr, np.float32)
    return out


def load_stack(cls, path: str, runtime, weights: dict[str, str] | None):
    """A fitted ``cls`` (``StackedClassifier``) from the model directory ``path``."""
    manifest = read_manifest(path)
    if manifest.get("kind", "stack") != cls.kind:
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
    head = manifest["head"]
    model = cls(
        [b["name"] for b in bb],
        head=head["kind"],
        head_params=head["params"],
        folds=manifest["folds"],
        tta=manifest["tta"],
        train_views=manifest.get("train_views", 0),
        pool=bb[0]["pool"],
        class_weight=manifest.get("class_weight"),
        weights=weights,
        seed=manifest.get("seed", 0),
        runtime=runtime,
    )
    model.specs_ = saved_specs(bb, weights, path)
    model.heads_ = []
    for k in range(manifest["n_heads"]):
        prefix = f"head{k}."
        state = {n[len(prefix) :]: a for n, a in tensors.items() if n.startswith(prefix)}
        model.heads_.append(make_head(head["kind"], head["params"]).load_state(state))
    model.classes_ = list(manifest["classes"])
    model._precision = model._runtime().precision or manifest.get("precision", "fp32")
    model.calibration_ = manifest.get("calibration")
    model.manifest_, model.training_hashes_ = manifest, read_training_hashes(path)
    model.metrics_, model.eval_, model.histories_, model.problems_ = None, None, [], []
    model.temperature_ = float(manifest["temperature"])
    model.averaging_ = manifest.get("averaging", "proba")  # format 1 averaged probabilities
    return model
