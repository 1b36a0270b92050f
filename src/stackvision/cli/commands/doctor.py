"""``stackvision doctor``: what is wrong with my data.

Likely label errors, near-duplicates and train/--val leaks, outliers and class problems, found on
the cached features (extracted if missing). Prints a summary; with --out writes doctor.json,
doctor.csv (edit its action column, then: train --exclude doctor.csv) and report.html.
"""

from __future__ import annotations

import contextlib
import os

from .. import options as opt
from ..display import report_problems, say, table

#: rows shown per table in the terminal (all are in doctor.json / doctor.csv)
SHOWN = 15


def add_arguments(p) -> None:
    opt.add_labelled_data(p, required=False)
    p.add_argument("--val", metavar="DATA", help="validation/test folder: searched for leaks")
    opt.add_out(p, "DIR", "folder for doctor.json, doctor.csv and report.html", required=False)
    opt.add_exclude(p)
    opt.add_backbone_options(p)
    opt.add_tta(p, "use original+flipped features for the out-of-fold heads")
    p.add_argument(
        "--folds", type=int, default=5, help="folds of the out-of-fold heads (default: 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the folds (default: 0)")
    p.add_argument(
        "--from-shards",
        metavar="DIR",
        help="examine a sharded feature set (extract --export-shards), streamed from disk, for "
        "features larger than memory; DATA, if given, names the rows by their files",
    )
    p.add_argument(
        "--val-shards",
        metavar="DIR",
        help="with --from-shards: the validation set's shards (extract VAL --export-shards DIR, "
        "same backbones), searched for leaks and outliers",
    )
    opt.add_runtime_options(p)


def _short(path: str, width: int = 48) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3) :]


def _print(args, d) -> None:
    s = d.summary()
    say(args, f"doctor: {s['n_train']:,} training image(s)"
              + (f", {s['n_val']:,} validation image(s)" if s["n_val"] else "")
              + f", {len(d.classes)} classes ({d.stats['seconds']:.1f} s on the features)")  # fmt: skip
    for g in d.leaks:
        say(args, f"LEAK: near-duplicates across train and val (score {g['score']}): "
                  + ", ".join(f"{p} [{sp}]" for p, sp in zip(g["paths"], g["splits"])))  # fmt: skip
    if d.leaks:
        say(args, f"LEAKS: {len(d.leaks)} group(s) of images on both sides of train/val: "
                  "validation scores are inflated until they are removed")  # fmt: skip
    if d.label_issues:
        say(args, f"\nlikely label errors: {len(d.label_issues)} (most certain first)")
        rows = [{"path": _short(x["path"]), "given": x["given_label"], "suggested": x["suggested_label"],
                 "p_given": x["given_prob"], "p_top": x["top_prob"]} for x in d.label_issues[:SHOWN]]  # fmt: skip
        say(args, table(rows, ["path", "given", "suggested", "p_given", "p_top"]))
    dups = [g for g in d.groups if not g["leak"]]
    if dups:
        say(args, f"\nnear-duplicate groups: {len(dups)}")
        rows = [{"group": g["group"], "files": len(g["paths"]), "score": g["score"],
                 "paths": ", ".join(_short(p, 40) for p in g["paths"][:3])} for g in dups[:SHOWN]]  # fmt: skip
        say(args, table(rows, ["group", "files", "score", "paths"]))
    if d.outliers:
        say(args, f"\noutliers: {len(d.outliers)}")
        rows = [{"path": _short(o["path"]), "label": o["label"], "density_z": o["density_z"],
                 "nearest_class": o["nearest_class"]} for o in d.outliers[:SHOWN]]  # fmt: skip
        say(args, table(rows, ["path", "label", "density_z", "nearest_class"]))
    if d.class_problems:
        say(args, f"\nclass problems: {len(d.class_problems)}")
        rows = [{"problem": c["kind"], "classes": " / ".join(c["classes"]), "evidence": c["detail"]}
                for c in d.class_problems[:SHOWN]]  # fmt: skip
        say(args, table(rows, ["problem", "classes", "evidence"]))
    if not (d.label_issues or d.groups or d.outliers or d.class_problems):
        say(args, "nothing found")


def run(args) -> int:
    from ...data import check_trainable
    from ...doctor import examine
    from ...errors import StackvisionError

    if args.folds < 2:
        raise StackvisionError(
            f"--folds {args.folds}: the doctor needs out-of-fold predictions",
            "use --folds 2 or more",
        )
    if args.val_shards and not args.from_shards:
        raise StackvisionError(
            "--val-shards goes with --from-shards", "add --from-shards TRAIN_SHARDS, or use --val"
        )
    if args.out:
        opt.check_out(args, "doctor", opt.data_inputs(args))
    if args.from_shards:
        return _run_shards(args)
    data = opt.listing(args)
    check_trainable(data.labels, 1)
    if getattr(args, "corrections", None):
        c = args.corrections
        say(args, f"corrections from {c['file']}: {c['excluded']} left out, {c['relabelled']} relabelled")  # fmt: skip
    d = examine(
        data.paths,
        data.labels,
        val=opt.validation_data(args),
        backbones=opt.backbone_list(args.backbones),
        weights=dict(args.weights or []),
        tta=args.tta,
        pool=args.pool,
        runtime=opt.runtime(args, precision=args.precision or "fp32"),
        folds=args.folds,
        seed=args.seed,
    )
    problems = data.problems + d.problems
    report_problems(problems, args)
    _print(args, d)
    _write(args, d, problems, data.source)
    return 0


def _run_shards(args) -> int:
    from ...cache import content_hash
    from ...doctor_shards import diagnose_shards
    from ...errors import StackvisionError
    from ...images import ImageDecodeError, read_bytes

    if (args.val and not args.val_shards) or args.exclude:
        raise StackvisionError(
            "--from-shards examines the shards' rows only",
            "export the validation set as shards too and pass --val-shards DIR (--val then "
            "names its rows); drop --exclude",
        )
    files = list(opt.listing(args).paths) if args.data or args.labels else []
    files += (opt.validation_data(args) or ([], []))[0]
    by_hash = {}
    for p in files:  # name the rows by their files
        with contextlib.suppress(ImageDecodeError):  # unreadable: left unnamed
            by_hash.setdefault(content_hash(read_bytes(p)), p)
    d = diagnose_shards(
        args.from_shards,
        folds=args.folds,
        seed=args.seed,
        paths_by_hash=by_hash,
        val_path=args.val_shards,
    )
    _print(args, d)
    _write(args, d, [], args.from_shards)
    return 0


def _write(args, d, problems, source) -> None:
    if args.out:
        from ...atomic import atomic_dir
        from ...doctor_output import write_doctor_dir

        extra = {"data": source, "val": args.val, "backbones": args.backbones,
                 "problems": [p.__dict__ for p in problems]}  # fmt: skip
        with atomic_dir(args.out) as tmp:
            write_doctor_dir(d, tmp, extra, title=f"stackvision doctor: {source}")
        say(args, f"\nwritten: {os.path.join(args.out, 'doctor.csv')} (edit the action column, then "
                  f"`stackvision train ... --exclude {os.path.join(args.out, 'doctor.csv')}`), "
                  f"doctor.json, report.html")  # fmt: skip
