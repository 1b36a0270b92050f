"""A backbone's input preprocessing, as data.

The same :class:`Preprocess` drives the decode workers (resize + crop to uint8), the engines
(mean/std normalisation), ONNX export and serving, so every path sees identical pixels.
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
        resample = _INTERPOLATION.get(self.interpolation, Image.Resampling.BICUBIC)
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
        img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.uint8)
        if self.channel_order == "BGR":
            arr = arr[..., ::-1]
        return np.ascontiguousarray(arr)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, scaled to 0..1 then standardised by mean/std."""
        x = batch.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
