"""What loading checks in a model directory, for every kind, before any of it is used.

:func:`stackvision.model_dir.read_manifest` calls :func:`validate_manifest` and
:func:`stackvision.model_dir.read_tensors` calls :func:`validate_tensors`, so each kind's
``load`` gets these checks without repeating them:

* the manifest against the kind's table in :func:`manifest_tables` (required keys and their
  types, as data; unknown extra keys are accepted, for forward compatibility, except inside the
  objects a loader expands into a dataclass: ``preprocess`` and ``training.augment``);
* every path the manifest names (the weights file, ensemble members) resolves to a file or folder
  strictly inside the model directory: no absolute paths, no ``..``, no symlink leading out;
* ensemble members are model directories themselves: their manifests are checked recursively,
  and their classes must be the ensemble's;
* the weights: each kind's expected tensor names, shapes consistent with each other and with the
  manifest (class count, feature dimensions, number of fold heads or members), every value
  finite.

Anything wrong raises :class:`StackvisionError` with a one-line problem that names the file and
the key or tensor, so the CLI prints one line and exits 2 instead of a traceback or, worse, wrong
probabilities.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field

from .errors import StackvisionError
from .params import Interval, Options

# The directory's layout: names every reader and writer share.
FORMAT = "stackvision-model"
#: 2: a stack records ``averaging`` (the mean logit of its heads and views); a version-1 stack
#: is read as the mean probability, the rule it was calibrated for (``validation.AVERAGING``)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"

DAMAGED = "the model directory is damaged; train or copy it again"
OUTSIDE = "a model directory may refer only to files inside it; train or copy the model again"


# ---------------------------------------------------------------------- constraint language
# A constraint is a JSON type (str, int, float, bool, dict, list), None (JSON null), an
# Interval or Options from :mod:`stackvision.params`, one of the classes below, or a tuple of
# alternatives (any one may match).


@dataclass(frozen=True)
class Text:
    """A non-empty string."""


@dataclass(frozen=True)
class ListOf:
    item: object
    words: str  # how the message describes an acceptable list
    min_len: int = 0
    distinct: bool = False
    max_len: int | None = None


@dataclass(frozen=True)
class Obj:
    """A JSON object with ``required`` and ``optional`` keys (each mapped to a constraint).

    Other keys are accepted unless ``closed`` (for objects a loader passes as keyword arguments).
    """

    required: dict = field(default_factory=dict)
    optional: dict = field(default_factory=dict)
    closed: bool = False


class Invalid(Exception):
    """A value outside its constraint; ``where`` is its key path (``backbones[0].pool``)."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message
        super().__init__(f'"{where}" {message}')


_TYPE_WORDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


def describe(c) -> str:
    """JSON words for a constraint: ``a number > 0``, ``null or an object``."""
    if isinstance(c, tuple):
        return " or ".join(describe(x) for x in c)
    if c is None:
        return "null"
    if isinstance(c, Text):
        return "a non-empty string"
    if isinstance(c, ListOf):
        return c.words
    if isinstance(c, Obj):
        return "an object"
    if isinstance(c, type):
        return _TYPE_WORDS.get(c, f"a {c.__name__}")
    return str(c)


def _show(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def _at(where: str, key) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else key)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer too large for a float
        return False


def _leaf_ok(c, v) -> bool:
    if isinstance(v, bool) and c is not bool:
        return False  # JSON true/false is never a number here
    if c is None:
        return v is None
    if isinstance(c, Text):
        return isinstance(v, str) and v.strip() != ""
    if isinstance(c, Interval | Options):
        return c.accepts(v)
    if c is float:
        return isinstance(v, numbers.Real) and _finite(v)
    if isinstance(c, type):
        return isinstance(v, c)
    raise TypeError(f"unknown constraint {c!r}")


