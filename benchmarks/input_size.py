"""Input size of the stack's backbones (issue 12, point 2, at the stack level): the default
stack (``fine-grained``: lite0@256, lite1@272, lite2@288) against the same readout at larger
inputs, side by side on the same splits, and the extraction cost of each.

Every row trains the stack (flip TTA, 5 folds, logreg + LDA, mean-logit averaging) on
cached features and scores the fold ensemble on the same held-out images:

* ``cub86``: train on ``cub86/train``, score on ``cub86/val``;
* ``flowers5``: the stratified 70/30 split of ``accuracy_features.py`` (seed 0);
* ``imagewoof``: train on ``imagewoof/train``, score on ``imagewoof/val``.

``--best``: one more row per data set, what ``--preset best`` makes of the two stacks alone
(``fit_best`` without fine-tuned members: ``fine-grained``, then ``fine-grained-large`` as a
second member, the ``best`` ensemble chosen on its 20% hold-out H), scored on the same test images.

Fill the cache first (``stackvision extract DATA --backbones B --cache C``): a missing feature
is extracted by the fit, whose time then includes it. ``--cost N``: cold-cache extraction of N
cub86 training images for each stack, orig+flip, warm engines, in-loop, alternated.

    PYTHONPATH=src .venv/bin/python benchmarks/input_size.py --cache /work/bench/cache --cost 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    SHARED_DATA,
    cold_extract_seconds,
    cpu_flags,
    machine,
    md_table,
    today,
    write_table,
)
from accuracy_features import _gflops, datasets, fit_and_score, test_metrics  # noqa: E402
from stackvision import Runtime, StackedClassifier  # noqa: E402
from stackvision.backbones import DEFAULT_STACK, resolve  # noqa: E402
from stackvision.best_pipeline import fit_best  # noqa: E402
from stackvision.data import from_folder  # noqa: E402
from stackvision.readout import expand_named  # noqa: E402

STACKS = {
    "classic (224/240/260, avg)": "classic",
    "fine-grained (256/272/288)": "fine-grained",
    "320/336/352": "lite0@320+gem+mid2,lite1@336+gem+mid2,lite2@352+gem+mid2",
    "384/400/416": "lite0@384+gem+mid2,lite1@400+gem+mid2,lite2@416+gem+mid2",
}


def names(spec: str) -> list[str]:
    return expand_named([s.strip() for s in spec.split(",")])


def cost(n, engines, stacks, rounds=2):
    """{label: [seconds]} to extract n cub86 images (orig+flip) with each stack, cold feature
    cache each time, the warm engine folder ``engines`` linked in, stacks alternated."""
    paths = from_folder(os.path.join(SHARED_DATA, "cub86", "train")).paths[:n]
    out = {label: [] for label in stacks}
    for _ in range(rounds):
        for label, spec in stacks.items():
            specs = [resolve(s) for s in names(spec)]
            out[label].append(cold_extract_seconds(paths, specs, ("orig", "flip"), engines))
    return out


def best_row(name, data, cache) -> dict:
    """``--preset best`` on the training part, the stacks only (no fine-tuned member)."""
    (trp, trl), (tep, tel) = data
    t0 = time.perf_counter()
    res = fit_best(list(trp), list(trl), stack_params={"backbones": list(DEFAULT_STACK)},
                   time_limit=3 * 3600, runtime=Runtime(cache_dir=cache), say=lambda m: None,
                   ft_members=())  # fmt: skip
    t_fit = time.perf_counter() - t0
    m, n_test = test_metrics(res.model, list(tep), tel)
    chosen = res.steps[-1].step if res.steps[-1].step.startswith(("+ both", "+ ens")) else "-"
    return {"data": name, "stack": f"--preset best, stacks only: {chosen}",
            "test images": n_test, "accuracy": f"{m['accuracy']:.4f}",
            "log loss": f"{m['log_loss']:.4f}", "fit s": f"{t_fit:.0f}"}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--data", nargs="+", default=["cub86", "flowers5", "imagewoof"])
    ap.add_argument("--stacks", nargs="+", default=list(STACKS), help="labels of STACKS")
    ap.add_argument("--cost", type=int, default=0, metavar="N")
    ap.add_argument("--best", action="store_true", help="add the --preset best row (stacks only)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "input_size.md"))
    args = ap.parse_args()
    stacks = {k: STACKS[k] for k in args.stacks}
    lines = [f"- Date: {today()}. Machine: {machine()}; CPU flags: {cpu_flags()}.",
             f"- Load average at start: {os.getloadavg()}."]  # fmt: skip
    rows = []
    if args.cost:
        c = cost(args.cost, os.path.join(args.cache, "engines"), stacks)
        base = min(c[next(iter(c))])
        for label, secs in c.items():
            gflops = sum(_gflops(resolve(n), "avg") for n in names(stacks[label]))
            rows.append({"stack": label, "GFLOPs/img/view": f"{gflops:.2f}",
                         "seconds (rounds)": ", ".join(f"{s:.1f}" for s in secs),
                         f"x {next(iter(c))}": f"{min(secs) / base:.2f}"})  # fmt: skip
        lines += ["", f"Extraction, {args.cost} cub86 images, orig+flip, cold feature cache, "
                  "warm engines, in-loop, alternated (best round):", "", md_table(rows, list(rows[0]))]  # fmt: skip
    rows = []
    for name, data in datasets(args.data).items():
        for label, spec in stacks.items():
            model = StackedClassifier(spec, runtime=Runtime(cache_dir=args.cache))
            m, t_fit, n_test = fit_and_score(model, data)
            rows.append({"data": name, "stack": label, "test images": n_test,
                         "accuracy": f"{m['accuracy']:.4f}", "log loss": f"{m['log_loss']:.4f}",
                         "fit s": f"{t_fit:.0f}"})  # fmt: skip
            print(rows[-1], flush=True)
        if args.best:
            rows.append(best_row(name, data, args.cache))
            print(rows[-1], flush=True)
    write_table(args.out, lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
