"""Augmented training views: more rows for the heads, from random crops of the training images.

``StackedClassifier(train_views=K)`` (``train --train-views K``) adds K views of every training
image to the rows the heads are fitted on: each a random-resized crop of the decoded image
(area 35-100%, aspect ratio 3/4-4/3, flipped with probability 1/2), resized once to the
backbone's input size. They are features like ``orig`` and ``flip``, cached under the view
names ``rrc35.1`` .. ``rrc35.K``; they only ever add training rows. Out-of-fold scores, the
temperature, the LDA weight and every prediction use the original views (``orig``/``flip``), so
the scores stay comparable with a model trained without them.

The crop of view ``v`` of an image is drawn from a generator seeded by the image's content hash
and ``v``, in coordinates relative to the image, so a cached row is reproducible whatever the
JPEG draft scale the decoder used, and the same view of an image is the same crop for every
backbone.

Measured side by side (BENCHMARKS.md, "Augmented training views"; default stack, K = 2): cub86
(~30 images a class) +0.32 points and -0.003 log loss, flowers5 and imagewoof (hundreds a class)
-0.23 and -0.10 points, for twice the training images' extraction and head fitting.
It is not a robust gain, so no preset uses it: an option for small classes, to try with ``--val``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .preprocess import Preprocess

SCALE = (0.35, 1.0)  # area fraction of the crop
RATIO = (3 / 4, 4 / 3)  # its aspect ratio
FLIP = 0.5
PREFIX = "rrc35."  # the view names: the policy's name (change it with the policy) and an index
MAX_VIEWS = 16


def view_names(k: int) -> tuple[str, ...]:
    """The names of ``k`` augmented training views: ``rrc35.1`` .. ``rrc35.k``."""
    return tuple(f"{PREFIX}{i}" for i in range(1, int(k) + 1))


def is_train_view(view: str) -> bool:
    rest = view[len(PREFIX) :] if view.startswith(PREFIX) else ""
    return rest.isdigit() and 1 <= int(rest) <= MAX_VIEWS


def _generator(image: str, view: str) -> np.random.Generator:
    seed = hashlib.sha256(f"{image}:{view}".encode()).digest()[:8]
    return np.random.default_rng(int.from_bytes(seed, "little"))


@dataclass(frozen=True)
class ViewCrop:
    """What the decoders need to make view ``view`` of the image with content hash ``image``
    for a backbone with preprocessing ``pp``: a drop-in for :class:`Preprocess` in
    :func:`stackvision.decoding.decode_item` (``resize_size`` and ``to_uint8``)."""

    pp: Preprocess
    view: str
    image: str

    @property
    def resize_size(self) -> int:
        """Short side to decode at (JPEG draft) so that the smallest crop still has the input's
        resolution."""
        return int(math.ceil(self.pp.input_size / math.sqrt(SCALE[0] * RATIO[0])))

    def box(self, w: int, h: int) -> tuple[tuple[float, float, float, float], bool]:
        """((left, top, right, bottom), flip) of the crop in a ``w`` x ``h`` image; scaling the
        image scales the box (every draw is relative)."""
        g = _generator(self.image, self.view)
        for _ in range(10):  # torchvision's RandomResizedCrop: 10 tries, then the centre square
            area = w * h * g.uniform(*SCALE)
            ratio = math.exp(g.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
            cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
            u, v = g.uniform(), g.uniform()
            if cw <= w and ch <= h:
                left, top = u * (w - cw), v * (h - ch)
                return (left, top, left + cw, top + ch), bool(g.uniform() < FLIP)
        s = min(w, h)
        left, top = (w - s) / 2, (h - s) / 2
        return (left, top, left + s, top + s), bool(g.uniform() < FLIP)

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """The view as HWC uint8 at the backbone's input size (in its channel order)."""
        (box, flip), s = self.box(*img.size), self.pp.input_size
        out = img.resize((s, s), self.pp.resample, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.pp.array(out)