def check(c, v, where: str = "") -> None:
    """Raise :class:`Invalid` for the first part of ``v`` outside constraint ``c``."""
    if isinstance(c, tuple):
        for alt in c:
            try:
                check(alt, v, where)
                return
            except Invalid as exc:
                # A dict or list that fails inside its Obj / ListOf: report the inner problem.
                if (isinstance(alt, Obj) and isinstance(v, dict)) or (
                    isinstance(alt, ListOf) and isinstance(v, list)
                ):
                    raise exc from None
        raise Invalid(where, f"must be {describe(c)}, got {_show(v)}")
    if isinstance(c, Obj):
        if not isinstance(v, dict):
            raise Invalid(where, f"must be an object, got {_show(v)}")
        for k, sub in c.required.items():
            if k not in v:
                raise Invalid(_at(where, k), "is missing")
            check(sub, v[k], _at(where, k))
        for k, sub in c.optional.items():
            if k in v:
                check(sub, v[k], _at(where, k))
        if c.closed:
            for k in v:
                if k not in c.required and k not in c.optional:
                    raise Invalid(
                        _at(where, k), "is not a field this stackvision knows (a newer model?)"
                    )
        return
    if isinstance(c, ListOf):
        if (
            not isinstance(v, list)
            or len(v) < c.min_len
            or (c.max_len is not None and len(v) > c.max_len)
        ):
            raise Invalid(where, f"must be {c.words}, got {_show(v)}")
        for i, x in enumerate(v):
            check(c.item, x, _at(where, i))
        if c.distinct:
            seen = set()
            for x in v:
                key = json.dumps(x, sort_keys=True)
                if key in seen:
                    raise Invalid(where, f"must be {c.words}, but lists {_show(x)} twice")
                seen.add(key)
        return
    if not _leaf_ok(c, v):
        raise Invalid(where, f"must be {describe(c)}, got {_show(v)}")


# ---------------------------------------------------------------------- the tables, per kind
POSITIVE = Interval(numbers.Real, 0, None, "neither")
POSITIVE_INT = Interval(numbers.Integral, 1, None)
CLASSES = ListOf(Text(), "a non-empty list of distinct non-empty strings", 1, True)


@functools.cache
def manifest_tables() -> dict[str, Obj]:
    """kind -> the manifest's schema. Built on first use from the modules that own the values
    (imported here, not at module level: the CLI reads manifests without importing them)."""
    from dataclasses import fields

    from .augment import Augment
    from .engines import PRECISIONS
    from .ensemble_methods import METHODS
    from .heads import HEADS
    from .readout import PoolOption
    from .validation import TTA_MODES

    rgb = ListOf(float, "a list of 3 numbers", 3, max_len=3)
    preprocess = Obj(  # Preprocess.from_dict(d) is Preprocess(**d)
        required={"mean": rgb, "std": ListOf(POSITIVE, "a list of 3 numbers > 0", 3, max_len=3)},
        optional={
            "input_size": POSITIVE_INT,
            "crop_pct": POSITIVE,
            "crop_mode": Options(("center", "squash")),
            "interpolation": Text(),
            "channel_order": Options(("RGB", "BGR")),
        },
        closed=True,
    )
    augment = Obj(optional={f.name: float for f in fields(Augment)}, closed=True)
    backbone = {
        "name": Text(),
        "architecture": Text(),
        "pool": PoolOption(),
        "feature_dim": POSITIVE_INT,
    }
    source = Options(("embedded", "timm", "file"))
    tta = Options(TTA_MODES)
    common = {
        "seed": (None, int),
        "metrics": (None, dict),
        "stackvision_version": str,
        "created": str,
    }
    return {
        "stack": Obj(
            required={
                "classes": CLASSES,
                "backbones": ListOf(
                    Obj(
                        required={**backbone, "weights_id": Text()},
                        optional={
                            "source": source,
                            "preprocess": preprocess,
                            # a user's checkpoint given with --weights: outside the model by
                            # design, identified by its sha256 in weights_id
                            "weights_path": (None, Text()),
                        },
                    ),
                    "a non-empty list of backbone objects",
                    1,
                ),
                "head": Obj(required={"kind": Options(HEADS), "params": dict}),
                "folds": (Options((0,)), Interval(numbers.Integral, 2, None)),
                "tta": tta,
                "n_heads": POSITIVE_INT,
                "temperature": POSITIVE,
            },
            optional={
                **common,
                "views": ListOf(Text(), "a list of view names"),
                "train_views": Interval(numbers.Integral, 0, 16),  # train_views.MAX_VIEWS
                "averaging": Options(("logits", "proba")),  # validation.AVERAGING
                "precision": Options(PRECISIONS),
                "calibration": (None, dict),
                "class_weight": (None, Options(("none", "balanced"))),
                "training": dict,
            },
        ),
        "finetune": Obj(
            required={
                "classes": CLASSES,
                "backbone": Obj(
                    required={**backbone, "source": source, "preprocess": preprocess},
                    optional={"weights_id": Text()},
                ),
                "preprocess": preprocess,
                "head": Obj(
                    required={"dropout": Interval(numbers.Real, 0, 1, "left")},
                    optional={"output": Options(("softmax", "sigmoid"))},
                ),
                "tta": tta,
            },
            optional={
                **common,
                "temperature": POSITIVE,
                "input": dict,
                "training": Obj(optional={"augment": (None, augment)}),
            },
        ),
        "ensemble": Obj(
            required={
                "classes": CLASSES,
                "method": Options(METHODS),
                "members": ListOf(
                    Obj(required={"name": Text(), "dir": Text()}, optional={"kind": Text()}),
                    "a list of at least 2 member objects",
                    2,
                ),
            },
            optional={
                **common,
                "folds": Interval(numbers.Integral, 2, None),
                "methods_fitted": ListOf(Options(METHODS), "a list of method names"),
                "member_weights": (None, ListOf(float, "a list of numbers")),
                "stacked": (None, Obj(optional={"C": POSITIVE})),
            },
        ),
    }


