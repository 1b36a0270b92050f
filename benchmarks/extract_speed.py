"""Feature-extraction speed on a CPU: the plain way a user writes it vs stackvision fp32 / int8.

For each backbone, on the same images (imagewoof val), alternating the methods round by round:

1. plain: timm eager model, PIL decode + timm eval transform, a Python loop of batches of 32;
2. stackvision fp32: ``stackvision.extract.extract`` with a fresh, empty feature cache (hashing,
   decode threads, the ``auto`` engine, cache writes -- the whole pipeline);
3. stackvision int8: the same with ``precision="int8"`` (calibrated on 300 of the images);
4. stackvision bf16 (OpenVINO), where the CPU computes it natively.

Each round also re-measures the fp32 engine's model-only throughput (a pre-decoded uint8 batch),
so "end to end / model-only" compares runs made minutes apart, not a figure from the start.

Also: model-only throughput of each engine (a pre-decoded uint8 batch, no decoding), so the
pipeline's share is visible; the int8 and bf16 accuracy cost (5-fold logistic regression on the extracted
features, pretrained backbones only); peak RSS for extracting 1,000 vs 10,000 images (lite0, each
in a subprocess). One-off costs (ONNX export, int8 calibration) are timed separately: they are paid
once per backbone and cached on disk.

    python benchmarks/extract_speed.py                      # full size (slow on 2 cores)
    python benchmarks/extract_speed.py --n-images 128 --backbones lite0 --rss-sizes 64,256
    python benchmarks/extract_speed.py --whole-process --rounds 3   # benchmarks/extract_process.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import cpu_description as machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagewoof"
RESULTS = REPO / "benchmarks" / "results" / "extract_speed.md"


def image_list(n: int, splits: tuple[str, ...] = ("val",)) -> list[str]:
    files = sorted(
        str(p)
        for s in splits
        for p in (DATA / s).rglob("*")
        if p.suffix.lower() in (".jpeg", ".jpg", ".png")
    )
    if n >= len(files):
        return files
    step = len(files) / n  # evenly spread over the classes
    return [files[int(i * step)] for i in range(n)]


def resolve_spec(name: str, tmp: str):
    from stackvision.backbones import resolve

    if name == "timm:inception_v3":  # random init, loadable offline
        import timm
        import torch

        path = os.path.join(tmp, "inception_v3_random.pth")
        if not os.path.exists(path):
            torch.manual_seed(0)
            torch.save(timm.create_model("inception_v3", pretrained=False).state_dict(), path)
        return resolve(name, weights={name: path}), False
    return resolve(name), True


def patched_extract(cache_root: str, calibration=None):
    """``extract`` with ``create_engine`` given a fixed engines dir and the calibration set."""
    import stackvision.extract as ex
    from stackvision.engines import create_engine

    def run(*args, **kwargs):
        orig = ex.create_engine

        def make(spec, **kw):
            # extract() draws the same calibration set from the same images (by content hash),
            # so the quantised model made before timing is found in the shared engines dir.
            if kw.get("calibration") is None and calibration and kw.get("precision") == "int8":
                kw["calibration"] = calibration(spec)
            # Shared engines dir, so the one-off export/calibration is not timed every run.
            kw["cache_dir"] = cache_root
            return create_engine(spec, **kw)

        ex.create_engine = make
        try:
            return ex.extract(*args, **kwargs)
        finally:
            ex.create_engine = orig

    return run


# ------------------------------------------------------------------------------------------------


def plain(spec, paths: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """What a user writes: timm model, timm transform, PIL, a loop of batches."""
    import timm.data
    import torch
    from PIL import Image

    from stackvision.backbones import build_model

    model = build_model(spec, "avg")  # = timm.create_model(arch, pretrained=True, num_classes=0)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    t = time.perf_counter()
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack(
                [transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]]
            )
            out.append(model(x).numpy())
    return len(paths) / (time.perf_counter() - t), np.concatenate(out)


def pipeline(spec, paths, batch_size, engine, precision, engines_root, calibration):
    from stackvision.cache import FeatureCache

    run = patched_extract(engines_root, calibration)
    with tempfile.TemporaryDirectory(prefix="svbench-cache-") as fresh:
        cache = FeatureCache(fresh)
        t = time.perf_counter()
        feats = run(
            paths,
            [spec],
            cache=cache,
            engine=engine,
            precision=precision,
            batch_size=batch_size,
            device="cpu",
        )
        dt_ = time.perf_counter() - t
        cache.close()
    return len(paths) / dt_, feats.blocks[spec.name][:, 0]


def model_only(eng, batch: np.ndarray, reps: int) -> float:
    eng.features(batch)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        eng.features(batch)
    return reps * len(batch) / (time.perf_counter() - t)


def plain_model_only(spec, batch: np.ndarray, reps: int) -> float:
    import torch

    from stackvision.backbones import build_model

    model = build_model(spec, "avg")
    x = torch.from_numpy(spec.preprocess.normalize(batch))
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
    return reps * len(batch) / (time.perf_counter() - t)


def cv_accuracy(x: np.ndarray, labels: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, x, labels, cv=cv).mean())


def rss_child(n: int, backbone: str, engine: str) -> None:
    """Subprocess body: extract n images (train+val) into a fresh cache, print peak RSS."""
    from stackvision.backbones import resolve
    from stackvision.cache import FeatureCache

    paths = image_list(n, ("train", "val"))
    spec = resolve(backbone)
    with tempfile.TemporaryDirectory(prefix="svbench-rss-") as fresh:
        cache = FeatureCache(fresh)
        t = time.perf_counter()
        patched_extract(os.environ["SVBENCH_ENGINES"])(
            paths, [spec], cache=cache, engine=engine, device="cpu"
        )
        seconds = time.perf_counter() - t
        cache.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": len(paths), "peak_rss_mb": round(rss_mb, 1), "seconds": seconds}))


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--backbones", default="lite0,lite2,timm:inception_v3")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; median reported")
    ap.add_argument("--engine", default="auto", help="engine for the stackvision runs")
    ap.add_argument("--model-reps", type=int, default=4, help="batches timed per model-only run")
    ap.add_argument("--rss-sizes", default="1000,10000", help="'' to skip the RSS runs")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.rss_child:
        rss_child(args.rss_child, "lite0", args.engine)
        return

    import torch

    from stackvision.engines import Calibration, create_engine, resolve_engine

    load_start = os.getloadavg()[0]
    torch.set_num_threads(os.cpu_count() or 1)  # the plain way uses torch's default, all cores
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    paths = image_list(args.n_images)
    labels = [Path(p).parent.name for p in paths]
    work = tempfile.mkdtemp(prefix="svbench-")
    engines_root = os.path.join(work, "root")  # exported / quantised models, shared by rounds
    picked = resolve_engine(args.engine, "cpu")
    picked8 = None if args.no_int8 else resolve_engine(args.engine, "cpu", "int8")
    print(f"{len(paths)} images, engine {args.engine} -> {picked} (int8: {picked8})", flush=True)

    calib_cache: dict = {}

    def calibration(spec):
        if spec.name not in calib_cache:
            calib_cache[spec.name] = Calibration.from_images(paths, spec)
        return calib_cache[spec.name]

    rows, model_rows, acc_rows = [], [], []
    for name in names:
        spec, pretrained = resolve_spec(name, work)
        print(f"== {name} ({spec.architecture})", flush=True)
        # One-off costs, before timing: ONNX export and int8 calibration (cached on disk).
        t = time.perf_counter()
        fp32 = create_engine(spec, engine=picked, device="cpu", cache_dir=engines_root)
        t_export = time.perf_counter() - t
        t_quant, int8 = None, None
        if picked8:
            t = time.perf_counter()
            int8 = create_engine(
                spec,
                engine=picked8,
                device="cpu",
                precision="int8",
                calibration=calibration(spec),
                cache_dir=engines_root,
            )
            t_quant = time.perf_counter() - t
        print(f"   export+compile {t_export:.1f}s, int8 calibration {t_quant}", flush=True)

        # Model-only throughput on a real pre-decoded batch.
        from stackvision.images import load_rgb

        pp = spec.preprocess
        batch = np.stack(
            [pp.to_uint8(load_rgb(p, pp.resize_size)) for p in paths[: args.batch_size]]
        )
        mo = {"plain torch eager (NCHW)": plain_model_only(spec, batch, args.model_reps)}
        mo["torch engine (channels-last)"] = model_only(
            create_engine(spec, engine="torch", device="cpu"), batch, args.model_reps
        )
        for e in ("onnx", "openvino"):
            try:
                eng = fp32 if e == picked else create_engine(spec, engine=e, cache_dir=engines_root)
                mo[f"{e} fp32"] = model_only(eng, batch, args.model_reps)
            except Exception as exc:  # engine not installed
                print(f"   {e}: {exc}")
        if "openvino" in (picked, picked8):
            try:
                bf = create_engine(
                    spec, engine="openvino", precision="bf16", cache_dir=engines_root
                )
                mo["openvino bf16"] = model_only(bf, batch, args.model_reps)
            except Exception as exc:
                print(f"   bf16: {exc}")
        if int8 is not None:
            mo[f"{picked8} int8 ({int8.numbers_id.split('-')[1]})"] = model_only(
                int8, batch, args.model_reps
            )
        for k, v in mo.items():
            print(f"   model-only {k}: {v:.1f} img/s", flush=True)
            model_rows.append((name, k, v))
        del int8
        has_bf16 = "openvino bf16" in mo

        # End to end, alternating; the fp32 engine's model-only rate is re-measured in every round,
        # next to its end-to-end run, so their ratio is not skewed by the machine's drift.
        kinds = ["plain", "model-only", "fp32"] + (["int8"] if picked8 else [])
        kinds += ["bf16"] if has_bf16 else []
        speeds: dict[str, list[float]] = {k: [] for k in kinds}
        ratios: list[float] = []
        feats = {}
        for r in range(args.rounds):
            s, feats["plain"] = plain(spec, paths, args.batch_size)
            speeds["plain"].append(s)
            speeds["model-only"].append(model_only(fp32, batch, args.model_reps))
            s, feats["fp32"] = pipeline(
                spec, paths, args.batch_size, picked, "fp32", engines_root, calibration
            )
            speeds["fp32"].append(s)
            ratios.append(s / speeds["model-only"][-1])
            for prec, eng_name in (("int8", picked8), ("bf16", "openvino")):
                if prec in speeds:
                    s, feats[prec] = pipeline(
                        spec, paths, args.batch_size, eng_name, prec, engines_root, calibration
                    )
                    speeds[prec].append(s)
            print(
                f"   round {r}: "
                + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items())
                + f" img/s; fp32 end to end / model-only {ratios[-1]:.0%}",
                flush=True,
            )
        del fp32
        med = {k: statistics.median(v) for k, v in speeds.items() if v}
        med["ratio"] = statistics.median(ratios)
        diff = float(np.abs(feats["fp32"] - feats["plain"]).max() / np.abs(feats["plain"]).max())
        rows.append((name, med, t_export, t_quant, diff))
        print(f"   max |fp32 - plain| / max |plain| = {diff:.2e}", flush=True)
        if pretrained:
            a32 = cv_accuracy(feats["fp32"], labels)
            for prec in ("int8", "bf16"):
                if prec not in feats:
                    continue
                f32, fl = feats["fp32"], feats[prec]
                cos = (f32 * fl).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(fl, axis=1))
                alow = cv_accuracy(fl, labels)
                acc_rows.append((name, prec, a32, alow, float(cos.mean())))
                print(f"   5-fold LR accuracy fp32 {a32:.4f} {prec} {alow:.4f}", flush=True)

    # Peak RSS, each size in its own process.
    rss_rows = []
    for n in [int(s) for s in args.rss_sizes.split(",") if s.strip()]:
        env = {**os.environ, "SVBENCH_ENGINES": engines_root}
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--engine", args.engine]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode or not line:
            print(f"   rss run {n} failed: {res.stderr[-2000:]}")
            continue
        got = json.loads(line[-1])
        rss_rows.append(got)
        print(f"   peak RSS extracting {got['n']} images: {got['peak_rss_mb']} MB", flush=True)

    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]
    )
    lines = [
        "## Feature extraction speed on a CPU",
        "",
        f"Machine: {machine()}. Date: {dt.date.today().isoformat()}. "
        f"torch {torch.__version__}, {comp_versions()}.",
        f"Command: `{cmd}`",
        "",
        f"{len(paths)} imagewoof val images, batch {args.batch_size}, {args.rounds} round(s) "
        f"alternating plain / fp32 model-only / fp32 / int8 / bf16 (median). Stackvision engine: `{args.engine}` -> "
        f"{picked}, int8 -> {picked8}. Inception v3 is at random init (timing only). "
        f"1-min load average at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} "
        f"(anything above ~0.2 means other jobs shared the {os.cpu_count()} cores).",
        "",
        "### End to end (decode + model + cache writes), images/s",
        "",
        "| backbone | plain timm loop | stackvision fp32 | fp32/plain | fp32 model-only "
        "| fp32 end to end / model-only | stackvision int8 | int8/plain | stackvision bf16 "
        "| bf16/plain | one-off export | one-off int8 calibration "
        "| max abs diff fp32 vs plain / max abs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def rate(med, k):
        return (f"{med[k]:.1f}", f"{med[k] / med['plain']:.2f}x") if k in med else ("-", "-")

    for name, med, te, tq, diff in rows:
        tq_s = f"{tq:.1f} s" if tq is not None else "-"
        cells = [name, f"{med['plain']:.1f}", *rate(med, "fp32")]
        cells += [f"{med['model-only']:.1f}", f"{med['ratio']:.0%}"]
        cells += [*rate(med, "int8"), *rate(med, "bf16"), f"{te:.1f} s", tq_s, f"{diff:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Model only (pre-decoded uint8 batch, no decoding), images/s, measured once before "
        "the rounds",
        "",
        "| backbone | engine | img/s |",
        "|---|---|---:|",
        *[f"| {n} | {k} | {v:.1f} |" for n, k, v in model_rows],
    ]
    if acc_rows:
        lines += [
            "",
            "### Accuracy cost of int8 and bf16 (5-fold logistic regression on the extracted "
            "features)",
            "",
            "| backbone | precision | fp32 acc | its acc | cost (points) | mean cosine vs fp32 |",
            "|---|---|---:|---:|---:|---:|",
            *[
                f"| {n} | {p} | {a:.4f} | {b:.4f} | {100 * (a - b):+.2f} | {c:.4f} |"
                for n, p, a, b, c in acc_rows
            ],
        ]
    if rss_rows:
        lines += [
            "",
            "### Peak RSS, extracting lite0 features (imagewoof train+val), fresh cache",
            "",
            "| images | peak RSS | seconds |",
            "|---:|---:|---:|",
            *[f"| {r['n']} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} |" for r in rss_rows],
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}")


@functools.cache
def comp_versions() -> str:
    out = []
    for mod in ("onnxruntime", "openvino", "nncf"):
        try:
            m = __import__(mod)
            out.append(f"{mod} {getattr(m, '__version__', '?').split('-')[0]}")
        except ImportError:
            pass
    return ", ".join(out)


if __name__ == "__main__":
    rest = [a for a in sys.argv[1:] if a != "--whole-process"]
    if len(rest) < len(sys.argv) - 1:  # the CLI vs a plain script, each a fresh process
        sys.exit(__import__("extract_process").main(rest))
    main()
