"""Where the time goes when features are extracted on a GPU, stage by stage (issue 14, point 4).

Run on a CUDA machine. On ``--n-images`` distinct JPEGs (random crops of the images given, as in
``gpu_check.py``), for ``--backbone`` (lite0) on the torch engine:

1. each stage alone: file reads and content hashes on 1-16 threads; nvJPEG decoding only
   (``torchvision.io.decode_jpeg(list, device="cuda")``); libjpeg decoding on the CPU
   (``decode_jpeg(..., device="cpu")``) on 1-16 threads; the GPU resize and crop; the network on
   a host batch vs on a batch already on the GPU; the feature store's writes;
2. whether a stage holds the GIL: the rate of a pure-Python loop while the stage runs beside it;
3. ``extract(..., decoder=...)`` end to end, with the main thread's time split into network,
   store writes and waiting for decoded batches, and ``stackvision extract`` as whole processes;
4. prototype one-pass pipelines (``gpu_prototype.py``: reads and hashes stream into the decoder,
   crops stay on the GPU, store writes in their own thread, CUDA graphs...), each end to end.

``--device cpu`` runs the same code on the CPU (libjpeg instead of nvJPEG): a smoke test only.

    python benchmarks/gpu_pipeline.py --images ../shared/data/imagewoof/val --out gpu_pipeline.md
"""

# ruff: noqa: B023 - every lambda here is timed at once, inside its loop
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_common as gc  # noqa: E402
from gpu_check import listing, make_jpegs, section  # noqa: E402
from gpu_common import Graphed, forward, nvjpeg, rate, sync  # noqa: E402
from gpu_prototype import pipelines  # noqa: E402

warnings.filterwarnings("ignore")  # torchvision's TorchCodec notice, frombuffer's read-only note
THREADS = (1, 4, 8, 16)


def old_read(path: str) -> bytes:
    """read_bytes before this change: one ``read(limit + 1)``."""
    with open(path, "rb") as fh:
        return fh.read(512 * 1024 * 1024 + 1)


def stage_reads(paths):
    from stackvision.cache import content_hash
    from stackvision.images import read_bytes

    rows = ["| stage alone | threads | img/s |", "|---|---:|---:|"]
    for label, fn in [
        ("read, `read(limit + 1)` (before)", old_read),
        ("read, `read(size + 1)` (now)", read_bytes),
        ("read (now) + blake2b", lambda p: content_hash(read_bytes(p))),
    ]:
        for n in THREADS:
            with ThreadPoolExecutor(n) as ex:
                r = rate(len(paths), lambda: list(ex.map(fn, paths, chunksize=16)))
            rows.append(f"| {label} | {n} | {r:,.0f} |")
            print("  ", rows[-1], flush=True)
    return rows


def gil_probe(fn, seconds: float = 1.0) -> float:
    """Pure-Python loop iterations/s while ``fn`` runs repeatedly in a thread, over alone."""

    def spin(stop_at):
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
        return n

    alone = spin(time.perf_counter() + seconds)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            fn()

    th = threading.Thread(target=loop)
    th.start()
    time.sleep(0.05)
    beside = spin(time.perf_counter() + seconds)
    stop.set()
    th.join()
    return beside / alone


