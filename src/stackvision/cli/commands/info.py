"""``stackvision info``: describe a saved model.

Describe a saved model of any kind: classes and counts, backbones and their weights,
preprocessing, head, folds, views, temperature, headline metrics, training data, size on disk
and format version. Reads the manifest only.
"""

from __future__ import annotations

import json
import os

from .. import options as opt
from ..display import table


def add_arguments(i) -> None:
    opt.add_model(i)
    i.add_argument("--json", action="store_true", help="machine-readable output")


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _pp(p: dict | None) -> str:
    if not p:
        return ""
    return (
        f"{p['input_size']}px {p['crop_mode']} crop {p['crop_pct']}, {p['interpolation']}, "
        f"mean {p['mean']} std {p['std']}, {p['channel_order']}"
    )


def describe(path: str) -> dict:
    """The facts ``info`` shows, as one JSON-able dict."""
    from ...model_dir import read_manifest, read_training_hashes

    m = read_manifest(path)  # validated: a damaged directory is a one-line error
    training = m.get("training") or {}
    metrics = {
        k: v
        for k, v in (m.get("metrics") or {}).items()
        if k in ("validation", "n_images", "accuracy", "top5_accuracy", "log_loss")
    }
    out = {
        "path": os.path.abspath(path),
        "kind": m["kind"],
        "format_version": m["format_version"],
        "stackvision_version": m.get("stackvision_version"),
        "created": m.get("created"),
        "size_bytes": _size(path),
        "classes": m["classes"],
        "class_counts": training.get("per_class"),
        "training_data": {
            k: training.get(k) for k in ("source", "n_images", "n_problems") if k in training
        },
        "metrics": metrics,
    }
    seen = read_training_hashes(path)  # None: saved before the record existed
    out["training_images_recorded"] = None if seen is None else len(seen)
    kind = m["kind"]
    if kind == "stack":
        out["backbones"] = [
            {k: b.get(k) for k in ("name", "architecture", "weights_id", "feature_dim", "pool")}
            | {"pool": b.get("readout") or b.get("pool")}  # readout.py: its own wins
            | {"preprocess": _pp(b.get("preprocess"))}
            for b in m["backbones"]
        ]
        out |= {k: m.get(k) for k in ("head", "folds", "n_heads", "views", "tta", "temperature")}
        out |= {k: m.get(k) for k in ("train_views", "precision", "class_weight")}
        out["averaging"] = m.get("averaging", "proba")  # format version 1: mean probabilities
    elif kind == "finetune":
        b = m["backbone"]
        out["backbones"] = [
            {k: b.get(k) for k in ("name", "architecture", "weights_id", "feature_dim", "pool")}
            | {"preprocess": _pp(m.get("preprocess"))}
        ]
        out |= {k: m.get(k) for k in ("head", "tta", "temperature")}
        out["fine_tuning"] = {
            k: training.get(k)
            for k in ("epochs_run", "best_epoch", "head_epochs", "unfreeze", "lr", "augment")
            if k in training
        }
    elif kind == "ensemble":
        out["members"] = m["members"]
        out |= {k: m.get(k) for k in ("method", "methods_fitted", "member_weights", "folds")}
    return out


def _text(d: dict) -> str:
    lines = [
        f"{d['path']}",
        f"  kind            {d['kind']} (format version {d['format_version']}, "
        f"stackvision {d['stackvision_version']}, created {d['created']})",
        f"  size on disk    {d['size_bytes'] / 1e6:.1f} MB",
        f"  classes         {len(d['classes'])}",
    ]
    counts = d.get("class_counts") or {}
    shown = d["classes"][:20]
    lines += [f"    {c}" + (f"  ({counts[c]} images)" if c in counts else "") for c in shown]
    if len(d["classes"]) > len(shown):
        lines.append(f"    ... and {len(d['classes']) - len(shown)} more (--json lists all)")
    if d.get("backbones"):
        lines.append("  backbones")
        for b in d["backbones"]:
            lines.append(
                f"    {b['name']} ({b['architecture']}, {b['feature_dim']} dims, pool {b['pool']})"
                f"\n      weights {b['weights_id']}\n      input   {b['preprocess']}"
            )
    if d.get("members"):
        lines.append(f"  members         (method {d['method']})")
        w = d.get("member_weights") or [None] * len(d["members"])
        for mem, wt in zip(d["members"], w):
            lines.append(
                f"    {mem['name']} ({mem['kind']})"
                + (f"  weight {wt:.3f}" if wt is not None else "")
            )
    for key in ("head", "folds", "n_heads", "views", "tta", "averaging", "train_views",
                "precision", "class_weight"):  # fmt: skip
        if d.get(key) is not None and (key != "train_views" or d[key]):
            v = d[key]
            if isinstance(v, dict) and "params" in v:  # a stack head: logreg (C=0.02, ...)
                v = f"{v.get('kind')} ({', '.join(f'{k}={x}' for k, x in v['params'].items())})"
            elif isinstance(v, dict):
                v = ", ".join(f"{k}={x}" for k, x in v.items())
            elif isinstance(v, list):
                v = ", ".join(map(str, v))
            lines.append(f"  {key.replace('_', ' '):<15} {v}")
    if d.get("temperature") is not None:
        lines.append(f"  temperature     {d['temperature']:.4f}")
    if d.get("fine_tuning"):
        lines.append(
            "  fine-tuning     " + ", ".join(f"{k}={v}" for k, v in d["fine_tuning"].items())
        )
    if d.get("training_data"):
        lines.append(
            "  trained on      " + ", ".join(f"{k}={v}" for k, v in d["training_data"].items())
        )
    if d.get("training_images_recorded") is not None:
        lines.append(f"  training images {d['training_images_recorded']} recorded by content "
                     "(ensemble leaves them out of its fit; evaluate warns on them)")  # fmt: skip
    text = "\n".join(lines)
    if d.get("metrics"):
        mt = dict(d["metrics"])
        mt.setdefault("validation", "")
        text += "\n\n" + table(
            [mt], ["validation", "n_images", "accuracy", "top5_accuracy", "log_loss"]
        )
    return text


def run(args) -> int:
    d = describe(args.model)
    print(json.dumps(d, indent=2) if args.json else _text(d))
    return 0
