"""Augmented training views (``train_views``), side by side with the same stack without them.

Every row trains the default stack (fine-grained, flip TTA, 5 folds, logreg + LDA) on the same
features and splits twice: ``train_views=0`` and ``train_views=K`` (K random-resized crops of each
training image as extra head rows), and scores both on the same held-out images:

* ``cub86``: train on ``cub86/train``, score on ``cub86/val``;
* ``flowers5``: the stratified 70/30 split of ``accuracy_features.py`` (seed 0);
* ``imagewoof``: train on ``imagewoof/train``, score on ``imagewoof/val``.

The first fit with views extracts them (cached afterwards): its time is printed apart.
``--cost N``: the extraction cost of the views beside orig+flip, side by side, cold cache, on N
cub86 training images (in-loop, ``extract``).

    PYTHONPATH=src .venv/bin/python benchmarks/train_views.py --cache /work/bench/cache
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SHARED_DATA, cold_extract_seconds, cpu_flags, machine, today, write_table  # noqa: E402
from accuracy_features import datasets, fit_and_score  # noqa: E402
from stackvision import Runtime, StackedClassifier  # noqa: E402
from stackvision.backbones import DEFAULT_STACK, resolve  # noqa: E402
from stackvision.data import from_folder  # noqa: E402
from stackvision.train_views import view_names  # noqa: E402


def fit_score(data, cache, k):
    model = StackedClassifier(train_views=k, runtime=Runtime(cache_dir=cache))
    m, t_fit, n_test = fit_and_score(model, data)
    return {"accuracy": m["accuracy"], "log_loss": m["log_loss"], "fit_s": t_fit, "n_test": n_test,
            "lda": model.head_params_.get("lda", 0.0)}  # fmt: skip


def cost(n, engines, rounds=2):
    """{views: [seconds]} to extract n cub86 images, cold feature cache each time, the warm
    engine folder ``engines`` linked in."""
    paths = from_folder(os.path.join(SHARED_DATA, "cub86", "train")).paths[:n]
    specs = [resolve(s) for s in DEFAULT_STACK]
    out = {"orig+flip": [], "rrc35.1+rrc35.2": []}
    for _ in range(rounds):
        for name, views in (("orig+flip", ("orig", "flip")), ("rrc35.1+rrc35.2", view_names(2))):
            out[name].append(cold_extract_seconds(paths, specs, views, engines))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--data", nargs="+", default=["cub86", "flowers5", "imagewoof"])
    ap.add_argument("--cost", type=int, default=0, metavar="N")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "train_views.md"))
    args = ap.parse_args()
    lines = [f"- Date: {today()}. Machine: {machine()}; CPU flags: {cpu_flags()}.",
             f"- Load average at start: {os.getloadavg()}."]  # fmt: skip
    if args.cost:
        c = cost(args.cost, os.path.join(args.cache, "engines"))
        lines.append(f"- Extraction, {args.cost} cub86 images, default stack, cold feature cache, "
                     f"warm engines, in-loop, alternated: " + "; ".join(
                         f"{k}: {', '.join(f'{s:.1f} s' for s in v)}" for k, v in c.items()))  # fmt: skip
    sets = datasets(args.data)
    rows = []
    for name, data in sets.items():
        first = fit_score(data, args.cache, args.k)  # extracts the views (cached after)
        before = fit_score(data, args.cache, 0)
        after = fit_score(data, args.cache, args.k)
        rows.append({
            "data": name, "test images": after["n_test"],
            "acc": f"{before['accuracy']:.4f}", "log loss": f"{before['log_loss']:.4f}",
            f"+{args.k} views acc": f"{after['accuracy']:.4f}",
            f"+{args.k} views log loss": f"{after['log_loss']:.4f}",
            "Δacc (points)": f"{100 * (after['accuracy'] - before['accuracy']):+.2f}",
            "fit s (cached: 0 / K; first with K)":
                f"{before['fit_s']:.0f} / {after['fit_s']:.0f}; {first['fit_s']:.0f}",
        })  # fmt: skip
        print(rows[-1], flush=True)
    write_table(args.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
