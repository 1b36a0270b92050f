"""The on-disk feature cache.

Layout (``root`` defaults to the user cache dir, e.g. ``~/.cache/stackvision``)::

    root/features-v1/<key>.sqlite   one store per (backbone, weights, preprocessing, pool, numbers)
    root/features-v1/<key>.json     what the key was made of, for people

``key`` = first 24 hex digits of sha256 over the canonical JSON of: backbone architecture, weights id
(sha256 of the weights file, or the hub id), preprocessing spec, pooling, and the engine's numbers
id (``fp32``/``int8``; fp32 engines agree to 1e-3 and share a store), and ``pixels:
torchvision`` for images decoded by :mod:`stackvision.gpu_decode` (absent for PIL's pixels).
Inside a store a row is keyed by (image content hash, view), so a renamed or copied image is
still a hit and an edited one misses.

Writes are SQLite transactions (WAL mode), one per batch: a killed process loses at most the batch in
flight, never leaves a half-written row, and the next run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence

import numpy as np

from .atomic import atomic_open
from .errors import StackvisionError
from .outputs import unwritable_reason
from .readout import of as readout_of

CACHE_FORMAT = "features-v1"
VIEWS = ("orig", "flip")
#: SQLite page size of a new store (rows of 4-9 KB: 16 KB pages wrote them fastest here)
PAGE_SIZE = 16384


def default_cache_dir() -> str:
    env = os.environ.get("STACKVISION_CACHE")
    if env:
        return env
    from platformdirs import user_cache_dir

    return user_cache_dir("stackvision")


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def store_key(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class FeatureStore:
    """One backbone configuration's features: (image hash, view) -> float32 vector."""

    def __init__(self, path: str, dim: int):
        self.path = path
        self.dim = dim
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect on a new file only
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # A rowid table, the key in its own index: a row is a 5 KB blob (lite0), far above the
        # ~1/20 of a page that WITHOUT ROWID suits. Stores made before keep their WITHOUT ROWID
        # table; the statements below work on both (BENCHMARKS.md, issue 14, "one pass").
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features ("
            " image TEXT NOT NULL, view TEXT NOT NULL, vec BLOB NOT NULL,"
            " PRIMARY KEY (image, view))"
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]

    def _usable(self, columns: str, hashes: Sequence[str], view: str):
        """``SELECT columns`` of the usable rows among ``hashes`` for ``view`` (a row of a
        foreign size counts as missing), in chunks under SQLite's bound-parameter limit."""
        unique = list(dict.fromkeys(hashes))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            yield from self._db.execute(
                f"SELECT {columns} FROM features WHERE view=? AND length(vec)=? AND image IN "
                f"({','.join('?' * len(chunk))})",
                (view, 4 * self.dim, *chunk),
            )

    def get_many(self, hashes: Sequence[str], view: str) -> dict[str, np.ndarray]:
        """The stored vectors among ``hashes`` for ``view``; absent ones are simply missing."""
        rows = self._usable("image, vec", hashes, view)
        return {image: np.frombuffer(blob, dtype=np.float32) for image, blob in rows}

    def missing(self, hashes: Sequence[str], view: str) -> set[str]:
        """The ``hashes`` without a usable row for ``view``, from the key index and each row's
        length alone (the vectors are not read)."""
        have = {image for (image,) in self._usable("image", hashes, view)}
        return {h for h in hashes if h not in have}

    def put_many(self, items: Iterable[tuple[str, str, np.ndarray]]) -> None:
        """Store (image hash, view, vector) rows in one transaction."""
        rows = [
            (h, v, np.ascontiguousarray(vec, dtype=np.float32).tobytes()) for h, v, vec in items
        ]
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (image, view, vec) VALUES (?, ?, ?)", rows
            )


class FeatureCache:
    """The set of feature stores under one root directory."""

    def __init__(self, root: str | None = None):
        self.base = root or default_cache_dir()
        if os.path.exists(self.base) and not os.path.isdir(self.base):
            raise StackvisionError(
                f"the feature cache {self.base} is a file, not a folder",
                "give --cache (or $STACKVISION_CACHE) a folder; it is created",
            )
        self.root = os.path.join(self.base, CACHE_FORMAT)
        self._stores: dict[str, FeatureStore] = {}

    def check_writable(self) -> None:
        """Make sure the cache folder can take new files (it is created when first needed, not
        here), so that an unwritable cache (a read-only home folder, a typo under /) is found
        before any work."""
        why = unwritable_reason(os.path.join(self.root, "probe"))
        if why:
            raise self._unwritable(why)

    def _unwritable(self, why) -> StackvisionError:
        return StackvisionError(
            f"cannot write the feature cache {self.base}: {why}",
            "give --cache (or $STACKVISION_CACHE) a folder you can write to",
        )

    def store(self, fields: dict, dim: int) -> FeatureStore:
        key = store_key(fields)
        if key not in self._stores:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise self._unwritable(exc.strerror or exc) from None
            meta = os.path.join(self.root, key + ".json")
            if not os.path.exists(meta):
                with atomic_open(meta, "w") as fh:
                    json.dump({**fields, "dim": dim}, fh, indent=1, sort_keys=True)
            self._stores[key] = FeatureStore(os.path.join(self.root, key + ".sqlite"), dim)
        return self._stores[key]

    def close(self) -> None:
        for s in self._stores.values():
            s.close()
        self._stores.clear()


def store_fields(spec, pool: str, numbers: str, pixels: str = "pil") -> dict:
    """The fields that define a store's key (see the module docstring). ``pixels``: who decoded
    and resized the images, ``pil`` (no field: the keys of existing stores stay) or
    ``torchvision`` (:mod:`stackvision.gpu_decode`, whose pixels differ a little)."""
    fields = {
        "architecture": spec.architecture,
        "weights": spec.weights_id,
        "preprocess": spec.preprocess.to_dict(),
        "pool": readout_of(spec, pool),
        "numbers": numbers,
    }
    if pixels != "pil":
        fields["pixels"] = pixels
    return fields
