"""Prototype one-pass pipelines for ``gpu_pipeline.py`` (issue 14): what ``extract`` could be
built as, each variant end to end. ``one_pass.py`` is the one kept."""

# ruff: noqa: B023 - every lambda here is timed at once, inside its loop
from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import gpu_common as gc
from gpu_common import Graphed, forward, nvjpeg, side_stream


def pipeline(
    paths,
    spec,
    work,
    *,
    bs=64,
    decode="nvjpeg",
    on_device=True,
    readers=8,
    writer=True,
    graph=False,
    switch=None,
):
    """One pass: reader threads read + hash (+ decode on the CPU), the decoder thread decodes on
    the GPU and resizes, the main thread runs the network, a writer thread stores. Returns
    (img/s, main-thread seconds waiting for batches, network seconds)."""
    import torch

    from stackvision.cache import FeatureStore, content_hash
    from stackvision.engines import create_engine
    from stackvision.gpu_decode import resize_crop
    from stackvision.images import read_bytes

    pp = spec.preprocess
    t0 = time.perf_counter()
    eng = create_engine(spec, engine="torch", device=gc.DEVICE)
    net_fn = Graphed(eng, bs) if graph and gc.DEVICE != "cpu" else (lambda x: forward(eng, x))
    old_switch = sys.getswitchinterval()
    if switch:
        sys.setswitchinterval(switch)
    store = FeatureStore(os.path.join(tempfile.mkdtemp(dir=work), "p.sqlite"), spec.feature_dim)
    q_dec: queue.Queue = queue.Queue(maxsize=3)
    q_net: queue.Queue = queue.Queue(maxsize=3)
    q_out: queue.Queue = queue.Queue(maxsize=4)

    def load(p, cpu):
        data = read_bytes(p)
        h = content_hash(data)
        return h, (nvjpeg([data], "cpu")[0] if cpu else data)

    def producer(ex):
        window: deque = deque()
        queued: set = set()

        def emit(futs, cpu):
            got = [f.result() for f in futs]
            lacking = store.missing([h for h, _ in got], "orig")
            keep = [(h, d) for h, d in got if h in lacking and h not in queued]
            queued.update(h for h, _ in keep)
            if keep:
                q_dec.put((cpu, keep))

        for k, i in enumerate(range(0, len(paths), bs)):
            cpu = decode == "cpu" or (decode == "hybrid" and k % 2 == 1)
            window.append(([ex.submit(load, p, cpu) for p in paths[i : i + bs]], cpu))
            if len(window) >= 4:
                emit(*window.popleft())
        while window:
            emit(*window.popleft())
        q_dec.put(None)

    def decoder():
        on_stream, event = side_stream()
        while (item := q_dec.get()) is not None:
            cpu, keep = item
            with on_stream:
                if cpu:
                    imgs = [d.to(gc.DEVICE) for _, d in keep]
                else:
                    imgs = nvjpeg([d for _, d in keep])
                groups: dict = {}
                for j, im in enumerate(imgs):
                    groups.setdefault(tuple(im.shape), []).append(j)
                order = [j for idx in groups.values() for j in idx]
                crops = torch.cat(
                    [
                        resize_crop(torch.stack([imgs[j] for j in idx]), pp)
                        for idx in groups.values()
                    ]
                )
                if not on_device:
                    crops = crops.cpu()
                ev = event()
            q_net.put(([keep[j][0] for j in order], crops, ev))
        q_net.put(None)

    def write():
        while (item := q_out.get()) is not None:
            store.put_many(item)

    waited = net = 0.0
    with ThreadPoolExecutor(readers) as ex:
        threads = [threading.Thread(target=producer, args=(ex,)), threading.Thread(target=decoder)]
        if writer:
            threads.append(threading.Thread(target=write))
        for th in threads:
            th.start()
        n = 0
        while True:
            t = time.perf_counter()
            item = q_net.get()
            waited += time.perf_counter() - t
            if item is None:
                break
            hs, crops, ev = item
            t = time.perf_counter()
            if on_device:
                if ev is not None:
                    torch.cuda.current_stream().wait_event(ev)
                    crops.record_stream(torch.cuda.current_stream())
                feats = net_fn(crops)
            else:
                feats = eng.features(crops.numpy())
            net += time.perf_counter() - t
            rows = [(h, "orig", f) for h, f in zip(hs, feats)]
            q_out.put(rows) if writer else store.put_many(rows)
            n += len(hs)
        q_out.put(None)
        for th in threads:
            th.join()
    sys.setswitchinterval(old_switch)
    assert n == len(paths), (n, len(paths))
    store.close()
    return len(paths) / (time.perf_counter() - t0), waited, net


def pipelines(paths, spec, work, bs):
    rows = [
        "| one-pass pipeline | batch | end to end img/s | main thread waiting s | network s |",
        "|---|---:|---:|---:|---:|",
    ]
    variants = [
        ("nvJPEG, crops stay on the GPU, writer thread", {}),
        ("the same, GIL switch interval 20 ms", {"switch": 0.02}),
        ("the same, network as a CUDA graph", {"graph": True}),
        ("the same, CUDA graph + switch interval 20 ms", {"graph": True, "switch": 0.02}),
        (
            "the same, CUDA graph + switch 20 ms, 4 readers",
            {"graph": True, "switch": 0.02, "readers": 4},
        ),
        (
            "the same, CUDA graph + switch 20 ms, 16 readers",
            {"graph": True, "switch": 0.02, "readers": 16},
        ),
        ("CUDA graph, crops via the host", {"graph": True, "on_device": False}),
        ("CUDA graph, libjpeg in 8 reader threads", {"graph": True, "decode": "cpu"}),
        (
            "CUDA graph + switch 20 ms, libjpeg in 14 reader threads",
            {"graph": True, "decode": "cpu", "readers": 14, "switch": 0.02},
        ),
        ("nvJPEG, crops via the host", {"on_device": False}),
        ("nvJPEG, crops on the GPU, writes in the main thread", {"writer": False}),
    ]
    for b in (bs, 128):  # warm: cuDNN's kernels for both batch sizes, nvJPEG state
        pipeline(paths[:256], spec, work, bs=b)
    for label, kw in variants:
        for b in (bs, 128):
            try:
                r, waited, net = pipeline(paths, spec, work, bs=b, **kw)
                rows.append(f"| {label} | {b} | {r:,.0f} | {waited:.2f} | {net:.2f} |")
            except Exception as exc:  # noqa: BLE001 - one variant failing keeps the others
                rows.append(f"| {label} | {b} | failed: {type(exc).__name__}: {exc} | | |")
            print("  ", rows[-1], flush=True)
    return rows
