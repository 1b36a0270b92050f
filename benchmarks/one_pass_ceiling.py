"""The one-pass pipeline's own ceiling on a CPU (issue 14): what its stages other than the
network cost per image, measured where no GPU is.

Tiny generated JPEGs (64 x 48) and a no-op engine, two views (orig, flip), batch 64:

* ``pipeline``: ``one_pass`` as ``extract --decoder torchvision`` runs it, decoding and resizing
  to 224 on the CPU;
* ``without decoding``: the decoder stage stubbed (zero crops): reads, hashes, store look-ups,
  queues and writes only;
* each stage alone, one thread: read + hash, the writer's ``put_many``, the look-up
  (``missing``) and the read (``get_many``) on a full store, for the store layout before
  (a WITHOUT ROWID table, 4 KB pages) and now (a rowid table and its key index, 16 KB pages).

    PYTHONPATH=src .venv/bin/python benchmarks/one_pass_ceiling.py --n 3000
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_flags, machine, today, write_results  # noqa: E402
from stackvision import one_pass as op  # noqa: E402
from stackvision.backbones import resolve  # noqa: E402
from stackvision.cache import FeatureCache, FeatureStore  # noqa: E402
from stackvision.extract import _stores  # noqa: E402

VIEWS = ("orig", "flip")


class NoopEngine:
    takes_tensors = True

    def features(self, x):
        return np.zeros((len(x), 1280), np.float32)


def images(folder: str, n: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = os.path.join(folder, f"{i:05d}.jpg")
        if not os.path.exists(p):
            px = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(px).save(p, quality=80)
    return [os.path.join(folder, f"{i:05d}.jpg") for i in range(n)]


def store_for(spec):
    cache = FeatureCache(tempfile.mkdtemp())
    return _stores(cache, [spec], "avg", "torch", "fp32", "cpu", "torchvision", {})


def run_pipeline(paths, spec) -> float:
    stores = store_for(spec)
    t0 = time.perf_counter()
    op.one_pass(paths, [spec], stores, VIEWS, lambda s: NoopEngine(), device="cpu", batch_size=64)
    return time.perf_counter() - t0


def stub_decoding():
    import torch

    def fake(self, work, reads):
        names = {n for _, pps in work for n, _ in pps}
        x = torch.zeros(len(work), 8, 8, 3, dtype=torch.uint8)
        return [None] * len(work), {n: (list(range(len(work))), x) for n in names}

    op.TorchvisionPool.decode_crops = fake
    op.check_read = lambda data, path: None


OLD_TABLE = (
    "CREATE TABLE features (image TEXT NOT NULL, view TEXT NOT NULL, vec BLOB NOT NULL,"
    " PRIMARY KEY (image, view)) WITHOUT ROWID"
)  # the stores' table before the rowid layout (4 KB pages)


def stages(paths, layout: str) -> dict[str, float]:
    """Seconds of each store stage over ``paths``, one thread, on a new store of ``layout``."""
    path = os.path.join(tempfile.mkdtemp(), "store.sqlite")
    if layout == "before":
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(OLD_TABLE)
    store = FeatureStore(path, 1280)
    t0 = time.perf_counter()
    hs = [op.read_hashed(p)[0] for p in paths]
    out = {"read + hash": time.perf_counter() - t0}
    f = np.zeros((64, 1280), np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(hs), 64):
        store.put_many([(h, v, x) for v in VIEWS for h, x in zip(hs[s : s + 64], f)])
    out["put_many (2 views x 1280 floats)"] = time.perf_counter() - t0
    for name, fn in (("missing", store.missing), ("get_many", store.get_many)):
        t0 = time.perf_counter()
        for s in range(0, len(hs), 64):
            for v in VIEWS:
                fn(hs[s : s + 64], v)
        out[f"{name} (2 views, a full store)"] = time.perf_counter() - t0
    store.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "one-pass-tiny"))
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "one_pass_ceiling.md"))
    args = ap.parse_args()
    paths = images(args.folder, args.n)
    spec = resolve("lite0")
    rows = []
    for label in ("pipeline", "without decoding"):
        if label == "without decoding":
            stub_decoding()
        run_pipeline(paths, spec)  # warm-up: page cache, torch
        dt = min(run_pipeline(paths, spec) for _ in range(2))
        rows.append(f"| {label} | {args.n / dt:,.0f} img/s | {dt / args.n * 1e6:.0f} us |")
    for layout in ("before", "now"):
        for name, dt in stages(paths, layout).items():
            rows.append(f"| {name}, {layout} (alone, one thread) | {args.n / dt:,.0f} img/s | "
                        f"{dt / args.n * 1e6:.1f} us |")  # fmt: skip
    text = "\n".join([
        f"- Date: {today()}. Machine: {machine()}; CPU flags: {cpu_flags()}. "
        f"Load average at start: {os.getloadavg()[0]:.2f}.",
        f"- {args.n} generated 64 x 48 JPEGs, lite0 store, views orig+flip, batch 64, in-loop, "
        "best of 2 after a warm-up.", "",
        "| what | rate | per image |", "| --- | ---: | ---: |", *rows,
    ])  # fmt: skip
    write_results(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
