"""Byte-identical training images: found by content hash, kept on one side of every split.

A copy of an image on both sides of a fold scores itself (8 files turned into 328 rows by a
symlink loop gave a cross-validated accuracy of 1.0). Each row gets a group id, the same for
identical bytes, which :mod:`stackvision.validation` splits on. The same bytes under two labels
cannot both be right: every copy is left out as a listed problem (an error under ``--strict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .data import Problem
from .errors import StackvisionError

#: at most this many duplicate sets are listed in ``metrics.json`` (all are counted)
MAX_LISTED = 100


@dataclass
class Duplicates:
    """What :func:`find_duplicates` found in one training set."""

    keep: np.ndarray  # rows to train on (conflicting labels left out)
    groups: np.ndarray  # group id of each kept row: equal for identical bytes
    sets: list[list[str]] = field(default_factory=list)  # paths of each set of copies (kept)
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "groups": len(self.sets),
            "files": sum(len(s) for s in self.sets),
            "extra_copies": sum(len(s) - 1 for s in self.sets),
            "sets": self.sets[:MAX_LISTED],
            "label_conflicts": len(self.problems),
        }


def find_duplicates(
    paths: Sequence[str], hashes: Sequence[str], labels: Sequence[str], *, strict: bool = False
) -> Duplicates:
    """Group rows by content hash; leave out (or, ``strict``, refuse) copies with two labels."""
    rows: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        rows.setdefault(h, []).append(i)
    drop: set[int] = set()
    problems: list[Problem] = []
    sets: list[list[str]] = []
    for idx in rows.values():
        if len(idx) < 2:
            continue
        names = sorted({labels[i] for i in idx})
        if len(names) == 1:
            sets.append([paths[i] for i in idx])
            continue
        shown = ", ".join(repr(n) for n in names[:-1]) + f" and {names[-1]!r}"
        for i in idx:
            other = next(j for j in idx if labels[j] != labels[i])
            reason = f"same bytes as {paths[other]}, labelled {shown}"
            if strict:
                raise StackvisionError(
                    f"{paths[i]}: {reason}",
                    "remove the copy with the wrong label (or run without --strict to leave "
                    "every copy out)",
                )
            problems.append(Problem(paths[i], reason + "; left out"))
            drop.add(i)
    keep = np.asarray([i for i in range(len(hashes)) if i not in drop], np.int64)
    first: dict[str, int] = {}  # group ids in order of first appearance
    groups = np.asarray([first.setdefault(hashes[i], len(first)) for i in keep], np.int64)
    return Duplicates(keep, groups, sets, problems)


def content_groups(paths: Sequence[str]) -> np.ndarray:
    """Group ids 0..G-1 of readable image files, equal for identical bytes (for the splits of
    fine-tuning and ensembles, which do not go through the feature pipeline's hashes)."""
    from .cache import content_hash
    from .images import read_bytes

    hashes = [content_hash(read_bytes(p)) for p in paths]
    return np.unique(np.asarray(hashes), return_inverse=True)[1]
