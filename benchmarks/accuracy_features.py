"""Better frozen features (issue 12, points 1-4): mid-level stages, input size, pooling, head auto.

Every row is trained and scored on the same splits:

* ``cub86``: train on ``cub86/train`` (5-fold heads), score the fold ensemble on ``cub86/val``;
* ``flowers5``: a stratified 70/30 split of all images, seed 0 (``validation.holdout_split``).

Rows: lite0 alone (baseline avg, gem, +mid2, @256, gem+mid2, @256+gem+mid2, head auto) and the
stacks (default, ``fine-grained``, each with head auto). One view (no flip TTA) to keep the sweep
within the machine's budget; the cache is content-keyed, so filling it first with
``stackvision extract ... --tta none`` (any engine) makes this script train heads only.

Extraction cost per backbone configuration is measured in-loop: OpenVINO fp32, batch 32 of
pre-decoded cub86 images, best of 3 passes, every configuration measured in one process one after
the other (so the ratios to plain lite0 compare like with like on a loaded machine).

    PYTHONPATH=src .venv/bin/python benchmarks/accuracy_features.py --cache /work/bench/cache
    ... --only lite0 --no-timing --out /tmp/x.md     # a quick subset
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ROOT, SHARED_DATA, machine, md_table, today, write_section  # noqa: E402
from stackvision import Runtime, StackedClassifier  # noqa: E402
from stackvision.backbones import CLASSIC_STACK, FINE_GRAINED, resolve  # noqa: E402
from stackvision.data import from_folder  # noqa: E402
from stackvision.metrics import classification_metrics  # noqa: E402
from stackvision.validation import holdout_split  # noqa: E402

# (row label, backbones, pool, head)
ROWS = [
    ("lite0 (baseline: avg, 224)", ["lite0"], "avg", "logreg"),
    ("lite0 gem", ["lite0"], "gem", "logreg"),
    ("lite0 +mid2", ["lite0"], "avg+mid2", "logreg"),
    ("lite0 gem+mid2", ["lite0"], "gem+mid2", "logreg"),
    ("lite0@256", ["lite0@256"], "avg", "logreg"),
    ("lite0@256 gem+mid2", ["lite0@256"], "gem+mid2", "logreg"),
    ("lite0 head auto", ["lite0"], "avg", "auto"),
    ("stack (default: lite0,lite1,lite2 avg)", list(CLASSIC_STACK), "avg", "logreg"),
    ("stack, head auto", list(CLASSIC_STACK), "avg", "auto"),
    ("stack gem+mid2 (native sizes)", list(CLASSIC_STACK), "gem+mid2", "logreg"),
    ("fine-grained (@256/272/288 gem+mid2)", list(FINE_GRAINED), "avg", "logreg"),
    ("fine-grained, head auto", list(FINE_GRAINED), "avg", "auto"),
]


def datasets(which):
    out = {}
    if "cub86" in which:
        tr = from_folder(os.path.join(SHARED_DATA, "cub86", "train"))
        va = from_folder(os.path.join(SHARED_DATA, "cub86", "val"))
        out["cub86"] = ((tr.paths, tr.labels), (va.paths, va.labels))
    if "flowers5" in which:
        fl = from_folder(os.path.join(SHARED_DATA, "flowers5"))
        y = np.unique(fl.labels, return_inverse=True)[1]
        tr, te = holdout_split(y, 0.3, seed=0)
        pick = lambda idx: ([fl.paths[i] for i in idx], [fl.labels[i] for i in idx])  # noqa: E731
        out["flowers5"] = (pick(tr), pick(te))
    if "imagewoof" in which:  # the no-regression set: train -> val
        tr = from_folder(os.path.join(SHARED_DATA, "imagewoof", "train"))
        va = from_folder(os.path.join(SHARED_DATA, "imagewoof", "val"))
        out["imagewoof"] = ((tr.paths, tr.labels), (va.paths, va.labels))
    return out


def fit_and_score(model, data) -> tuple[dict, float, int]:
    """Fit ``model`` on ``data``'s training part, score it on the test part: (metrics, fit
    seconds, test images)."""
    (trp, trl), (tep, tel) = data
    t0 = time.perf_counter()
    model.fit(trp, trl)
    t_fit = time.perf_counter() - t0
    m, n_test = test_metrics(model, tep, tel)
    return m, t_fit, n_test


def test_metrics(model, paths, labels) -> tuple[dict, int]:
    """A fitted ``model`` scored on ``paths`` with ``labels``: (metrics, images scored)."""
    pred = model.predict_paths(paths)
    index = {c: i for i, c in enumerate(model.classes_)}
    label = dict(zip(paths, labels))
    y = np.asarray([index[label[p]] for p in pred.paths])
    return classification_metrics(y, pred.proba, model.classes_), len(y)


def score(row, data, cache):
    _, backbones, pool, head = row
    model = StackedClassifier(backbones, pool=pool, head=head, tta="none", folds=5,
                              runtime=Runtime(cache_dir=cache))  # fmt: skip
    m, t_fit, n_test = fit_and_score(model, data)
    sel = model.head_selection_
    return {
        "accuracy": round(m["accuracy"], 4),
        "log_loss": round(m["log_loss"], 4),
        "n_test": n_test,
        "feature_dim": int(sum(s.feature_dim for s in model.specs_)),
        "fit_seconds": round(t_fit, 1),
        "head": f"{sel['kind']} {sel['params']}" if sel else head,
        "extracted": model.extract_stats_["n_computed"],
    }


def extraction_cost(names, pools, cache=None, n=32, repeats=3):
    """In-loop ms/image (OpenVINO fp32, batch n, best of ``repeats``) per (name, pool)."""
    from PIL import Image

    from stackvision.engines import create_engine

    cub = from_folder(os.path.join(SHARED_DATA, "cub86", "val")).paths[:n]
    out = {}
    for name, pool in zip(names, pools):
        spec = resolve(name, pool=pool)
        batch = np.stack([spec.preprocess.to_uint8(Image.open(p).convert("RGB")) for p in cub])
        eng = create_engine(spec, pool=pool, engine="openvino", cache_dir=cache)
        eng.features(batch)
        best = min(_timed(eng.features, batch) for _ in range(repeats))
        out[f"{name} {pool}"] = {"ms": round(1000 * best / n, 2), "gflops": _gflops(spec, pool)}
    return out


def _gflops(spec, pool) -> float:
    """Forward FLOPs of one image (torch's FlopCounterMode): a load-independent cost."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stackvision.backbones import build_model

    model, s = build_model(spec, pool), spec.preprocess.input_size
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, s, s))
    return round(fc.get_total_flops() / 1e9, 3)


