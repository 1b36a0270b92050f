"""Training-time augmentation for fine-tuning, on uint8 images already at the network's input size.

An :class:`Augment` is data (a frozen dataclass, JSON in the model manifest): horizontal flip,
rotation, zoom (random-resized crop), shifts, brightness and contrast. It works on one uint8 HWC
array at a time with torchvision's v2 functional ops, so a batch is augmented without leaving
uint8 and without PIL round trips. Randomness comes from an explicit ``torch.Generator``, so a
resumed training run sees the same augmented images as an uninterrupted one.

Presets: ``none``, ``light``, ``standard`` (what ``--augment`` alone means) and ``strong``; a preset
can be adjusted with ``key=value`` pairs, e.g. ``--augment standard,rotation=25,flip=0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .errors import StackvisionError


@dataclass(frozen=True)
class Augment:
    flip: float = 0.0  # probability of a horizontal flip
    rotation: float = 0.0  # max degrees either way
    zoom: float = 1.0  # smallest crop area fraction kept by the random-resized crop (1 = no zoom)
    shift: float = 0.0  # max translation, as a fraction of the side
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0  # factor drawn from [1 - c, 1 + c]

    @property
    def active(self) -> bool:
        return self != Augment()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Augment:
        return cls(**(d or {}))

    @classmethod
    def parse(cls, text: str | None) -> Augment:
        """``none`` | ``light`` | ``standard`` | ``strong``, optionally followed by ``,key=value``."""
        if text is None or text == "":
            return PRESETS["none"]
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        base = PRESETS["standard"]
        if parts and "=" not in parts[0]:
            name = parts.pop(0).lower()
            if name not in PRESETS:
                raise StackvisionError(
                    f"unknown augmentation preset '{name}'",
                    f"use one of: {', '.join(PRESETS)} (optionally followed by ,key=value)",
                )
            base = PRESETS[name]
        known = {f.name for f in fields(cls)}
        changes = {}
        for p in parts:
            if "=" not in p:
                raise StackvisionError(
                    f"bad augmentation setting '{p}'", "write key=value, e.g. rotation=15"
                )
            k, v = (s.strip() for s in p.split("=", 1))
            if k not in known:
                raise StackvisionError(
                    f"unknown augmentation setting '{k}'", f"valid: {', '.join(sorted(known))}"
                )
            try:
                changes[k] = float(v)
            except ValueError:
                raise StackvisionError(
                    f"augmentation setting {k} needs a number, got '{v}'", f"e.g. {k}=0.2"
                ) from None
        aug = replace(base, **changes)
        aug.check()
        return aug

    def check(self) -> None:
        if not 0 <= self.flip <= 1:
            raise StackvisionError(f"flip must be a probability, got {self.flip}", "e.g. flip=0.5")
        if not 0 < self.zoom <= 1:
            raise StackvisionError(f"zoom must be in (0, 1], got {self.zoom}", "e.g. zoom=0.7")
        if not 0 <= self.shift < 0.5:
            raise StackvisionError(f"shift must be in [0, 0.5), got {self.shift}", "e.g. shift=0.1")
        for k in ("rotation", "brightness", "contrast"):
            if getattr(self, k) < 0:
                raise StackvisionError(f"{k} must not be negative", f"e.g. {k}=0.2")
        if self.brightness >= 1 or self.contrast >= 1:
            raise StackvisionError(
                "brightness and contrast must be below 1", "e.g. brightness=0.2,contrast=0.2"
            )

    # ------------------------------------------------------------------ applying
    def __call__(self, img: np.ndarray, gen) -> np.ndarray:
        """Augment one uint8 HWC image; returns a uint8 HWC image of the same size."""
        if not self.active:
            return img
        import torch
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        def u(a=0.0, b=1.0) -> float:
            return a + (b - a) * float(torch.rand((), generator=gen))

        h, w = img.shape[:2]
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        if self.zoom < 1:
            # Random-resized crop: an area fraction in [zoom, 1], aspect ratio in [3/4, 4/3].
            area = u(self.zoom, 1.0) * h * w
            ratio = math.exp(u(math.log(3 / 4), math.log(4 / 3)))
            cw = min(w, int(round(math.sqrt(area * ratio))))
            ch = min(h, int(round(math.sqrt(area / ratio))))
            top, left = int(u() * (h - ch + 1)), int(u() * (w - cw + 1))
            top, left = min(top, h - ch), min(left, w - cw)
            x = TF.resized_crop(
                x, top, left, ch, cw, [h, w], InterpolationMode.BILINEAR, antialias=True
            )
        if self.flip and u() < self.flip:
            x = TF.horizontal_flip(x)
        if self.rotation or self.shift:
            angle = u(-self.rotation, self.rotation) if self.rotation else 0.0
            dx = int(round(u(-self.shift, self.shift) * w)) if self.shift else 0
            dy = int(round(u(-self.shift, self.shift) * h)) if self.shift else 0
            # Reflect-free: uncovered corners are filled with the image's mean colour, which
            # looks less like a "black border" class cue than zeros do.
            fill = [float(v) for v in x.float().mean(dim=(1, 2))]
            x = TF.affine(
                x,
                angle=angle,
                translate=[dx, dy],
                scale=1.0,
                shear=[0.0, 0.0],
                interpolation=InterpolationMode.BILINEAR,
                fill=fill,
            )
        if self.brightness:
            x = TF.adjust_brightness(x, u(1 - self.brightness, 1 + self.brightness))
        if self.contrast:
            x = TF.adjust_contrast(x, u(1 - self.contrast, 1 + self.contrast))
        return np.ascontiguousarray(x.permute(1, 2, 0).numpy())

    def batch(self, imgs: np.ndarray, gen) -> np.ndarray:
        """Augment a uint8 NHWC batch image by image."""
        if not self.active:
            return imgs
        return np.stack([self(im, gen) for im in imgs])


PRESETS = {
    "none": Augment(),
    "light": Augment(flip=0.5, zoom=0.85, shift=0.05, brightness=0.1, contrast=0.1),
    "standard": Augment(flip=0.5, rotation=15, zoom=0.6, shift=0.1, brightness=0.2, contrast=0.2),
    "strong": Augment(flip=0.5, rotation=30, zoom=0.35, shift=0.15, brightness=0.35, contrast=0.35),
}


def preview_grid(
    paths: list[str],
    out: str,
    aug: Augment,
    preprocess,
    per_image: int = 6,
    seed: int = 0,
    cell: int | None = None,
) -> tuple[str, list]:
    """Write a PNG grid: one row per image, the original first, then ``per_image`` augmentations.

    Returns (path, problems) where problems lists the images that could not be decoded.
    """
    import torch
    from PIL import Image, ImageDraw

    from .data import Problem
    from .decoding import decode_crop
    from .images import ImageDecodeError

    gen = torch.Generator().manual_seed(seed)
    rows, problems = [], []
    for p in paths:
        try:
            img = decode_crop(p, preprocess, channel_order="RGB")  # a picture: RGB
        except ImageDecodeError as exc:
            problems.append(Problem(p, exc.reason))
            continue
        rows.append([img] + [aug(img, gen) for _ in range(per_image)])
    if not rows:
        raise StackvisionError("none of the images could be read", "check the DATA folder")
    s = cell or preprocess.input_size
    pad = 4
    top = 18
    grid = Image.new(
        "RGB", (pad + (s + pad) * (per_image + 1), top + pad + (s + pad) * len(rows)), "white"
    )
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 3), "original", fill="black")
    draw.text((pad + s + pad, 3), f"augmented: {_describe(aug)}", fill="black")
    for r, row in enumerate(rows):
        for c, arr in enumerate(row):
            tile = (
                Image.fromarray(arr).resize((s, s)) if arr.shape[0] != s else Image.fromarray(arr)
            )
            grid.paste(tile, (pad + c * (s + pad), top + pad + r * (s + pad)))
    from PIL.PngImagePlugin import PngInfo

    from .atomic import atomic_path
    from .outputs import PNG_SOFTWARE

    info = PngInfo()
    info.add_text(
        "Software", PNG_SOFTWARE
    )  # marks the file as ours (a later --overwrite may replace it)
    with atomic_path(out, ".png") as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return out, problems


def _describe(aug: Augment) -> str:
    d = aug.to_dict()
    return ", ".join(f"{k}={v:g}" for k, v in d.items() if v != getattr(Augment(), k)) or "none"
