"""Corrections fed back to training: ``train --exclude FILE`` (and ``finetune``, ``doctor``).

``FILE`` is a CSV with at least the columns ``path`` and ``action`` (``doctor.csv``, edited): rows
with ``action`` ``exclude`` leave the image out; ``relabel`` gives it ``suggested_label`` (or a
``label`` column); ``keep`` or an empty action changes nothing. Paths are matched after resolving
(``realpath``), so a CSV written with ``../data/x.jpg`` applies to a run given ``/abs/data``.

Refused, naming the CSV line: a missing ``path``/``action`` column, an unknown action, an
``exclude``/``relabel`` row whose path is not in the data (the CSV belongs to other data, or the
file moved), a ``relabel`` to a class the data does not have, two different relabels of one
image. ``exclude`` wins over ``relabel`` for the same image.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, replace

from .data import Listing, read_text
from .errors import StackvisionError

ACTIONS = ("exclude", "relabel", "keep", "")


@dataclass
class Corrections:
    exclude: set[str]  # real paths
    relabel: dict[str, tuple[str, int]]  # real path -> (new label, CSV line)
    source: str
    lines: dict[str, int]  # real path -> first CSV line naming it with an action


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


def read_corrections(path: str) -> Corrections:
    """Parse the CSV; only its own consistency is checked here (see :func:`apply_corrections`)."""
    if not os.path.isfile(path):
        raise StackvisionError(f"--exclude {path}: no such file", "give the doctor.csv you edited")
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("path", "action") if c not in cols]
    if missing:
        raise StackvisionError(
            f"--exclude {path} has no column {' or '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(cols) or 'none'})",
            "use the doctor.csv written by `stackvision doctor` (columns path,...,action)",
        )
    base = os.path.dirname(os.path.abspath(path))
    out = Corrections(set(), {}, path, {})
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        action = row.get("action", "").lower()
        if action not in ACTIONS:
            raise StackvisionError(
                f"{path} line {line}: unknown action {row.get('action')!r}",
                "use exclude, relabel or keep",
            )
        if action in ("", "keep"):
            continue
        p = row.get("path", "")
        if not p:
            raise StackvisionError(f"{path} line {line}: empty path", "give the image's path")
        # relative: to the working folder (as doctor wrote it), else to the CSV's folder
        rel_to_csv = not os.path.isabs(p) and not os.path.lexists(p)
        real = _real(os.path.join(base, p) if rel_to_csv else p)
        out.lines.setdefault(real, line)
        if action == "exclude":
            out.exclude.add(real)
            continue
        label = row.get("label") or row.get("suggested_label", "")
        if not label:
            raise StackvisionError(
                f"{path} line {line}: relabel without a label", "fill suggested_label"
            )
        prev = out.relabel.get(real)
        if prev and prev[0] != label:
            raise StackvisionError(
                f"{path} line {line}: {p} relabelled {label!r} here and {prev[0]!r} on line {prev[1]}",
                "keep one relabel row per image",
            )
        out.relabel[real] = (label, line)
    return out


def apply_corrections(listing: Listing, path: str) -> tuple[Listing, dict]:
    """The listing with the CSV's exclusions and relabels applied, and what changed."""
    c = read_corrections(path)
    real = [_real(p) for p in listing.paths]
    known = set(real)
    unknown = [p for p in list(c.exclude) + list(c.relabel) if p not in known]
    if unknown:
        first = min(unknown, key=lambda p: c.lines[p])
        raise StackvisionError(
            f"{path} line {c.lines[first]}: {first} is not in the data "
            f"({len(unknown)} such row(s))",
            "use the CSV doctor wrote for this data (or set those rows' action to keep)",
        )
    classes = set(listing.labels or [])
    for label, line in c.relabel.values():
        if label not in classes:
            raise StackvisionError(
                f"{path} line {line}: relabel to {label!r}, which is not a class of the data",
                f"use one of: {', '.join(sorted(classes)[:10])}" + (" ..." if len(classes) > 10 else ""),
            )  # fmt: skip
    paths, labels, changed = [], [], 0
    for p, r, lab in zip(listing.paths, real, listing.labels or [None] * len(real)):
        if r in c.exclude:
            continue
        if r in c.relabel and c.relabel[r][0] != lab:
            lab, changed = c.relabel[r][0], changed + 1
        paths.append(p)
        labels.append(lab)
    n_ex = len(listing.paths) - len(paths)
    new = replace(listing, paths=paths, labels=labels if listing.labels is not None else None)
    return new, {"file": path, "excluded": n_ex, "relabelled": changed}
