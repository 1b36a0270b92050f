"""Decoding on the model's device with torchvision: nvJPEG on a GPU (libjpeg on the CPU).

With the model on a GPU, decoding on the CPU is the bound: on an H200, lite0 extraction ran at
1,405 img/s end to end against 7,246 img/s for the network alone. ``--decoder torchvision``
decodes each batch of JPEGs with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG,
batched, on CUDA) and resizes and crops on the same device (``torch.nn.functional.interpolate``,
antialiased), with the arithmetic of :meth:`Preprocess.to_uint8` (short side to
``floor(size / crop_pct)``, centre crop). :meth:`TorchvisionPool.decode_crops` leaves the crops
on the device; :mod:`stackvision.one_pass` (what ``extract`` runs with this decoder) hands them
to the torch engine there. :class:`TorchvisionPool` as a pool (:meth:`~TorchvisionPool.run`,
crops to the host) serves int8 extraction, whose calibration needs every hash first.

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
import threading
import warnings
from collections import deque
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
    arithmetic of :meth:`Preprocess.to_uint8` with torch's antialiased interpolation; a batch
    (N, 3, H, W) of images of one size -> (N, S, S, 3) in one call (one kernel, not N)."""
    import torch
    import torch.nn.functional as F

    one = image.dim() == 3
    x = image[None] if one else image
    h, w = x.shape[-2:]
    s, r = pp.input_size, pp.resize_size
    if pp.crop_mode == "squash":
        nw = nh = r
    elif w <= h:
        nw, nh = r, int(r * h / w)
    else:
        nw, nh = int(r * w / h), r
    if (nw, nh) != (w, h):
        mode = _MODES.get(pp.interpolation, "bicubic")
        kw = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
        y = F.interpolate(x.to(torch.float32), size=(nh, nw), mode=mode, **kw)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    x = x[:, :, top : top + s, left : left + s]
    if pp.channel_order == "BGR":
        x = x.flip(1)
    x = x.permute(0, 2, 3, 1)
    return x[0] if one else x


class TorchvisionPool:
    """The decode pool of ``--decoder torchvision``: same use as :class:`DecodePool` (a context
    manager whose :meth:`run` yields one list of results per batch of items), decoding on
    ``device``. Files are read and their headers checked in ``workers`` threads, a batch ahead."""

    kind = "torchvision"

    def __init__(self, device: str = "cpu", workers: int = 4, decoders: int | None = None):
        self.device = str(device)
        self.workers = max(1, int(workers))
        # batches decoded at once, each in its own thread (and CUDA stream), while the model
        # runs on the one before. On an H200 two beat one at the CLI's batch of 32 (1,160 vs
        # 950 img/s) and were even at 64; more do not help, since torchvision serialises its
        # nvJPEG decoder (BENCHMARKS.md, issue 14 section 4)
        self.decoders = max(1, int(decoders or (2 if self.device.startswith("cuda") else 1)))
        self._ex: ThreadPoolExecutor | None = None
        self._streams = threading.local()

    def __enter__(self) -> TorchvisionPool:
        self._ex = ThreadPoolExecutor(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def run(self, batches: Iterable[list]) -> Iterator[list]:
        """One list of results per batch, in order; up to ``decoders + 1`` batches in flight."""
        assert self._ex is not None, "use TorchvisionPool as a context manager"
        todo = iter(batches)
        pending: deque = deque()
        with ThreadPoolExecutor(self.decoders) as dec:

            def submit() -> None:
                batch = next(todo, None)
                if batch is not None:
                    reads = [self._ex.submit(_read, path) for path, _ in batch]
                    pending.append(dec.submit(self._decode_task, batch, reads))

            for _ in range(self.decoders + 1):
                submit()
            while pending:
                out = pending.popleft().result()
                submit()
                yield out

    def _decode_task(self, batch, reads) -> list:
        got = [f.result() for f in reads]
        if not self.device.startswith("cuda"):
            return self.decode_batch(batch, got)
        import torch

        stream = getattr(self._streams, "stream", None)
        if stream is None:  # one stream per decode thread: batches decode side by side
            stream = self._streams.stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(stream):
            return self.decode_batch(batch, got)  # ends with a copy to the host: synchronised

    def decode_batch(self, batch: Sequence, reads: Sequence) -> list:
        """``batch``: (path, [(key, Preprocess), ...]) items; ``reads``: what :func:`_read` gave
        for each. Returns ``{key: uint8 (S, S, 3)}`` or the :class:`ImageDecodeError` per item."""
        errors, crops = self.decode_crops(batch, reads)
        out: list = [e if e is not None else {} for e in errors]
        for key, (rows, tensor) in crops.items():
            for i, arr in zip(rows, tensor.cpu().numpy()):
                out[i][key] = arr
        return out

    def decode_crops(self, batch: Sequence, reads: Sequence) -> tuple[list, dict]:
        """As :meth:`decode_batch`, with the crops left on the device: (per item its
        :class:`ImageDecodeError` or None, ``{key: (rows, uint8 (N, S, S, 3) tensor)}``)."""
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
        groups: dict = {}  # (key, image size) -> rows: one resize call for each group
        for i, (_, pps) in enumerate(batch):
            if isinstance(images[i], ImageDecodeError):
                continue
            for key, pp in pps:
                groups.setdefault((key, tuple(images[i].shape)), (pp, []))[1].append(i)
        crops: dict = {}  # key -> (rows, device crops): one copy to the host per backbone
        for (key, _), (pp, idx) in groups.items():
            rows, tensors = crops.setdefault(key, ([], []))
            rows += idx
            tensors.append(resize_crop(torch.stack([images[i] for i in idx]), pp))
        errors = [im if isinstance(im, ImageDecodeError) else None for im in images]
        return errors, {key: (rows, torch.cat(ts)) for key, (rows, ts) in crops.items()}

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
    except ImageDecodeError as exc:
        return exc
    return check_read(data, path)


def check_read(data: bytes, path: str):
    """What :func:`_read` gives for bytes already read: the header's limits checked."""
    try:
        if not data:
            raise ImageDecodeError(path, "empty file (0 bytes)")
        fmt, w, h = probe(data, path)
        check_shape((w, h), path)
    except ImageDecodeError as exc:
        return exc
    return data, fmt == "JPEG" and w * h <= PIL_ABOVE_PIXELS