def stage_decode(paths, spec):
    import torch

    from stackvision.gpu_decode import resize_crop
    from stackvision.images import read_bytes

    datas = [read_bytes(p) for p in paths]
    pp = spec.preprocess
    rows = ["| stage alone | setting | img/s |", "|---|---|---:|"]
    nvjpeg(datas[:64])
    sync()
    for bs in (64, 256):
        batches = [datas[i : i + bs] for i in range(0, len(datas), bs)]

        def run():
            for b in batches:
                nvjpeg(b)
            sync()

        rows.append(f"| nvJPEG decode only | batch {bs} | {rate(len(datas), run):,.0f} |")
        print("  ", rows[-1], flush=True)
    for n in THREADS:
        with ThreadPoolExecutor(n) as ex:

            def cpu():
                list(ex.map(lambda d: nvjpeg([d], "cpu"), datas, chunksize=16))

            rows.append(
                f"| libjpeg decode on the CPU (torchvision) | {n} threads | {rate(len(datas), cpu):,.0f} |"
            )
            print("  ", rows[-1], flush=True)
    imgs = nvjpeg(datas[:256])
    stacked = torch.stack([i for i in imgs if i.shape == imgs[0].shape][:64])
    reps = 40

    def resize():
        for _ in range(reps):
            resize_crop(stacked, pp)
        sync()

    rows.append(
        f"| resize + crop on the GPU (one size) | batch {len(stacked)} | {rate(reps * len(stacked), resize):,.0f} |"
    )

    def resize_each():
        for _ in range(reps // 4):
            for im in stacked:
                resize_crop(im, pp)
        sync()

    rows.append(
        f"| resize + crop on the GPU, image by image | batch {len(stacked)} | {rate(reps // 4 * len(stacked), resize_each):,.0f} |"
    )
    crops = resize_crop(stacked, pp)

    def copy():
        for _ in range(reps):
            crops.cpu()

    rows.append(
        f"| crops to the host | batch {len(stacked)} | {rate(reps * len(stacked), copy):,.0f} |"
    )
    gil = [
        ("nvJPEG decode, batch 64", lambda: nvjpeg(datas[:64])),
        ("libjpeg decode on the CPU", lambda: nvjpeg(datas[:8], "cpu")),
        ("resize on the GPU", lambda: resize_crop(stacked, pp)),
        ("file read", lambda: [read_bytes(p) for p in paths[:16]]),
    ]
    rows += ["", "| beside a pure-Python loop | loop speed kept |", "|---|---:|"]
    for label, fn in gil:
        rows.append(f"| {label} | {gil_probe(fn):.0%} |")
    for r in rows[-len(gil) - 3 :]:
        print("  ", r, flush=True)
    return rows


def stage_model(paths, spec, work):
    import torch

    from stackvision.cache import FeatureStore
    from stackvision.engines import create_engine
    from stackvision.images import load_rgb

    pp = spec.preprocess
    eng = create_engine(spec, engine="torch", device=gc.DEVICE)
    rows = ["| stage alone | batch | img/s |", "|---|---:|---:|"]
    for bs in (64, 256):
        x = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths[:bs]])
        xd = torch.from_numpy(x).to(gc.DEVICE)
        eng.features(x)
        forward(eng, xd)
        sync()
        reps = 20
        rows.append(
            f"| network, host batch (`features`) | {bs} | {rate(reps * bs, lambda: [eng.features(x) for _ in range(reps)]):,.0f} |"
        )
        rows.append(
            f"| network, batch on the GPU | {bs} | {rate(reps * bs, lambda: [forward(eng, xd) for _ in range(reps)]):,.0f} |"
        )
        if gc.DEVICE != "cpu":
            g = Graphed(eng, bs)
            diff = float(np.abs(g(xd) - forward(eng, xd)).max())
            rows.append(
                f"| network, CUDA graph, host batch (max abs diff vs eager {diff:.1e}) | {bs} | {rate(reps * bs, lambda: [g(x) for _ in range(reps)]):,.0f} |"
            )
            rows.append(
                f"| network, CUDA graph, batch on the GPU | {bs} | {rate(reps * bs, lambda: [g(xd) for _ in range(reps)]):,.0f} |"
            )
    feats = eng.features(x[:64])
    store = FeatureStore(os.path.join(work, "w.sqlite"), spec.feature_dim)
    hs = [[f"{b:04d}-{i:03d}" for i in range(64)] for b in range(60)]
    rows.append(
        f"| store writes (`put_many`) | 64 | {rate(60 * 64, lambda: [store.put_many([(h, 'orig', f) for h, f in zip(b, feats)]) for b in hs]):,.0f} |"
    )
    store.close()
    for r in rows:
        print("  ", r, flush=True)
    return rows