# ---------------------------------------------------------------------- paths
def inside(root: str, rel, what: str, mpath: str) -> str:
    """``root/rel`` after checking that it stays strictly inside ``root`` (symlinks resolved).

    ``what`` names the manifest key in the message; ``mpath`` is the manifest's path.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise StackvisionError(f'{mpath}: "{what}" must be a non-empty string', DAMAGED)
    norm = rel.replace("\\", "/")
    if os.path.isabs(rel) or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise StackvisionError(
            f'{mpath}: "{what}" is an absolute path ({_show(rel)}), not a path inside the model directory',
            OUTSIDE,
        )
    if ".." in norm.split("/"):
        raise StackvisionError(
            f'{mpath}: "{what}" leads out of the model directory ({_show(rel)})', OUTSIDE
        )
    full = os.path.join(root, rel)
    real_root, real = os.path.realpath(root), os.path.realpath(full)
    if real == real_root:
        raise StackvisionError(
            f'{mpath}: "{what}" ({_show(rel)}) is the model directory itself, not a path inside it',
            OUTSIDE,
        )
    if os.path.commonpath([real_root, real]) != real_root:
        raise StackvisionError(
            f'{mpath}: "{what}" ({_show(rel)}) resolves to {real}, outside the model directory '
            "(a symbolic link?)",
            OUTSIDE,
        )
    return full


# ---------------------------------------------------------------------- manifest
def validate_manifest(path: str, manifest: dict, mpath: str, read_member) -> None:
    """Check a manifest whose format and version are already known to be readable;
    ``read_member(dir)`` reads (and so checks) an ensemble member's manifest."""

    kind = manifest.get("kind", "stack")
    if not isinstance(kind, str):
        raise StackvisionError(f'{mpath}: "kind" must be a string, got {_show(kind)}', DAMAGED)
    inside(path, manifest.get("weights", WEIGHTS), "weights", mpath)
    table = manifest_tables().get(kind)
    if table is None:
        return  # an unknown kind: models.model_class says so, with what to do
    try:
        check(table, manifest)
    except Invalid as exc:
        raise StackvisionError(f"{mpath}: {exc}", DAMAGED) from None
    _CROSS[kind](path, manifest, mpath, read_member)


def _stack_cross(path: str, m: dict, mpath: str, read_member) -> None:
    names = [b["name"] for b in m["backbones"]]
    if len(set(names)) != len(names):
        raise StackvisionError(f'{mpath}: "backbones" lists a backbone twice', DAMAGED)
    cal = m.get("calibration")
    if cal is not None and not all(isinstance(cal.get(n), str) for n in names):
        raise StackvisionError(
            f'{mpath}: "calibration" must name a calibration set (a string) for every backbone',
            DAMAGED,
        )


def _finetune_cross(path: str, m: dict, mpath: str, read_member) -> None:
    output = m["head"].get("output")
    want = "sigmoid" if len(m["classes"]) == 2 else "softmax"
    if output is not None and output != want:
        raise StackvisionError(
            f'{mpath}: "head.output" is {output} but {len(m["classes"])} classes need {want}',
            DAMAGED,
        )


def _ensemble_cross(path: str, m: dict, mpath: str, read_member) -> None:
    for i, e in enumerate(m["members"]):
        d = inside(path, e["dir"], f"members[{i}].dir", mpath)
        if not os.path.isdir(d):
            raise StackvisionError(f"ensemble member missing: {d}", DAMAGED)
        sub = read_member(d)  # recursive: members are model directories
        if "kind" in e and sub.get("kind", "stack") != e["kind"]:
            raise StackvisionError(
                f"{mpath}: member {e['name']} is listed as '{e['kind']}' but {d} holds a "
                f"'{sub.get('kind', 'stack')}' model",
                DAMAGED,
            )
        if sorted(sub["classes"]) != sorted(m["classes"]):
            raise StackvisionError(
                f"{mpath}: member {e['name']} ({d}) has other classes than the ensemble",
                DAMAGED,
            )


_CROSS = {"stack": _stack_cross, "finetune": _finetune_cross, "ensemble": _ensemble_cross}