def _timed(fn, x):
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--cache", default=None, help="feature cache (fill it first, see above)")
    ap.add_argument("--data", nargs="+", default=["cub86", "flowers5"])
    ap.add_argument("--only", help="only rows whose label matches this regular expression")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--redo", action="store_true", help="measure again rows already in --json")
    ap.add_argument("--out", help="markdown file for the section (default: BENCHMARKS.md)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "accuracy_features.json"))  # fmt: skip
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if not args.only or re.search(args.only, r[0])]
    data = datasets(args.data)
    old = {}
    if os.path.exists(args.json) and not args.redo:  # rows already measured are kept
        with open(args.json) as fh:
            old = json.load(fh)
    done = {r["row"]: r for r in old.get("rows", [])}
    load0 = os.getloadavg()
    for row in rows:
        res = done.setdefault(row[0], {"row": row[0]})
        res.update(backbones=row[1], pool=row[2], head=row[3])
        for name, d in data.items():
            if name not in res:
                res[name] = score(row, d, args.cache)
                print(row[0], name, res[name], flush=True)
                _save(args.json, {**old, "rows": _ordered(done)})
    results = _ordered(done)
    cost = old.get("extraction_ms_per_image", {})
    if not args.no_timing:
        pairs = [("lite0", "avg"), ("lite0", "gem"), ("lite0", "avg+mid2"), ("lite0", "gem+mid2"),
                 ("lite0@256", "avg"), ("lite0@256", "gem+mid2"), ("lite1", "avg"),
                 ("lite1", "gem+mid2"), ("lite1@272", "gem+mid2"), ("lite2", "avg"),
                 ("lite2", "gem+mid2"), ("lite2@288", "gem+mid2")]  # fmt: skip
        cost = extraction_cost([p[0] for p in pairs], [p[1] for p in pairs], args.cache)
        print(cost)
    load1 = os.getloadavg()
    doc = {"machine": machine(), "date": today(), "load": [load0, load1], "rows": results,
           "extraction_ms_per_image": cost}  # fmt: skip
    _save(args.json, doc)
    body = render(doc, " ".join(sys.argv))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(body)
    else:
        write_section("features", body)


