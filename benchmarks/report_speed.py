"""How long the report takes, and how big it gets, for 120 classes and a few thousand images.

Real images (cub86 train + val, the first ``--images``) spread over ``--classes`` class names, with
simulated probabilities (each class confused with a few neighbours, so there are real confusion
pairs). Times ``report.write_report`` in the loop (median of ``--repeat`` calls, each into a fresh
folder) against the report of ``git show REF:src/stackvision/report.py`` (the one before issue
13) on the same inputs, and records the folder size and the largest image. Writes
``benchmarks/results/report_speed.md`` and the ``report-speed`` section of BENCHMARKS.md.

    python benchmarks/report_speed.py                  # 120 classes x 3000 images, ref main
    python benchmarks/report_speed.py --classes 200 --images 5000 --ref HEAD~5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import ROOT, SHARED_DATA, cpu_description, md_table, today, write_section

sys.path.insert(0, os.path.join(ROOT, "src"))


def inputs(n_classes: int, n_images: int, seed: int = 0):
    from stackvision.metrics import classification_metrics

    cub = os.path.join(SHARED_DATA, "cub86")
    paths = sorted(
        os.path.join(d, f)
        for split in ("train", "val")
        for d, _, fs in os.walk(os.path.join(cub, split))
        for f in fs
    )[:n_images]
    rng = np.random.default_rng(seed)
    classes = [
        f"species_{i:03d}_{os.path.basename(os.path.dirname(paths[i]))}" for i in range(n_classes)
    ]
    y = np.arange(len(paths)) % n_classes
    logits = rng.normal(0, 1, (len(paths), n_classes))
    logits[np.arange(len(y)), y] += 3.0
    for shift in (1, 2, 7):  # each class looks a bit like three others
        logits[np.arange(len(y)), (y + shift) % n_classes] += rng.normal(1.2, 1.0, len(y))
    proba = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba /= proba.sum(axis=1, keepdims=True)
    metrics = {"validation": "5-fold out-of-fold", **classification_metrics(y, proba, classes)}
    metrics["folds"] = [
        {"fold": k + 1, "n_images": len(y) // 5, "accuracy": metrics["accuracy"] + 0.01 * (k - 2),
         "top5_accuracy": metrics["top5_accuracy"], "log_loss": metrics["log_loss"],
         "macro_f1": metrics["macro_f1"]}
        for k in range(5)
    ]  # fmt: skip
    return paths, y, proba, classes, metrics


def old_report(ref: str):
    """The report module at git ``ref``, imported inside the stackvision package."""
    src = subprocess.run(
        ["git", "show", f"{ref}:src/stackvision/report.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(), "report_before.py")
    with open(path, "w") as fh:
        fh.write(src)
    import stackvision  # noqa: F401 - the package the relative imports resolve in

    spec = importlib.util.spec_from_file_location("stackvision.report_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(write, args, repeat: int) -> dict:
    from PIL import Image

    times, folder = [], None
    for _ in range(repeat):
        folder = tempfile.mkdtemp(prefix="report-bench-")
        t = time.perf_counter()
        write(os.path.join(folder, "report"), *args)
        times.append(time.perf_counter() - t)
    out = os.path.join(folder, "report")
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    pngs = [Image.open(f).size for f in files if f.endswith(".png")]
    return {
        "median s": statistics.median(times),
        "min s": min(times),
        "files": len(files),
        "folder MB": sum(os.path.getsize(f) for f in files) / 1e6,
        "largest PNG (px)": "x".join(map(str, max(pngs, key=lambda s: s[0] * s[1]))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=120)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ref", default="main", help="git ref of the report to compare with")
    a = ap.parse_args()
    from stackvision.report import write_report

    paths, y, proba, classes, metrics = inputs(a.classes, a.images)
    args = (metrics, paths, y, proba, classes)
    write_report(tempfile.mkdtemp(), *args)  # imports (matplotlib, scipy) out of the timing
    rows = [
        {"report": "issue 13 (this tree)", **measure(write_report, args, a.repeat)},
        {"report": f"before ({a.ref})", **measure(old_report(a.ref).write_report, args, a.repeat)},
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cols = ["report", "median s", "min s", "files", "folder MB", "largest PNG (px)"]
    body = (
        f"## Report for {a.classes} classes and {len(paths):,} images (issue 13)\n\n"
        f"- Machine: {cpu_description()}; date {today()}; "
        f"**in-loop** (`write_report` only, imports done), median of {a.repeat}; "
        f"load average at the end {load} (the 2 cores shared with other jobs: compare the two "
        "rows, measured side by side, not the seconds)\n"
        f"- Command: `python benchmarks/report_speed.py --classes {a.classes} --images {a.images} "
        f"--ref {a.ref}`\n"
        "- Inputs: real cub86 JPEGs, simulated probabilities (each class confused with three "
        "others).\n\n" + md_table(rows, cols) + "\n"
    )
    print(body)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "report_speed.md"), "w") as fh:
        fh.write(body)
    write_section("report-speed", body)


if __name__ == "__main__":
    main()
