"""Decode workers: image files -> uint8 crops, one per backbone preprocessing, a few batches ahead.

Two kinds of worker:

* ``threads`` (the default): PIL releases the GIL while it decodes and resamples, so threads
  overlap the network well on a few cores, and cost nothing to start.
* ``processes``: for a model on a GPU, where decoding is the bound. Threads stop scaling at about
  four because of the GIL. Measured on a 16-core H200 machine (lite0 crops of 224 px imagewoof
  JPEGs): threads 1/4/8/16 gave 564/1721/1761/1532 img/s, processes 4/8/16 gave
  1656/2920/4341 img/s (``benchmarks/decode_scaling.py``).

Processes are started with ``forkserver`` (never ``fork``: the parent may hold CUDA and thread
pools), all at once, while ``__main__`` is hidden: otherwise every worker would import the user's
script again, and a script without an ``if __name__ == "__main__":`` guard would run its top level
once per worker. The workers only need this module. Where processes cannot start (a sandbox
without process creation), decoding carries on in threads, with a warning.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import sys
import types
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

import numpy as np
from PIL import Image

from .images import ImageDecodeError, decode, read_bytes
from .preprocess import Preprocess

# One image's work: its path and the (backbone name, preprocessing) pairs it is needed for.
Item = tuple[str, Sequence[tuple[str, Preprocess]]]
Result = dict[str, np.ndarray] | ImageDecodeError
KINDS = ("threads", "processes")


def open_rgb(image, min_side: int | None = None) -> Image.Image:
    """An RGB PIL image from a file path, encoded bytes or a PIL image (see
    :func:`stackvision.images.decode`; ``min_side`` allows JPEG draft decoding). Raises
    :class:`ImageDecodeError` for an unusable file."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, bytes | bytearray | memoryview):
        return decode(bytes(image), min_side=min_side)
    path = os.fspath(image)
    return decode(read_bytes(path), path, min_side)


def decode_crop(image, pp: Preprocess, channel_order: str | None = None) -> np.ndarray:
    """The one decode-and-crop: a path, bytes or PIL image -> uint8 (S, S, 3) for ``pp``.

    ``channel_order``: None for the backbone's own (what the engines take), ``"RGB"`` for the
    export and serving contract. Raises :class:`ImageDecodeError` for an unusable image.
    """
    if channel_order is not None and channel_order != pp.channel_order:
        pp = replace(pp, channel_order=channel_order)
    return pp.to_uint8(open_rgb(image, pp.resize_size))


def decode_item(path: str, pps: Sequence[tuple[Hashable, Preprocess]]) -> Result:
    """Decode ``path`` once and crop it for each (key, preprocessing); a bad file gives the error.

    Returns ``{key: uint8 (S, S, 3)}``; keys are backbone names here, column indices in Ray tasks.
    """
    try:
        img = open_rgb(path, max(pp.resize_size for _, pp in pps))
        return {name: pp.to_uint8(img) for name, pp in pps}
    except ImageDecodeError as exc:
        return exc
    except MemoryError:  # one image too large to resize: a listed bad image, not the end of a run
        return ImageDecodeError(path, "out of memory while resizing it", too_large=True)


def _decode_chunk(items: list[Item]) -> list:
    """Process-side: errors travel as (path, reason) tuples (the exception does not pickle)."""
    out = []
    for path, pps in items:
        res = decode_item(path, pps)
        out.append((res.path, res.reason) if isinstance(res, ImageDecodeError) else res)
    return out


# Below this many images, starting the worker processes costs more than they save.
MIN_IMAGES_FOR_PROCESSES = 256


def _ready() -> bool:
    return True


