"""How decoding (read + JPEG decode + resize/crop to uint8) scales with threads and processes.

On a GPU the network is much faster than the decoding, so this is what bounds extraction there.
Images: ``--images`` (searched deeply); ``--n`` of them, repeated if there are fewer.

    python benchmarks/decode_scaling.py --images ../shared/data/imagewoof/val --n 2000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from stackvision.images import load_rgb
from stackvision.preprocess import Preprocess


def _one(args):
    path, pp = args
    return pp.to_uint8(load_rgb(path, pp.resize_size))


def _chunk(args):
    paths, pp = args
    return [pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--processes", default="4,16")
    args = ap.parse_args()
    files = sorted(
        str(p) for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")
    )
    paths = (files * (args.n // len(files) + 1))[: args.n]
    pp = Preprocess(224, 0.875)  # lite0: resize to 256, centre crop 224, bicubic
    print(f"{len(paths)} images, {os.cpu_count()} cores")
    for t in [int(x) for x in args.threads.split(",") if x]:
        with ThreadPoolExecutor(t) as ex:
            s = time.perf_counter()
            for _ in ex.map(_one, [(p, pp) for p in paths]):
                pass
            print(
                f"threads {t:>3}: {len(paths) / (time.perf_counter() - s):8.0f} img/s", flush=True
            )
    for n in [int(x) for x in args.processes.split(",") if x]:
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(n, mp_context=ctx) as ex:
            list(ex.map(_chunk, [(paths[:2], pp)] * n))  # start the workers
            s = time.perf_counter()
            chunks = [(paths[i : i + 16], pp) for i in range(0, len(paths), 16)]
            for _ in ex.map(_chunk, chunks):
                pass
            print(
                f"procs   {n:>3}: {len(paths) / (time.perf_counter() - s):8.0f} img/s", flush=True
            )


if __name__ == "__main__":
    main()
