"""ONNX export: one self-contained graph from a uint8 RGB image batch to class probabilities.

The input contract (also written into the ONNX metadata as ``stackvision.input``):

* ``image``: uint8, shape (N, S, S, 3), RGB, NHWC. S is the model's input size: the largest input
  size among its backbones, or an ensemble's members (``model.input_preprocess().input_size``).
* The image is made by :func:`prepare_image`: decode to RGB (EXIF orientation applied), resize the
  short side to ``floor(S / crop_pct)`` with the named PIL interpolation, centre-crop S x S.
* Inside the graph every backbone (ensemble member) whose own input size s is smaller than S gets an s x s copy made
  by a fixed antialiased separable resize (PIL-style bicubic weights, each output pixel a float64
  sum of its few taps, rounded back to 0..255, :func:`resize_uint8`), then its own mean/std normalisation. Flip TTA, every fold
  head, fold averaging and temperature scaling follow; the output ``probabilities`` (N, C) is in the
  order of the class names in the metadata (``stackvision.classes``).

Every model kind implements the contract of :class:`stackvision.base.ModelBase`, which includes
``input_preprocess()`` (the :class:`Preprocess` of its input) and ``to_torch_module()`` (an
``nn.Module`` mapping the uint8 batch to probabilities); :func:`export_onnx` only calls those
(and ``describe()`` for the metadata), so feature stacks, fine-tuned models and ensembles all go
through the same code. ``forward_uint8(batch)`` on the model gives the library's own
answer for the same input, which is what the exported graph is checked against.
"""

from __future__ import annotations

import functools
import io
import json
import math
import numbers
import os
import warnings

import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import StackvisionError
from .params import Interval, validate_params
from .preprocess import Preprocess

FORMATS = ("onnx",)
DEFAULT_OPSET = 17
# Lowest opset our graphs are tested with (opset 13: today's Softmax/ReduceSum semantics) up to
# the highest that torch's TorchScript exporter writes.
MIN_OPSET, MAX_OPSET = 13, 20
OPSET_CONSTRAINT = [Interval(numbers.Integral, MIN_OPSET, MAX_OPSET)]


# ---------------------------------------------------------------------- the input contract
def _preprocess_of(model_or_pp) -> Preprocess:
    if isinstance(model_or_pp, Preprocess):
        return model_or_pp
    return _check_model(model_or_pp).input_preprocess()


def _check_model(model):
    from .base import ModelBase

    if not isinstance(model, ModelBase):
        raise StackvisionError(
            f"a {type(model).__name__} cannot be exported or prepared for: it is not a "
            "stackvision model",
            "pass a model from stackvision.load_model() (any kind), or a Preprocess",
        )
    return model


def prepare_image(image, model_or_pp) -> np.ndarray:
    """The uint8 (S, S, 3) RGB array a model's ONNX graph (and the server) expects.

    ``image``: a file path, encoded bytes, or a PIL image. ``model_or_pp``: a model (its
    ``input_preprocess()``) or a :class:`Preprocess`. Raises :class:`ImageDecodeError` for an
    unreadable image.
    """
    from .decoding import decode_crop

    return decode_crop(image, _preprocess_of(model_or_pp), channel_order="RGB")


def prepare_images(images, model_or_pp) -> np.ndarray:
    """:func:`prepare_image` for several images, stacked into (N, S, S, 3) uint8."""
    pp = _preprocess_of(model_or_pp)
    arrs = [prepare_image(im, pp) for im in images]
    if not arrs:
        return np.zeros((0, pp.input_size, pp.input_size, 3), np.uint8)
    return np.stack(arrs)


def check_uint8_batch(batch, size: int) -> np.ndarray:
    batch = np.asarray(batch)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise StackvisionError(
            f"expected a uint8 batch of shape (N, {size}, {size}, 3), "
            f"got {batch.dtype} {tuple(batch.shape)}",
            "make it with stackvision.export.prepare_images(images, model)",
        )
    return batch


def _filter(kind: str):
    if kind == "bilinear":
        return 1.0, lambda x: np.maximum(0.0, 1.0 - np.abs(x))
    if kind == "nearest":  # treated as box
        return 0.5, lambda x: ((x >= -0.5) & (x < 0.5)).astype(np.float64)

    def cubic(x, a=-0.5):  # PIL's bicubic kernel
        x = np.abs(x)
        return np.where(
            x < 1,
            ((a + 2) * x - (a + 3)) * x * x + 1,
            np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
        )

    return 2.0, cubic