@contextlib.contextmanager
def _main_hidden():
    """Let new processes start without importing ``__main__``.

    multiprocessing tells each spawned or forkserver child to import the parent's main module
    (by path or name) so that functions defined there unpickle; ours live in this module.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def default_workers(device: str = "cpu") -> int:
    """Decode workers: up to 4 when the model runs on the CPU (it needs the cores too), up to 16
    when it runs on a GPU, where decoding is the only work left for the CPU."""
    cap = 16 if str(device).startswith("cuda") else 4
    return max(1, min(cap, os.cpu_count() or 1))


def default_kind(device: str, workers: int, n_images: int | None = None) -> str:
    """``processes`` for a GPU model with more than 4 decode workers and enough images, else
    ``threads``."""
    if n_images is not None and n_images < MIN_IMAGES_FOR_PROCESSES:
        return "threads"
    return "processes" if str(device).startswith("cuda") and workers > 4 else "threads"


class DecodePool:
    """Decodes batches of items in order, keeping up to ``ahead`` batches in flight.

    Use as a context manager; :meth:`run` yields one list of results per input batch.
    """

    def __init__(self, workers: int, kind: str = "threads", ahead: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown decoder kind {kind!r}")
        self.workers = max(1, int(workers))
        self.kind = kind
        self.ahead = ahead or (4 if kind == "processes" else 2)
        self._ex: Executor | None = None

    def __enter__(self) -> DecodePool:
        self._ex = self._start(self.kind)
        return self

    def __exit__(self, *exc) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def _start(self, kind: str) -> Executor:
        if kind == "processes":
            try:
                ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("forkserver"))
                with _main_hidden():
                    # Start every worker (and the fork server) now, inside the window: the
                    # executor would otherwise spawn workers on later submits, outside it.
                    launch = getattr(ex, "_launch_processes", None)  # CPython 3.9+
                    if launch is not None:
                        launch()
                    ex.submit(_ready).result()
                return ex
            except (OSError, ValueError, RuntimeError, BrokenProcessPool) as exc:
                self._fall_back(exc)
        return ThreadPoolExecutor(self.workers)

    def _fall_back(self, exc: BaseException) -> None:
        print(
            f"warning: decoding in processes is not possible here ({type(exc).__name__}: {exc}); "
            "decoding in threads instead",
            file=sys.stderr,
        )
        self.kind = "threads"

    def _submit(self, batch: list[Item]):
        if self.kind == "threads":
            return [self._ex.submit(decode_item, p, pps) for p, pps in batch]
        size = max(1, min(16, math.ceil(len(batch) / self.workers)))
        return [
            self._ex.submit(_decode_chunk, batch[i : i + size]) for i in range(0, len(batch), size)
        ]

    def _collect(self, futures) -> list[Result]:
        if self.kind == "threads":
            return [f.result() for f in futures]
        out: list[Result] = []
        for f in futures:
            for r in f.result():
                out.append(ImageDecodeError(*r) if isinstance(r, tuple) else r)
        return out

    def run(self, batches: Iterable[list[Item]]) -> Iterator[list[Result]]:
        assert self._ex is not None, "use DecodePool as a context manager"
        todo = iter(batches)
        pending: deque = deque()

        def fill():
            while len(pending) < self.ahead:
                batch = next(todo, None)
                if batch is None:
                    return
                pending.append((batch, self._submit(batch)))

        fill()
        while pending:
            batch, futures = pending.popleft()
            try:
                results = self._collect(futures)
            except BrokenProcessPool as exc:
                # The workers could not start (or died): redo everything pending in threads.
                self._ex.shutdown(wait=False, cancel_futures=True)
                self._fall_back(exc)
                self._ex = ThreadPoolExecutor(self.workers)
                redo = [batch] + [b for b, _ in pending]
                pending.clear()
                pending.extend((b, self._submit(b)) for b in redo)
                batch, futures = pending.popleft()
                results = self._collect(futures)
            fill()
            yield results


def decode_crops(
    paths: Sequence[str],
    pp: Preprocess,
    workers: int | None = None,
    kind: str = "threads",
    strict: bool = False,
):
    """Decode ``paths`` into one uint8 (N, S, S, 3) array for ``pp`` (backbone channel order).

    Returns (images, index in ``paths`` of each kept image, ``Problem`` of each left-out one);
    ``strict``: a bad image is a :class:`StackvisionError` instead. ``kind``: see :data:`KINDS`.
    """
    from .data import Problem
    from .errors import StackvisionError

    s = pp.input_size
    out = np.empty((len(paths), s, s, 3), np.uint8)
    keep, problems = [], []
    step = 64
    batches = [[(p, [("x", pp)]) for p in paths[i : i + step]] for i in range(0, len(paths), step)]
    with DecodePool(workers or default_workers(), kind) as decoding:
        for b, results in enumerate(decoding.run(batches)):
            for j, res in enumerate(results):
                i = b * step + j
                if isinstance(res, ImageDecodeError):
                    if strict:
                        raise StackvisionError(
                            f"bad image {paths[i]}: {res.reason}",
                            "remove or replace it, or run without --strict to skip bad images",
                        )
                    problems.append(Problem(paths[i], res.reason))
                    continue
                out[len(keep)] = res["x"]
                keep.append(i)
    return out[: len(keep)], np.asarray(keep, np.int64), problems
