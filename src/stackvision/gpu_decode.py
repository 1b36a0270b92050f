"""Decoding on the model's device with torchvision: nvJPEG on a GPU (libjpeg on the CPU).

With the model on a GPU, decoding on the CPU is the bound: on an H200, lite0 extraction ran at
1,405 img/s end to end against 7,246 img/s for the network alone. ``--decoder torchvision``
decodes each batch of JPEGs with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG,
batched, on CUDA) and resizes and crops on the same device (``torch.nn.functional.interpolate``,
antialiased), with the arithmetic of :meth:`Preprocess.to_uint8` (short side to
``floor(size / crop_pct)``, centre crop). Only the crops go back to the host.

Pixels: another IDCT and chroma upsampling, no JPEG draft mode and torch's antialiased resize
instead of PIL's make pixels a little different from the PIL decoders' (threads, processes),
so their features are kept apart: the feature store's key gets ``pixels: torchvision``
(:func:`stackvision.cache.store_fields`). ``benchmarks/decode_compare.py`` measures the
accuracy cost. ``auto`` picks this decoder only when the model runs on CUDA.

What is decoded by PIL instead (and then resized the same way, on the device): files that are not
JPEGs, JPEGs the batch decoder rejects, and JPEGs over :data:`PIL_ABOVE_PIXELS` (PIL's draft mode
decodes those at a reduced scale; nvJPEG would decode the full image). Every limit of
:mod:`stackvision.images` applies (file size before reading, pixels and aspect ratio from the
header), and a bad file is an :class:`ImageDecodeError`, as with the other decoders.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .decoding import KINDS as PIL_KINDS
from .errors import StackvisionError
from .images import ImageDecodeError, check_shape, decode, probe, read_bytes
from .preprocess import Preprocess

DECODERS = ("auto", "pil", *PIL_KINDS, "torchvision")
#: JPEGs with more pixels than this go to PIL (draft mode): ~4x a 12 MP photo's
PIL_ABOVE_PIXELS = 50_000_000
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "box": "area"}


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def resolve_decoder(decoder: str, model_device: str) -> str:
    """The decoder ``decoder`` means for a model on ``model_device``: ``auto`` is torchvision on
    CUDA (when installed), else ``pil`` (PIL in the default worker kind)."""
    if decoder not in DECODERS:
        raise StackvisionError(f"unknown decoder '{decoder}'", f"use one of: {', '.join(DECODERS)}")
    if decoder == "auto":
        cuda = str(model_device).startswith("cuda")
        return "torchvision" if cuda and torchvision_available() else "pil"
    if decoder == "torchvision" and not torchvision_available():
        raise StackvisionError(
            "--decoder torchvision needs the package torchvision", "pip install torchvision"
        )
    return decoder


def pixels_id(decoder: str) -> str:
    """What goes into the feature store key: ``pil`` for every PIL decoder, ``torchvision``."""
    return "torchvision" if decoder == "torchvision" else "pil"


def resize_crop(image, pp: Preprocess):
    """uint8 (3, H, W) torch tensor (RGB) -> uint8 (S, S, 3) on the same device, by the
    arithmetic of :meth:`Preprocess.to_uint8` with torch's antialiased interpolation."""
    import torch
    import torch.nn.functional as F

    _, h, w = image.shape
    s, r = pp.input_size, pp.resize_size
    if pp.crop_mode == "squash":
        nw = nh = r
    elif w <= h:
        nw, nh = r, int(r * h / w)
    else:
        nw, nh = int(r * w / h), r
    x = image
    if (nw, nh) != (w, h):
        mode = _MODES.get(pp.interpolation, "bicubic")
        kw = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
        y = F.interpolate(image[None].to(torch.float32), size=(nh, nw), mode=mode, **kw)[0]
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    x = x[:, top : top + s, left : left + s]
    if pp.channel_order == "BGR":
        x = x.flip(0)
    return x.permute(1, 2, 0)