@functools.lru_cache(maxsize=32)
def resize_matrix(src: int, dst: int, interpolation: str = "bicubic") -> np.ndarray:
    """(dst, src) float64 matrix of an antialiased 1-D resize (PIL's coefficient scheme)."""
    support, fn = _filter(interpolation)
    scale = src / dst
    fscale = max(scale, 1.0)
    support *= fscale
    m = np.zeros((dst, src), np.float64)
    for i in range(dst):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), src)
        j = np.arange(lo, hi)
        w = fn((j - center + 0.5) / fscale)
        total = w.sum()
        m[i, lo:hi] = w / total if total else 0.0
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=32)
def resize_taps(
    src: int, dst: int, interpolation: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of :func:`resize_matrix` as taps: ``idx`` (dst, K) source indices and ``w``
    (dst, K) float64 weights, K = the widest row (a bicubic 260 -> 224 has 5 taps, not 260).
    Padding taps repeat the row's last index with weight 0, which adds an exact 0.0."""
    m = resize_matrix(src, dst, interpolation)
    nz = [np.flatnonzero(row) if row.any() else np.zeros(1, np.int64) for row in m]
    k = max(len(j) for j in nz)
    idx = np.stack([np.pad(j, (0, k - len(j)), mode="edge") for j in nz]).astype(np.int64)
    w = np.take_along_axis(m, idx, axis=1).copy()
    for i, j in enumerate(nz):
        w[i, len(j) :] = 0.0
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def _taps_1d(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One separable pass over axis 1 (rows) or 2 (columns) of an NHWC array -> float64.

    Weights are laid out so numpy's innermost loop runs over a whole row (W x 3 values), not
    over the 3 channels: the same products and sums, ~10x faster."""
    n, h, wd, c = x.shape
    acc = None
    for k in range(idx.shape[1]):  # tap by tap, in the same order as the torch module
        g = np.take(x, idx[:, k], axis=axis).astype(np.float64)
        if axis == 1:  # (N, dst, W*C) x (dst, 1)
            term = g.reshape(n, len(idx), wd * c) * w[:, k, None]
        else:  # (N, H, dst*C) x (dst*C,)
            term = g.reshape(n, h, len(idx) * c) * np.repeat(w[:, k], c)
        acc = term if acc is None else acc + term
    return acc.reshape(n, *((len(idx), wd) if axis == 1 else (h, len(idx))), c)


def resize_uint8(batch: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize a uint8 NHWC batch of S x S images to ``size`` x ``size`` exactly as the exported
    graph does: separable, rows then columns, each output a float64 sum of its few taps of
    :func:`resize_matrix` in a fixed order (so both agree to the last bit; rounded half to even,
    clipped to 0..255). The dense matrix product it replaces took 3.4 ms an image (260 -> 224,
    one BLAS thread; with BLAS's own threads they then spun beside the engines); this, 1.9 ms."""
    s = batch.shape[1]
    if s == size:
        return batch
    idx, w = resize_taps(s, size, interpolation)
    y = _taps_1d(_taps_1d(batch, 1, idx, w), 2, idx, w)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def _torch_taps_resize(x, idx, w):
    """:func:`resize_uint8`'s arithmetic on a float64 NCHW torch tensor (rows, then columns)."""
    import torch

    for dim in (2, 3):
        shape = [1, 1, 1, 1]
        shape[dim] = idx.shape[0]
        acc = None
        for k in range(idx.shape[1]):
            term = torch.index_select(x, dim, idx[:, k]) * w[:, k].reshape(shape)
            acc = term if acc is None else acc + term
        x = acc
    return x


def input_contract(model) -> dict:
    pp = _preprocess_of(model)
    return {
        "name": "image",
        "dtype": "uint8",
        "layout": "NHWC",
        "shape": ["N", pp.input_size, pp.input_size, 3],
        "channel_order": "RGB",
        "size": pp.input_size,
        "resize_short_side": pp.resize_size,
        "crop": "center" if pp.crop_mode == "center" else "squash",
        "interpolation": pp.interpolation,
        "recipe": (
            f"decode to RGB (EXIF orientation applied); resize the short side to {pp.resize_size} "
            f"px ({pp.interpolation}); centre-crop {pp.input_size}x{pp.input_size}; "
            "stackvision.export.prepare_image does exactly this"
            if pp.crop_mode == "center"
            else f"decode to RGB; resize to {pp.resize_size}x{pp.resize_size}; centre-crop "
            f"{pp.input_size}x{pp.input_size}"
        ),
        "output": "probabilities: float32 (N, n_classes), classes in stackvision.classes order",
    }


# ---------------------------------------------------------------------- the torch module
def _torch_module_class():
    import torch
    from torch import nn

    class StackModule(nn.Module):
        """uint8 RGB (N, S, S, 3) -> calibrated probabilities (N, C) of a feature stack."""

        def __init__(
            self, backbones, head_states, n_views, temperature, input_size, averaging="logits"
        ):
            from .preprocess import Normalize

            super().__init__()
            self.input_size = int(input_size)
            self.n_views = int(n_views)
            self.temperature = float(temperature)
            self.logits = averaging == "logits"  # else mean probabilities (validation.AVERAGING)
            self.backbones = nn.ModuleList([m for _, m in backbones])
            # RGB input: a BGR backbone gets its pixels reversed and its own statistics
            self.normalize = nn.ModuleList([Normalize(s.preprocess, "RGB") for s, _ in backbones])
            self._resize = []
            for k, (spec, _) in enumerate(backbones):
                pp = spec.preprocess
                resize = pp.input_size != self.input_size
                if resize:
                    idx, w = resize_taps(self.input_size, pp.input_size, pp.interpolation)
                    self.register_buffer(f"resize{k}_idx", torch.from_numpy(idx.copy()))
                    self.register_buffer(f"resize{k}_w", torch.from_numpy(w.copy()))
                self._resize.append(resize)
            self._heads = []
            for h, st in enumerate(head_states):
                if "weight" in st:
                    layers = [(st["weight"], st["bias"])]
                else:
                    n = sum(1 for name in st if name.endswith(".weight"))
                    layers = [(st[f"layer{i}.weight"], st[f"layer{i}.bias"]) for i in range(n)]
                self.register_buffer(f"h{h}_mean", torch.from_numpy(np.asarray(st["mean"])))
                self.register_buffer(f"h{h}_scale", torch.from_numpy(np.asarray(st["scale"])))
                for i, (w, b) in enumerate(layers):
                    self.register_buffer(f"h{h}_w{i}", torch.from_numpy(np.asarray(w, np.float32)))
                    self.register_buffer(f"h{h}_b{i}", torch.from_numpy(np.asarray(b, np.float32)))
                self._heads.append(len(layers))
            self.eval()

        def forward(self, image):
            n = image.shape[0]
            x = image.permute(0, 3, 1, 2).to(torch.float32)
            if self.n_views == 2:
                x = torch.cat([x, x.flip(3)], 0)
            feats = []
            for k, model in enumerate(self.backbones):
                xi = x
                if self._resize[k]:
                    idx, w = self.get_buffer(f"resize{k}_idx"), self.get_buffer(f"resize{k}_w")
                    xi = _torch_taps_resize(xi.to(torch.float64), idx, w)
                    xi = torch.clamp(torch.round(xi), 0, 255).to(torch.float32)
                feats.append(model(self.normalize[k].standardize(xi)))
            f = torch.cat(feats, 1)
            mean = None  # of the heads' logits, or of their probabilities (format version 1)
            for h, n_layers in enumerate(self._heads):
                z = (f - self.get_buffer(f"h{h}_mean")) / self.get_buffer(f"h{h}_scale")
                for i in range(n_layers):
                    w, b = self.get_buffer(f"h{h}_w{i}"), self.get_buffer(f"h{h}_b{i}")
                    z = torch.matmul(z, w.t()) + b
                    if i < n_layers - 1:
                        z = torch.relu(z)
                p = z if self.logits else torch.softmax(z, dim=1)
                mean = p if mean is None else mean + p
            mean = mean / len(self._heads)
            if self.n_views == 2:  # slices, not a reshape: ONNX Reshape reads a 0 dim as "copy"
                mean = (mean[:n] + mean[n:]) / 2  # so an empty batch came out (C, 0)
            probs = torch.softmax(mean, dim=1) if self.logits else mean
            if self.temperature != 1.0:
                logp = torch.log(torch.clamp(probs, 1e-12, 1.0))
                probs = torch.softmax(logp / self.temperature, dim=1)
            return probs

    return StackModule


def ResizeUint8(src: int, dst: int, interpolation: str = "bicubic"):  # noqa: N802 - a factory
    """A ``torch.nn.Module``: uint8 NHWC (N, src, src, 3) -> uint8 NHWC (N, dst, dst, 3) by the
    same float64 taps as :func:`resize_uint8` (identity when ``src == dst``)."""
    import torch
    from torch import nn

    class ResizeModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.resize = src != dst
            if self.resize:
                idx, w = resize_taps(src, dst, interpolation)
                self.register_buffer("idx", torch.from_numpy(idx.copy()))
                self.register_buffer("w", torch.from_numpy(w.copy()))

        def forward(self, x):
            if not self.resize:
                return x
            y = _torch_taps_resize(x.permute(0, 3, 1, 2).to(torch.float64), self.idx, self.w)
            y = torch.clamp(torch.round(y), 0, 255).to(torch.uint8)
            return y.permute(0, 2, 3, 1)

    return ResizeModule().eval()


def StackModule(*args, **kwargs):  # noqa: N802 - a factory that reads like the class it builds
    """Build the torch module of a feature stack (torch is imported only when needed)."""
    return _torch_module_class()(*args, **kwargs)


# ---------------------------------------------------------------------- ONNX
def _metadata(model) -> dict[str, str]:
    desc = model.describe()
    return {
        "stackvision.classes": json.dumps(list(model.classes_)),
        "stackvision.input": json.dumps(input_contract(model)),
        "stackvision.model": json.dumps(
            {k: desc.get(k) for k in ("kind", "head", "folds", "tta", "temperature", "metrics")}
            | {"backbones": [b.get("name") for b in desc.get("backbones", [])]},
            default=str,
        ),
        "stackvision.version": __version__,
    }


def export_onnx(
    model, out: str, *, opset: int = DEFAULT_OPSET, check: bool = True, seed: int = 0
) -> dict:
    """Write ``model`` as one ONNX file at ``out``; with ``check``, run it in ONNX Runtime on a
    random batch and report the largest difference from the torch module."""
    import torch

    validate_params({"opset": OPSET_CONSTRAINT}, {"opset": opset}, owner="export")
    _check_model(model)
    try:
        import onnx
    except ImportError:
        raise StackvisionError(
            "ONNX export needs the onnx package", "pip install 'stackvision[fast]'"
        ) from None
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise StackvisionError(f"--out is a folder: {out}", "give a file name, e.g. model.onnx")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    module = model.to_torch_module().eval()
    size = model.input_preprocess().input_size
    x = np.random.default_rng(seed).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    xt = torch.from_numpy(x)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (xt,),
            buf,
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "stackvision"
    proto.producer_version = __version__
    proto.doc_string = (
        "stackvision model: uint8 RGB NHWC image batch -> class probabilities. "
        "See metadata stackvision.input and stackvision.classes."
    )
    for k, v in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    info = {
        "path": out,
        "opset": opset,
        "input": input_contract(model),
        "n_classes": len(model.classes_),
    }
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x})[0]
        with torch.no_grad():
            want = module(xt).numpy()
        info["max_abs_diff"] = float(np.abs(got - want).max())
        if not math.isfinite(info["max_abs_diff"]) or info["max_abs_diff"] > 1e-4:
            raise StackvisionError(
                f"the exported graph differs from the model by {info['max_abs_diff']:.2e}",
                "nothing was written; report this as a bug (--no-check writes it anyway)",
            )
    with atomic_path(out, ".onnx") as tmp:  # complete or absent, with the umask's mode
        onnx.save(proto, tmp)
    info["bytes"] = os.path.getsize(out)
    return info


def export_model(model, out: str, fmt: str = "onnx", **kwargs) -> dict:
    if fmt not in FORMATS:
        raise StackvisionError(
            f"unknown export format '{fmt}'", f"use one of: {', '.join(FORMATS)}"
        )
    return export_onnx(model, out, **kwargs)