def _ordered(done: dict) -> list[dict]:
    order = [r[0] for r in ROWS]
    return sorted(done.values(), key=lambda r: order.index(r["row"]) if r["row"] in order else 99)


def _save(path: str, doc: dict) -> None:
    """Write ``doc``, keeping rows/datasets another run of this script wrote meanwhile."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as fh:
            disk = {r["row"]: r for r in json.load(fh).get("rows", [])}
        for r in doc["rows"]:
            disk[r["row"]] = {**disk.get(r["row"], {}), **r}
        doc = {**doc, "rows": _ordered(disk)}
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(path + ".tmp", path)


def render(doc, command) -> str:
    stack = next((r for r in doc["rows"] if r["row"].startswith("stack (default")), None)
    table = []
    for r in doc["rows"]:
        base = doc["rows"][0] if r["row"].startswith("lite0") or stack is None else stack
        line = {"row": r["row"]}
        for ds in ("cub86", "flowers5"):
            if ds in r:
                d, b = r[ds], base.get(ds)
                line[f"{ds} acc"] = f"{100 * d['accuracy']:.2f}"
                line[f"{ds} log loss"] = f"{d['log_loss']:.3f}"
                if b:
                    line[f"{ds} Δacc"] = f"{100 * (d['accuracy'] - b['accuracy']):+.2f}"
        line["dims"] = next(r[ds]["feature_dim"] for ds in ("cub86", "flowers5") if ds in r)
        heads = {ds: r[ds]["head"] for ds in ("cub86", "flowers5") if ds in r}
        one = len(set(heads.values())) == 1
        line["head"] = (
            next(iter(heads.values()))
            if one
            else "; ".join(f"{ds}: {h}" for ds, h in heads.items())
        )
        table.append(line)
    cost = doc["extraction_ms_per_image"]

    def plain(k):  # "lite1@272 gem+mid2" -> "lite1 avg"
        return k.split("@")[0].split(" ")[0] + " avg"

    cost_rows = [
        {"backbone readout": k, "GFLOPs/img": v["gflops"], "x plain (FLOPs)":
         f"{v['gflops'] / cost[plain(k)]['gflops']:.2f}", "ms/img in-loop (loaded)": v["ms"]}
        for k, v in cost.items() if isinstance(v, dict)
    ]  # fmt: skip
    return "\n".join(
        [
            "## Better frozen features (issue 12, points 1-4): readout, input size, head auto",
            "",
            f"Machine: {doc['machine']}; CPU flags include {_flags()}. Date {doc['date']}. Load average (1/5/15 min) at start "
            f"{'/'.join(f'{x:.1f}' for x in doc['load'][0])}, at end "
            f"{'/'.join(f'{x:.1f}' for x in doc['load'][1])} (the machine is shared).",
            f"Command: `{command}` (cache filled first with `stackvision extract DATA --backbones B "
            "--tta none`, see the script's docstring).",
            "",
            "One view (no flip TTA), 5-fold logreg heads (C 0.02) unless `head auto`, temperature "
            "calibrated; cub86: train -> val (2,496 images); flowers5: stratified 70/30 split, seed 0 "
            "(1,295 test images). Δacc: points vs the first row (lite0 rows) or vs the default stack.",
            "",
            md_table(table, list(table[0])),
            "",
            "Extraction cost per backbone configuration: forward FLOPs of one image (torch "
            "FlopCounterMode, independent of load) and in-loop time (OpenVINO fp32, batch 32 of "
            "decoded cub86 images, best of 3, all in one process; the machine was loaded, so the "
            "times are noisy). x plain = ratio to the same backbone at its own size, avg pooling:",
            "",
            md_table(cost_rows, list(cost_rows[0])) if cost_rows else "(not measured)",
            "",
            _notes(),
        ]
    )


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return ", ".join(f for f in keep if f in flags) or "none of avx2/avx512"


def _notes() -> str:
    """Findings written by a person after reading the tables (kept beside the JSON)."""
    path = os.path.join(ROOT, "benchmarks", "results", "accuracy_features_notes.md")
    if not os.path.exists(path):
        return ""
    with open(path) as fh:
        return fh.read().strip()


if __name__ == "__main__":
    main()