class TorchvisionPool:
    """The decode pool of ``--decoder torchvision``: same use as :class:`DecodePool` (a context
    manager whose :meth:`run` yields one list of results per batch of items), decoding on
    ``device``. Files are read and their headers checked in ``workers`` threads, a batch ahead."""

    kind = "torchvision"

    def __init__(self, device: str = "cpu", workers: int = 4):
        self.device = str(device)
        self.workers = max(1, int(workers))
        self._ex: ThreadPoolExecutor | None = None

    def __enter__(self) -> TorchvisionPool:
        self._ex = ThreadPoolExecutor(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def run(self, batches: Iterable[list]) -> Iterator[list]:
        assert self._ex is not None, "use TorchvisionPool as a context manager"
        todo = iter(batches)
        nxt = self._read_ahead(next(todo, None))
        while nxt is not None:
            batch, futures = nxt
            nxt = self._read_ahead(next(todo, None))
            yield self.decode_batch(batch, [f.result() for f in futures])

    def _read_ahead(self, batch):
        if batch is None:
            return None
        return batch, [self._ex.submit(_read, path) for path, _ in batch]

    def decode_batch(self, batch: Sequence, reads: Sequence) -> list:
        """``batch``: (path, [(key, Preprocess), ...]) items; ``reads``: what :func:`_read` gave
        for each. Returns ``{key: uint8 (S, S, 3)}`` or the :class:`ImageDecodeError` per item."""
        import torch

        images: list = [r if isinstance(r, ImageDecodeError) else None for r in reads]
        jpegs = [i for i, r in enumerate(reads) if isinstance(r, tuple) and r[1]]
        if jpegs:
            for i, t in zip(jpegs, self._decode_jpegs([reads[i][0] for i in jpegs])):
                images[i] = t
        for i, r in enumerate(reads):  # not a JPEG, too large for nvJPEG, or rejected by it
            if images[i] is None:
                path = batch[i][0]
                pps = batch[i][1]
                try:
                    img = decode(r[0], path, min_side=max(pp.resize_size for _, pp in pps))
                except ImageDecodeError as exc:
                    images[i] = exc
                    continue
                arr = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)
                images[i] = arr.to(self.device)
        out: list = [im if isinstance(im, ImageDecodeError) else {} for im in images]
        crops: dict = {}  # key -> (rows, device crops): one copy to the host per backbone
        for i, (_, pps) in enumerate(batch):
            if isinstance(images[i], ImageDecodeError):
                continue
            for key, pp in pps:
                rows, tensors = crops.setdefault(key, ([], []))
                rows.append(i)
                tensors.append(resize_crop(images[i], pp))
        for key, (rows, tensors) in crops.items():
            host = torch.stack(tensors).cpu().numpy()
            for i, arr in zip(rows, host):
                out[i][key] = arr
        return out

    def _decode_jpegs(self, datas: list[bytes]) -> list:
        """Device tensors (3, H, W) for each JPEG; None where the decoder failed (PIL then)."""
        import torch

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        # torchvision 0.29 warns on every call that TorchCodec supersedes it (same nvJPEG)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            kw = {"mode": ImageReadMode.RGB, "device": self.device, "apply_exif_orientation": True}
            try:
                return list(decode_jpeg(tensors, **kw))
            except Exception:  # noqa: BLE001 - one bad JPEG fails the batch: one by one
                out = []
                for t in tensors:
                    try:
                        out.append(decode_jpeg(t, **kw))
                    except Exception:  # noqa: BLE001 - PIL decodes it, or says why it cannot
                        out.append(None)
                return out


def _read(path: str):
    """(bytes, decode-with-torchvision?) for one file, or its :class:`ImageDecodeError`."""
    try:
        data = read_bytes(path)
        if not data:
            raise ImageDecodeError(path, "empty file (0 bytes)")
        fmt, w, h = probe(data, path)
        check_shape((w, h), path)
    except ImageDecodeError as exc:
        return exc
    return data, fmt == "JPEG" and w * h <= PIL_ABOVE_PIXELS
