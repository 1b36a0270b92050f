"""What loading checks in a model's weights: each kind's tensor names, shapes consistent with each
other and with the manifest (class count, feature dimensions, number of fold heads or members),
every value finite. :func:`stackvision.model_dir.read_tensors` calls :func:`validate_tensors`.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .errors import StackvisionError
from .model_schema import DAMAGED, MANIFEST, _show


# ---------------------------------------------------------------------- tensors
def validate_tensors(path: str, manifest: dict, tensors: dict, wpath: str) -> None:
    """Check the arrays of ``weights.safetensors`` against the manifest (already validated)."""
    for name, a in tensors.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise StackvisionError(
                f"{wpath}: tensor '{name}' has non-finite values (NaN or infinity)", DAMAGED
            )
    kind = manifest.get("kind", "stack")
    if kind in _TENSORS:
        _TENSORS[kind](manifest, tensors, _Shapes(tensors, wpath, os.path.join(path, MANIFEST)))


class _Shapes:
    def __init__(self, tensors: dict, wpath: str, mpath: str):
        self.t, self.wpath, self.mpath = tensors, wpath, mpath

    def need(self, name: str, shape: tuple, why: str) -> np.ndarray:
        """The tensor ``name``, after checking it exists and has ``shape`` (None: any size)."""
        a = self.t.get(name)
        if a is None:
            raise StackvisionError(f"{self.wpath}: tensor '{name}' is missing", DAMAGED)
        if a.ndim != len(shape) or any(w is not None and s != w for s, w in zip(a.shape, shape)):
            want = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
            raise StackvisionError(
                f"{self.wpath}: tensor '{name}' has shape {tuple(a.shape)} but {why} need {want}",
                DAMAGED,
            )
        return a

    def positive(self, name: str) -> None:
        if not (self.t[name] > 0).all():
            raise StackvisionError(
                f"{self.wpath}: tensor '{name}' (a standard deviation) must be > 0", DAMAGED
            )

    def fail(self, problem: str):
        raise StackvisionError(f"{self.wpath}: {problem}", DAMAGED)


def _stack_tensors(m: dict, t: dict, s: _Shapes) -> None:
    C, n_heads = len(m["classes"]), m["n_heads"]
    D = sum(b["feature_dim"] for b in m["backbones"])
    feats = f"the manifest's backbones ({D} features)"
    both = f"the manifest's {C} classes and {D} features"
    both_c = f"the manifest's {C} classes and "
    for name in t:
        h = re.match(r"head(\d+)\.", name)
        if h and int(h.group(1)) >= n_heads:
            s.fail(f"tensor '{name}' belongs to no head (the manifest has n_heads {n_heads})")
    for k in range(n_heads):
        p = f"head{k}."
        s.need(p + "mean", (D,), feats)
        s.need(p + "scale", (D,), feats)
        s.positive(p + "scale")
        if m["head"]["kind"] == "logreg":
            s.need(p + "weight", (C, D), both)
            s.need(p + "bias", (C,), f"the manifest's {C} classes")
            continue
        layers = sorted(
            int(x.group(1))
            for n in t
            if (x := re.fullmatch(re.escape(p) + r"layer(\d+)\.weight", n))
        )
        n_weights = sum(1 for n in t if n.startswith(p) and n.endswith(".weight"))
        if not layers or layers != list(range(len(layers))) or n_weights != len(layers):
            s.fail(f"the mlp head {k} needs tensors {p}layer0.weight, {p}layer1.weight, ...")
        d_in = D
        for i in layers:
            last = i == layers[-1]
            rows = C if last else None
            why = f"{both_c if last else ''}the layer's {d_in} inputs"
            W = s.need(f"{p}layer{i}.weight", (rows, d_in), why)
            s.need(f"{p}layer{i}.bias", (W.shape[0],), f"its {W.shape[0]} outputs")
            d_in = W.shape[0]


def _finetune_tensors(m: dict, t: dict, s: _Shapes) -> None:
    C, F = len(m["classes"]), m["backbone"]["feature_dim"]
    out = 1 if C == 2 else C
    why = f"the manifest's {C} classes" + (" (one sigmoid output)" if C == 2 else "")
    s.need("fc.weight", (out, F), f"{why} and the backbone's {F} features")
    s.need("fc.bias", (out,), why)
    # The backbone's own tensors are matched by name and shape by load_state_dict(strict=True),
    # on a network timm builds from the architecture, which must therefore be one timm knows.
    import timm

    arch = m["backbone"]["architecture"]
    if not timm.is_model(arch):
        raise StackvisionError(
            f'{s.mpath}: "backbone.architecture" {_show(arch)} is not a model this timm knows',
            "upgrade timm if the model was trained with a newer one; else train it again",
        )


def _ensemble_tensors(m: dict, t: dict, s: _Shapes) -> None:
    K, C = len(m["members"]), len(m["classes"])
    if m["method"] == "weighted" and "weighted.w" not in t:
        s.fail("tensor 'weighted.w' is missing (the manifest's method is 'weighted')")
    if m["method"] == "stacked" and not any(n.startswith("stacked.") for n in t):
        s.fail("tensors 'stacked.*' are missing (the manifest's method is 'stacked')")
    if "weighted.w" in t:
        w = s.need("weighted.w", (K,), f"the manifest's {K} members")
        if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-3:
            s.fail("tensor 'weighted.w' must hold member weights >= 0 that sum to 1")
    if m["method"] == "calibrated" and not {"calibrated.w", "calibrated.t"} <= set(t):
        s.fail("tensors 'calibrated.w' and 'calibrated.t' are missing (method 'calibrated')")
    if "calibrated.w" in t:
        s.need("calibrated.w", (K,), f"the manifest's {K} members")
        if not (s.need("calibrated.t", (K,), f"the manifest's {K} members") > 0).all():
            s.fail("tensor 'calibrated.t' must hold member temperatures > 0")
    if any(n.startswith("stacked.") for n in t):
        KC = K * C
        inputs = f"the manifest's {K} members x {C} classes"
        s.need("stacked.mean", (KC,), inputs)
        s.need("stacked.scale", (KC,), inputs)
        s.positive("stacked.scale")
        s.need("stacked.weight", (C, KC), f"{C} classes and {inputs}")
        s.need("stacked.bias", (C,), f"the manifest's {C} classes")


_TENSORS = {"stack": _stack_tensors, "finetune": _finetune_tensors, "ensemble": _ensemble_tensors}
