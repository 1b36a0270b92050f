"""A backbone's input preprocessing, as data.

The same :class:`Preprocess` drives the decode workers (resize + crop to uint8), the engines
(mean/std normalisation: :func:`normalize` and its torch twin :class:`Normalize`), ONNX export and
serving, so every path sees identical pixels.
Semantics follow timm's eval transform: resize the short side to ``floor(size / crop_pct)``, then
centre-crop ``size`` x ``size``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Preprocess:
    """Input size, resize/crop policy, interpolation and normalisation of one backbone."""

    input_size: int = 224
    crop_pct: float = 0.875
    crop_mode: str = (
        "center"  # "center" (resize short side, centre crop) or "squash" (resize both sides)
    )
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @classmethod
    def from_timm_cfg(cls, cfg: dict) -> Preprocess:
        size = cfg.get("input_size", (3, 224, 224))
        mode = cfg.get("crop_mode", "center")
        return cls(
            input_size=int(size[-1]),
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            crop_mode="squash" if mode == "squash" else "center",
            interpolation=cfg.get("interpolation") or "bicubic",
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        )

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """Resize and crop an RGB image to ``input_size`` x ``input_size``; returns HWC uint8."""
        s, r = self.input_size, self.resize_size
        resample = self.resample
        w, h = img.size
        if self.crop_mode == "squash":
            img = img.resize((r, r), resample)
            w = h = r
        else:
            # Same arithmetic as torchvision's Resize(int): the short side becomes r.
            if w <= h:
                nw, nh = r, int(r * h / w)
            else:
                nw, nh = int(r * w / h), r
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), resample)
            w, h = nw, nh
        left = int(round((w - s) / 2.0))
        top = int(round((h - s) / 2.0))
        return self.array(img.crop((left, top, left + s, top + s)))

    @property
    def resample(self) -> Image.Resampling:
        """PIL's filter for ``interpolation`` (bicubic for a name PIL lacks)."""
        return _INTERPOLATION.get(self.interpolation, Image.Resampling.BICUBIC)

    def array(self, img: Image.Image) -> np.ndarray:
        """An RGB image already at the input size as contiguous HWC uint8 in this backbone's
        channel order."""
        arr = np.asarray(img, dtype=np.uint8)
        if self.channel_order == "BGR":
            arr = arr[..., ::-1]
        return np.ascontiguousarray(arr)

    def normalize(self, batch: np.ndarray, input_order: str | None = None) -> np.ndarray:
        """uint8 NHWC -> normalised float32 NCHW (see :func:`normalize`)."""
        return normalize(batch, self, input_order)


# ---------------------------------------------------------------------- normalisation
# The one definition of "uint8 pixels -> network input", in numpy and in torch (engines, ONNX
# exports, fine-tuning). ``mean``/``std`` are stored in RGB order on a 0..1 scale (timm's
# pretrained_cfg); the pixels of a BGR backbone come from ``to_uint8`` already in BGR order, so
# the statistics are reversed to match them. Arithmetic: ``(x - 255 * mean) / (255 * std)`` in
# float32, the same in numpy and torch, so both give the same numbers.


def _flip_input(pp: Preprocess, input_order: str | None) -> bool:
    """Whether pixels in ``input_order`` (None: as ``to_uint8`` made them, i.e. in the
    backbone's ``channel_order``) must be reversed into the backbone's order."""
    if input_order is None:
        return False
    if input_order not in ("RGB", "BGR"):
        raise ValueError(f"unknown channel order {input_order!r}")
    return input_order != pp.channel_order


def mean_std_255(pp: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float32 (3,) on the 0..255 scale, in the backbone's channel order."""
    mean = np.asarray(pp.mean, np.float32) * np.float32(255.0)
    std = np.asarray(pp.std, np.float32) * np.float32(255.0)
    if pp.channel_order == "BGR":
        mean, std = mean[::-1].copy(), std[::-1].copy()
    return mean, std


def normalize(batch: np.ndarray, pp: Preprocess, input_order: str | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) standardised by ``pp``'s mean/std.

    ``input_order``: the channel order of ``batch``; None means as ``pp.to_uint8`` made it
    (the backbone's own order); ``"RGB"`` for the export/serving contract (RGB input), which
    reverses the pixels for a BGR backbone.
    """
    x = np.asarray(batch).astype(np.float32)
    if _flip_input(pp, input_order):
        x = x[..., ::-1]
    mean, std = mean_std_255(pp)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))


def _normalize_class():
    import torch

    class Normalize(torch.nn.Module):
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W): :func:`normalize` as a torch module.

        Built from a :class:`Preprocess` (and ``input_order``, as in :func:`normalize`); mean
        and std are buffers (move with ``.to(device)``, constants in an ONNX export).
        """

        def __init__(self, pp: Preprocess, input_order: str | None = None):
            super().__init__()
            self.flip = _flip_input(pp, input_order)
            mean, std = mean_std_255(pp)
            self.register_buffer("mean", torch.from_numpy(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.from_numpy(std).view(1, 3, 1, 1))

        def forward(self, x):
            return self.standardize(x.permute(0, 3, 1, 2).float())

        def standardize(self, x):
            """Float NCHW pixels (0..255, in ``input_order``) -> normalised NCHW; for callers
            that work on NCHW before normalising (the export's in-graph resize)."""
            if self.flip:
                x = x.flip(1)
            return (x - self.mean) / self.std

    return Normalize


_LAZY: dict = {}


def __getattr__(name: str):
    # ``Normalize`` subclasses torch.nn.Module: built on first use so that importing this module
    # (decode workers, the CLI) does not import torch.
    if name == "Normalize":
        if name not in _LAZY:
            _LAZY[name] = _normalize_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
