"""One pass over the files for ``--decoder torchvision``: read, hash, decode, run, store.

The other decoders read every file twice (a hash pass, then a decode pass) and bring the crops
back through the host. On a GPU, where lite0 takes 0.14 ms an image, that bound extraction to
9-19% of the network's rate on an H200; measured stage by stage there (BENCHMARKS.md, issue 14
section 5), nvJPEG alone decodes ~12,000 img/s, and the time went to the second pass, the
copies and the GIL: the network's ~200 kernel launches a batch wait behind the other threads'
Python. Here each stage is one thread, joined by bounded queues (a few batches, so memory does
not grow with the number of images):

1. reader threads read each file once and hash its bytes;
2. a producer asks the stores which images of each chunk lack a view and queues those, each
   content hash once, in batches;
3. a decoder checks each header and decodes the batch (nvJPEG on CUDA) and resizes it, on its
   own CUDA stream; the crops stay on the device;
4. the calling thread runs the engines (a torch engine takes the device tensor as it is);
5. a writer commits each batch's features, so a killed run resumes from what was committed.

An error in any stage stops the others and is raised in the caller; the writer still commits
what reached it.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .cache import content_hash
from .errors import StackvisionError
from .gpu_decode import TorchvisionPool, check_read
from .images import ImageDecodeError, read_bytes
from .progress import progress as progress_bar

#: reader threads: 4, 8 and 16 ran alike on a 16-core H200 host (the GIL, not the disk, bounds)
READERS = 8
#: chunks of files read ahead of the producer
AHEAD = 4
#: batches in flight between two stages
DEPTH = 3
#: the GIL's switch interval while the network runs on CUDA, restored after: at Python's 5 ms
#: the network's launches wait for other threads every few layers (H200, prototype of this
#: pipeline: 3,290 -> 3,740 img/s at batch 64, 3,643 -> 4,074 at 128, with 20 ms)
SWITCH_INTERVAL = 0.02
_END = object()


@dataclass
class _Item:
    index: int
    hash: str
    data: bytes
    needs: dict[str, tuple[str, ...]]  # backbone -> views its store lacks


@dataclass
class Result:
    """What :func:`one_pass` found: content hashes (None where unreadable), bad images, counts."""

    hashes: list
    failed: dict[int, str] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    n_lacking: int = 0  # images (duplicates included) some store lacked
    n_decode_failed: int = 0  # of those, images that could not be decoded


class _Stages:
    """The queues and the stop flag the stage threads share."""

    def __init__(self):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def thread(self, fn, *args) -> threading.Thread:
        def body():
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                self.errors.append(exc)
                self.stop.set()

        th = threading.Thread(target=body, name=f"stackvision-{fn.__name__}", daemon=True)
        th.start()
        return th


def read_hashed(path: str) -> tuple[str, bytes] | ImageDecodeError:
    """(content hash, bytes) of one file, or why it cannot be used (see :func:`read_bytes`)."""
    try:
        data = read_bytes(path)
    except ImageDecodeError as exc:
        return exc
    if not data:
        return ImageDecodeError(path, "empty file (0 bytes)")
    return content_hash(data), data


def one_pass(
    paths: Sequence[str],
    specs: Sequence,
    stores: dict,
    views: Sequence[str],
    make_engine: Callable,
    *,
    device: str,
    batch_size: int,
    strict: bool = False,
    progress: bool = False,
    readers: int = READERS,
) -> Result:
    """Features of ``paths`` for every backbone of ``specs`` and view the stores lack, computed
    and committed; ``make_engine(spec)`` builds an engine when its first batch arrives."""
    res = Result(hashes=[None] * len(paths), computed={s.name: 0 for s in specs})
    st = _Stages()
    q_dec: queue.Queue = queue.Queue(DEPTH)
    q_net: queue.Queue = queue.Queue(DEPTH)
    q_out: queue.Queue = queue.Queue(DEPTH + 1)
    cuda = str(device).startswith("cuda")
    decode = TorchvisionPool(device)
    bar = progress_bar(len(paths), "extract " + "+".join(s.name for s in specs), "img", progress)

    queued: dict[str, int] = {}  # content hash -> the index whose copy is decoded
    dups: list[tuple[int, str]] = []  # (index, hash) of later copies

    def produce():
        batch: list[_Item] = []

        def chunk(start: int, futures) -> None:
            nonlocal batch
            got = [(start + j, f.result()) for j, f in enumerate(futures)]
            good = [(i, r) for i, r in got if not isinstance(r, ImageDecodeError)]
            for i, r in got:
                if isinstance(r, ImageDecodeError):
                    res.failed[i] = r.reason
            hs = [r[0] for _, r in good]
            lacking = {s.name: {v: stores[s.name].missing(hs, v) for v in views} for s in specs}
            done = len(got) - len(good)
            for i, (h, data) in good:
                res.hashes[i] = h
                needs = {n: tuple(v for v in views if h in lack[v]) for n, lack in lacking.items()}
                needs = {n: vs for n, vs in needs.items() if vs}
                if not needs:
                    done += 1
                    continue
                res.n_lacking += 1
                if h in queued:  # the same content under another name: computed once
                    dups.append((i, h))
                    done += 1
                    continue
                queued[h] = i
                batch.append(_Item(i, h, data, needs))
                if len(batch) == batch_size:
                    st.put(q_dec, batch)
                    batch = []
            bar.update(done)

        window: deque = deque()
        with ThreadPoolExecutor(readers, thread_name_prefix="stackvision-read") as pool:
            for start in range(0, len(paths), batch_size):
                if st.stop.is_set():
                    return
                window.append((start, [pool.submit(read_hashed, p) for p in paths[start : start + batch_size]]))  # fmt: skip
                if len(window) > AHEAD:
                    chunk(*window.popleft())
            while window and not st.stop.is_set():
                chunk(*window.popleft())
        if batch:
            st.put(q_dec, batch)
        st.put(q_dec, _END)

    def decoder():
        stream = None
        if cuda:
            import torch

            stream = torch.cuda.Stream(device=device)
        while (batch := st.get(q_dec)) is not _END:
            work = [
                (paths[it.index], [(s.name, s.preprocess) for s in specs if s.name in it.needs])
                for it in batch
            ]
            reads = [check_read(it.data, paths[it.index]) for it in batch]
            ctx = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
            with ctx:
                errors, crops = decode.decode_crops(work, reads)
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record(stream)
            st.put(q_net, (batch, errors, crops, event))
        st.put(q_net, _END)

    def write():  # drains its queue to the end, even after a stop: committed work is kept
        while (item := q_out.get()) is not _END:
            name, rows = item
            stores[name].put_many(rows)

    engines: dict = {}
    threads = [st.thread(produce), st.thread(decoder), st.thread(write)]
    old_switch = sys.getswitchinterval()
    if cuda:
        sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        while (item := st.get(q_net)) is not _END:
            batch, errors, crops, event = item
            for it, err in zip(batch, errors):
                if err is not None:
                    if strict:
                        raise StackvisionError(
                            f"bad image {paths[it.index]}: {err.reason}",
                            "remove or replace it, or run without --strict to skip bad images",
                        )
                    res.failed[it.index] = err.reason
                    res.n_decode_failed += 1
            if event is not None:
                import torch

                torch.cuda.current_stream(device).wait_event(event)
            for spec in specs:
                if spec.name in crops:
                    _run(spec, batch, crops[spec.name], views, engines, make_engine, st, q_out)
                    res.computed[spec.name] += len(crops[spec.name][0])
            bar.update(len(batch))
    finally:
        sys.setswitchinterval(old_switch)
        st.stop.set()  # the producer and the decoder stop; the writer finishes its queue
        while threads[-1].is_alive():
            try:
                q_out.put(_END, timeout=0.1)
                break
            except queue.Full:
                continue
        for th in threads:
            th.join()
        bar.close()
    if st.errors:
        raise st.errors[0]
    for i, h in dups:  # a copy of a file that could not be decoded cannot be either
        if queued[h] in res.failed:
            res.failed[i] = res.failed[queued[h]]
            res.n_decode_failed += 1
    return res


def _run(spec, batch, crops, views, engines, make_engine, st, q_out) -> None:
    """One backbone on one batch's crops (rows of ``batch``), each view its store lacks."""
    import torch

    rows, x = crops
    engine = engines.get(spec.name) or engines.setdefault(spec.name, make_engine(spec))
    tensors = getattr(engine, "takes_tensors", False)
    if x.is_cuda:  # made on the decoder's stream, used on this one
        x.record_stream(torch.cuda.current_stream(x.device))
    out = []
    for v in views:
        sel = [k for k, r in enumerate(rows) if v in batch[r].needs[spec.name]]
        if not sel:
            continue
        xs = x if len(sel) == len(rows) else x[sel]
        if v != "orig":  # the flip view: NHWC, width is axis 2
            xs = xs.flip(2)
        feats = engine.features(xs if tensors else xs.cpu().numpy())
        out += [(batch[rows[k]].hash, v, f) for k, f in zip(sel, feats)]
    st.put(q_out, (spec.name, out))
