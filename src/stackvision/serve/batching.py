"""Dynamic batching: single images from concurrent requests share one forward pass.

One task takes whatever is queued, up to ``max_batch`` images, and runs ``predict`` on the stacked
batch in a single inference thread (one thread, so the model never runs twice at once and its
engines need no locking). It waits (at most ``max_wait_ms``) for more only while other requests
are on their way (:meth:`Batcher.expecting`: being read or decoded); a lone request runs at once.
Under load, requests that arrive while a batch runs queue up and form the next batch anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class _Item:
    __slots__ = ("array", "future", "t_queued")

    def __init__(self, array, future):
        self.array, self.future, self.t_queued = array, future, time.perf_counter()


class Expected:
    """Images a request will submit (see :meth:`Batcher.expecting`); ``left`` not yet queued."""

    __slots__ = ("batcher", "left")

    def __init__(self, batcher: Batcher, n: int):
        self.batcher, self.left = batcher, 0
        self.set(n)

    def set(self, n: int) -> None:
        """Now known: the request brings ``n`` images in all (less those already submitted)."""
        n = max(0, int(n))
        self.batcher.incoming += n - self.left
        self.left = n

    def take_one(self) -> None:
        if self.left > 0:
            self.left -= 1
            self.batcher.incoming -= 1


class Batcher:
    """Collects single images from concurrent requests into batches for one forward pass.

    ``predict``: uint8 (N, S, S, 3) -> (N, n_classes) probabilities (a model's ``forward_uint8``).
    A failing batch fails every request waiting on it with the same exception.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
    ):
        self.predict = predict
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.queue: asyncio.Queue[_Item] | None = None
        self.incoming = 0  # images of requests being read or decoded, not yet queued
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="stackvision-infer")
        self.task: asyncio.Task | None = None
        self.stats = {
            "batches": 0,
            "images": 0,
            "max_batch_seen": 0,
            "batch_sizes": {},
            "inference_seconds": 0.0,
        }

    async def start(self) -> None:
        # The queue is made here, not in __init__: it must belong to the serving event loop.
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def expecting(self, n: int = 1):
        """While a request is read and decoded: its ``n`` images are on their way, so a batch
        being collected waits for them (up to ``max_wait_ms``). Yields an :class:`Expected` to
        pass to :meth:`submit` (and to ``set`` the count once known)."""
        exp = Expected(self, n)
        try:
            yield exp
        finally:
            exp.set(0)

    async def submit(self, array: np.ndarray, expected: Expected | None = None) -> np.ndarray:
        """Queue one (S, S, 3) image; returns its probabilities once its batch has run."""
        fut = asyncio.get_running_loop().create_future()
        if expected is not None:
            expected.take_one()  # in the queue from now on: no longer "on its way"
        self.queue.put_nowait(_Item(array, fut))
        return await fut

    async def run_now(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch directly in the inference thread (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, batch)

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            try:
                items.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            if self.incoming <= 0:  # nothing else on its way: do not wait for nobody
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            items = [it for it in items if not it.future.done()]  # client gone
            if not items:
                continue
            t0 = time.perf_counter()
            try:
                batch = np.stack([it.array for it in items])
                proba = await loop.run_in_executor(self.executor, self.predict, batch)
            except Exception as exc:  # each waiting request turns it into its own 500
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            self._count(len(items), time.perf_counter() - t0)
            for it, p in zip(items, proba):
                if not it.future.done():
                    it.future.set_result(p)

    def _count(self, n: int, seconds: float) -> None:
        st = self.stats
        st["batches"] += 1
        st["images"] += n
        st["max_batch_seen"] = max(st["max_batch_seen"], n)
        st["batch_sizes"][str(n)] = st["batch_sizes"].get(str(n), 0) + 1
        st["inference_seconds"] = round(st["inference_seconds"] + seconds, 4)

    def snapshot(self) -> dict:
        """The counters as shown by ``/health`` and ``/model``."""
        st = dict(self.stats)
        st["batch_sizes"] = dict(sorted(st["batch_sizes"].items(), key=lambda kv: int(kv[0])))
        st["mean_batch"] = round(st["images"] / st["batches"], 3) if st["batches"] else None
        st["queued"] = self.queue.qsize() if self.queue else 0
        st["incoming"] = self.incoming
        st["max_batch"], st["max_wait_ms"] = self.max_batch, self.max_wait * 1000
        return st