def current_extract(paths, spec, work, bs):
    """``extract()`` as it is, with the main thread's time split up."""
    import stackvision.extract as ex
    from stackvision.cache import FeatureCache, FeatureStore
    from stackvision.engines.torch_engine import TorchEngine

    spent = {"network": 0.0, "store writes": 0.0}
    orig_f, orig_p = TorchEngine.features, FeatureStore.put_many

    def timed(key, fn):
        def wrap(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t

        return wrap

    rows = [
        "| decoder | batch | end to end img/s | hashing s | decode+model s "
        "| of which network s | store writes s | rest (waiting, glue) s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    TorchEngine.features = timed("network", orig_f)
    FeatureStore.put_many = timed("store writes", orig_p)
    try:
        runs = [("processes", bs)] + [("torchvision", b) for b in (32, bs, 128)] * 2
        for kind, b in runs:
            spent.update({"network": 0.0, "store writes": 0.0})
            with tempfile.TemporaryDirectory(dir=work) as c:
                t = time.perf_counter()
                f = ex.extract(paths, [spec], cache=FeatureCache(c), batch_size=b, decoder=kind)
                e2e = len(paths) / (time.perf_counter() - t)
            assert f.blocks[spec.name].shape == (len(paths), 1, spec.feature_dim)
            st = f.stats
            dm = st["compute_seconds"]
            rest = dm - spent["network"] - spent["store writes"]
            rows.append(
                f"| {kind} | {b} | {e2e:,.0f} | {st['hash_seconds']:.2f} | {dm:.2f} "
                f"| {spent['network']:.2f} | {spent['store writes']:.2f} | {rest:.2f} |"
            )
            print("  ", rows[-1], flush=True)
    finally:
        TorchEngine.features, FeatureStore.put_many = orig_f, orig_p
    return rows + ["", *whole_process(paths, work)]


def whole_process(paths, work):
    """``stackvision extract`` as a user runs it: a new process, cold feature cache."""
    import subprocess

    folder = os.path.dirname(paths[-1])
    rows = ["| whole process: `stackvision extract` (lite0, one view, new cache) | batch | s | img/s |",
            "|---|---:|---:|---:|"]  # fmt: skip
    for dec, b in [("auto", 32), ("auto", 128), ("processes", 32)] * 2:
        with tempfile.TemporaryDirectory(dir=work) as c:
            cmd = [sys.executable, "-m", "stackvision.cli", "extract", folder, "--backbones",
                   "lite0", "--tta", "none", "--cache", c, "--batch-size", str(b), "-q",
                   "--decoder", dec]  # fmt: skip
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            took = time.perf_counter() - t
        n = len(os.listdir(folder))
        ok = p.returncode == 0
        rows.append(
            f"| --decoder {dec}: {'ok' if ok else 'FAILED: ' + p.stderr[-300:]} ({n} files) | {b} | {took:.2f} | {n / took:,.0f} |"
        )
        print("  ", rows[-1], flush=True)
    return rows


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="a folder of real images (searched deeply)")
    ap.add_argument("--n-images", type=int, default=4000)
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="gpu_pipeline.md")
    ap.add_argument(
        "--skip", default="", help="comma-separated: reads,decode,model,extract,pipelines"
    )
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = ap.parse_args()
    gc.DEVICE = args.device
    if gc.DEVICE != "cpu" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return 2
    from stackvision.backbones import resolve

    work = tempfile.mkdtemp(prefix="sv-gpu-")
    os.environ.setdefault("STACKVISION_CACHE", os.path.join(work, "cache"))
    paths = make_jpegs(listing(args.images), args.n_images, os.path.join(work, "jpegs"))
    spec = resolve(args.backbone)
    lines = [
        "## GPU extraction, stage by stage",
        "",
        f"Device: {torch.cuda.get_device_name(0) if gc.DEVICE != 'cpu' else 'CPU'}, {os.cpu_count()} CPU cores. torch "
        f"{torch.__version__}. Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. "
        f"{len(paths)} JPEGs. Command: `python benchmarks/gpu_pipeline.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    skip = set(args.skip.split(","))
    steps = [
        ("reads", "file reads and hashes", lambda: stage_reads(paths)),
        ("decode", "decoding and resizing", lambda: stage_decode(paths, spec)),
        ("model", "network and store", lambda: stage_model(paths, spec, work)),
        (
            "extract",
            "extract() end to end",
            lambda: current_extract(paths, spec, work, args.batch_size),
        ),
        ("pipelines", "one-pass pipelines", lambda: pipelines(paths, spec, work, args.batch_size)),
    ]
    for key, title, fn in steps:
        if key not in skip:
            section(title, fn, lines)
            with open(args.out, "w") as fh:  # after each step: a time-out keeps what ran
                fh.write("\n".join(lines) + "\n")
    return 1 if any("FAILED:" in x for x in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
