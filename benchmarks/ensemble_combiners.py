"""Combiners with many classes: mean, weighted, calibrated, stacked and best on cub86 (86 classes).

Members: two feature stacks trained on cub86/train (cached features of the shared cache):
``lite0`` alone and ``lite1+lite2``, logreg, 3 folds, flip TTA, calibrated. Every row is scored
on cub86/val (2,496 images none of the members saw): members directly, combiners 5-fold
out-of-fold on val (fit on 4/5, score the other 1/5), as ``stackvision ensemble`` does.

    PYTHONPATH=src .venv/bin/python benchmarks/ensemble_combiners.py --cache /work/bench/cache
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import SHARED_DATA, cpu_description, md_table, today


def main() -> int:
    from stackvision import Runtime, StackedClassifier
    from stackvision.data import from_folder
    from stackvision.ensemble import EnsembleClassifier

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="/work/bench/cache")
    ap.add_argument("--data", default=os.path.join(SHARED_DATA, "cub86"))
    args = ap.parse_args()
    rt = Runtime(device="cpu", cache_dir=args.cache, progress=False)
    tr = from_folder(os.path.join(args.data, "train"))
    va = from_folder(os.path.join(args.data, "val"))
    members = []
    for bbs in (["lite0"], ["lite1", "lite2"]):
        t0 = time.perf_counter()
        m = StackedClassifier(bbs, folds=3, tta="flip", runtime=rt).fit(tr.paths, tr.labels)
        print(f"member {'+'.join(bbs)}: {time.perf_counter() - t0:.0f} s", flush=True)
        members.append(m)
    rows = []
    for method in ("mean", "weighted", "calibrated", "stacked", "best"):
        t0 = time.perf_counter()
        ens = EnsembleClassifier(members, method=method, folds=5, runtime=rt)
        ens.fit(va.paths, va.labels)
        secs = time.perf_counter() - t0
        if not rows:
            rows += [{**r, "seconds": None} for r in ens.table_[:2]]
        chosen = f" ({ens.selection_.name})" if ens.selection_ else ""
        rows.append({**ens.table_[-1], "model": ens.table_[-1]["model"] + chosen,
                     "seconds": round(secs, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"\n{cpu_description()}; load average {load}; {today()}; {' '.join(sys.argv)}")
    print(md_table(rows, ["model", "scored", "n_images", "accuracy", "log_loss", "seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
