"""Scaling benchmark: the local runner vs the Ray runner, and a simulation of the sharded cache.

Part 1 (extraction): the same imagewoof images through ``lite0`` (one view), a cold feature cache
for each configuration: the local runner, then Ray with 1 actor (1 and 2 torch threads) and with 2
actors (1 thread each), all on one local Ray cluster.

Part 2 (storage): a sharded feature set of generated features for the default 3-backbone stack
(3 x 1280 dims, 2 views) written with :class:`ShardWriter`, then read back sequentially, block
shuffled (what a streaming head does each epoch) and streamed through one logreg epoch; the
figures are extrapolated to 10M images.

    PYTHONPATH=src python benchmarks/ray_scale.py --images 300 --sim-rows 40000 \
        --out benchmarks/results/ray_scale.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WOOF = os.path.join(ROOT, "..", "shared", "data", "imagewoof", "train")


def woof_images(n: int) -> list[str]:
    """``n`` images, round-robin over the imagewoof classes (a fixed, sorted selection)."""
    per = {c: sorted(os.listdir(os.path.join(WOOF, c))) for c in sorted(os.listdir(WOOF))}
    out, k = [], 0
    while len(out) < n:
        for c, files in per.items():
            if k < len(files) and len(out) < n:
                out.append(os.path.join(WOOF, c, files[k]))
        k += 1
    return out


def bench_extract(paths, batch_size: int) -> list[dict]:
    import ray
    import torch

    from stackvision.backbones import resolve
    from stackvision.cache import FeatureCache
    from stackvision.extract import extract
    from stackvision.runners.ray_runner import extract_ray

    specs = [resolve("lite0")]
    rows = []

    def run(label, fn):
        root = tempfile.mkdtemp(prefix="sv-bench-cache-")
        t0 = time.perf_counter()
        feats = fn(FeatureCache(root))
        wall = time.perf_counter() - t0
        st = feats.stats
        assert st["n_computed"] == len(paths) - st["n_bad"], st
        rows.append(
            {
                "runner": label,
                "images": st["n_computed"],
                "wall_s": round(wall, 1),
                "img_per_s_wall": round(st["n_computed"] / wall, 2),
                "hash_s": st["hash_seconds"],
                "compute_s": st["compute_seconds"],
                "img_per_s_compute": st["images_per_second"],
                "load_1min": round(os.getloadavg()[0], 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(root, ignore_errors=True)

    run(
        f"local (2 decode threads, torch {torch.get_num_threads()} threads)",
        lambda c: extract(paths, specs, cache=c, batch_size=batch_size, workers=2),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each Ray CPU actor runs with
    run(
        "local (2 decode threads, torch 1 thread)",
        lambda c: extract(paths, specs, cache=c, batch_size=batch_size, workers=2),
    )
    torch.set_num_threads(threads)
    # 3 logical CPUs on 2 cores: room for 2 actors plus the decode tasks (0.5 CPU each).
    t0 = time.perf_counter()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter() - t0
    for actors, cpus in ((1, 1), (1, 2), (2, 1)):
        run(
            f"ray, {actors} actor(s) x {cpus} thread(s)",
            lambda c, a=actors, k=cpus: extract_ray(
                paths, specs, cache=c, batch_size=batch_size, actors=a, cpus_per_actor=k
            ),
        )
    ray.shutdown()
    # Again at the end: the machine is shared, so the first local figure may have met other load.
    run(
        f"local again, torch {torch.get_num_threads()} threads (after the Ray runs)",
        lambda c: extract(paths, specs, cache=c, batch_size=batch_size, workers=2),
    )
    rows.append({"runner": "ray.init (local cluster start-up)", "wall_s": round(start, 1)})
    return rows


def bench_stages(paths) -> dict:
    """Single-thread decode rate (read + decode + resize/crop, lite0 input) and the feature cache's
    write rate (SQLite rows/s, one transaction per 256 rows): the two driver/CPU-side limits."""
    from stackvision.backbones import resolve
    from stackvision.cache import FeatureCache, store_fields
    from stackvision.decoding import decode_item

    specs = [resolve("lite0")]
    pps = [(s.name, s.preprocess) for s in specs]
    t0 = time.perf_counter()
    for p in paths:
        decode_item(p, pps)
    t_dec = time.perf_counter() - t0
    root = tempfile.mkdtemp(prefix="sv-bench-sqlite-")
    store = FeatureCache(root).store(store_fields(specs[0], "avg", "fp32"), 1280)
    n = 20000
    vec = np.random.default_rng(0).standard_normal((256, 1280)).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(0, n, 256):
        store.put_many((f"{i + j:032x}", "orig", vec[j]) for j in range(min(256, n - i)))
    t_sql = time.perf_counter() - t0
    t0 = time.perf_counter()
    hs = [f"{i:032x}" for i in range(n)]
    for i in range(0, n, 4096):
        store.get_many(hs[i : i + 4096], "orig")
    t_get = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    return {
        "decode_img_per_s_per_core": round(len(paths) / t_dec, 1),
        "sqlite_put_rows_per_s": round(n / t_sql),
        "sqlite_get_rows_per_s": round(n / t_get),
    }


def bench_shards(n_rows: int, rows_per_shard: int, out_dir: str) -> dict:
    from stackvision.shards import ShardedFeatures, ShardWriter
    from stackvision.streaming import fit_streaming

    dims, views, n_classes = (1280, 1280, 1280), ("orig", "flip"), 120
    names = ["lite0", "lite1", "lite2"]
    rng = np.random.default_rng(0)
    shutil.rmtree(out_dir, ignore_errors=True)
    w = ShardWriter(
        out_dir,
        [{"name": b, "dim": d} for b, d in zip(names, dims)],
        views,
        classes=[f"c{k}" for k in range(n_classes)],
        rows_per_shard=rows_per_shard,
    )
    step = 2048
    t_gen = 0.0
    t0 = time.perf_counter()
    for i in range(0, n_rows, step):
        n = min(step, n_rows - i)
        g0 = time.perf_counter()
        blocks = {b: rng.standard_normal((n, 2, d), dtype=np.float32) for b, d in zip(names, dims)}
        y = rng.integers(0, n_classes, n)
        t_gen += time.perf_counter() - g0
        w.add([f"{i + j:032x}" for j in range(n)], blocks, y)
    w.close()
    subprocess.run(["sync"], check=False)
    t_write = time.perf_counter() - t0 - t_gen
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)

    f = ShardedFeatures(out_dir)
    t0 = time.perf_counter()
    for _ in f.chunks(chunk_rows=8192):
        pass
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in f.chunks(chunk_rows=8192, rng=np.random.default_rng(1)):
        pass
    t_shuf = time.perf_counter() - t0
    # One streaming logreg epoch over a quarter of the rows (the training loop's real cost).
    y = f.labels().astype(np.int64)
    sub = np.arange(len(f) // 4)
    tr, va = sub[: int(len(sub) * 0.9)], sub[int(len(sub) * 0.9) :]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared machine makes multi-threaded torch spin
    t0 = time.perf_counter()
    fit_streaming(f, y, "logreg", {"epochs": 1, "batch_size": 1024}, tr, va, n_classes)
    t_epoch = time.perf_counter() - t0
    torch.set_num_threads(threads)
    bytes_per_row = size / n_rows
    return {
        "rows": n_rows,
        "shards": f.n_shards,
        "rows_per_shard": rows_per_shard,
        "dim": f.dim,
        "views": len(views),
        "bytes": size,
        "bytes_per_row": round(bytes_per_row),
        "write_rows_per_s": round(n_rows / t_write),
        "write_MB_per_s": round(size / t_write / 1e6),
        "seq_read_rows_per_s": round(n_rows / t_seq),
        "seq_read_MB_per_s": round(size / t_seq / 1e6),
        "shuffled_read_rows_per_s": round(n_rows / t_shuf),
        "logreg_epoch_rows_per_s_1_thread": round(len(sub) / t_epoch),
    }


def extrapolate(ext: list[dict], sh: dict, stages: dict, n_images: int = 10_000_000) -> dict:
    per_actor = max(
        r["img_per_s_compute"] for r in ext if r["runner"].startswith("ray, 1 actor(s) x 1")
    )
    tb = sh["bytes_per_row"] * n_images / 1e12
    return {
        "images": n_images,
        "cpu_actor_img_per_s": per_actor,
        "cpu_actor_hours_lite0_one_view": round(n_images / per_actor / 3600),
        # lite0+lite1+lite2 cost ~(0.41+0.63+0.90)/0.41 GFLOPs of lite0, x2 views (flip TTA)
        "cpu_actor_hours_lite012_flip": round(n_images * 9.5 / per_actor / 3600),
        "decode_core_hours": round(n_images / stages["decode_img_per_s_per_core"] / 3600, 1),
        # 3 backbones x 2 views rows, one driver writing
        "sqlite_driver_write_hours": round(
            n_images * 6 / stages["sqlite_put_rows_per_s"] / 3600, 2
        ),
        "shard_TB": round(tb, 2),
        "shard_write_hours_one_writer": round(n_images / sh["write_rows_per_s"] / 3600, 2),
        "epoch_hours_one_reader": round(
            n_images / sh["logreg_epoch_rows_per_s_1_thread"] / 3600, 2
        ),
    }


def markdown(ext, stages, sh, ex, cmd, n_paths) -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?"
    )
    import ray
    import torch

    lines = [
        "# Ray scaling benchmark",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- machine: {model}, {os.cpu_count()} CPUs (shared with other work), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"ray {ray.__version__}",
        f"- command: `{cmd}`",
        "",
        f"## Extraction: {n_paths} imagewoof images, lite0, one view, cold cache each",
        "",
        "| runner | images | wall s | img/s (wall) | hash s | compute s | img/s (compute)"
        " | load avg (1 min) at end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in ext:
        lines.append(
            f"| {r['runner']} | {r.get('images', '')} | {r['wall_s']} | {r.get('img_per_s_wall', '')}"
            f" | {r.get('hash_s', '')} | {r.get('compute_s', '')} | {r.get('img_per_s_compute', '')}"
            f" | {r.get('load_1min', '')} |"
        )
    lines += [
        "",
        "## Stage rates (one thread)",
        "",
        "| figure | value |",
        "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in stages.items()),
        "",
        f"## Sharded cache simulation: {sh['rows']} generated rows (3 x 1280 dims, 2 views)",
        "",
        "| figure | value |",
        "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in sh.items()),
        "",
        "## Extrapolation to 10M images",
        "",
        "| figure | value |",
        "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in ex.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sim-rows", type=int, default=40000)
    ap.add_argument("--rows-per-shard", type=int, default=8192)
    ap.add_argument("--sim-dir", default=os.path.join(tempfile.gettempdir(), "sv-shard-sim"))
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--out", help="write the results as Markdown here")
    args = ap.parse_args()
    cmd = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    paths = woof_images(args.images)
    ext = [] if args.skip_extract else bench_extract(paths, args.batch_size)
    stages = bench_stages(paths)
    print(json.dumps(stages), flush=True)
    sh = bench_shards(args.sim_rows, args.rows_per_shard, args.sim_dir)
    print(json.dumps(sh), flush=True)
    shutil.rmtree(args.sim_dir, ignore_errors=True)
    ex = extrapolate(ext, sh, stages) if ext else {}
    print(json.dumps(ex), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(markdown(ext, stages, sh, ex, cmd, len(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
