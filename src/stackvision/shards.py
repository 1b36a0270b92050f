"""Sharded feature sets: features of data sets larger than memory, as ``.npy`` shards heads stream.

Layout (``stackvision-shards-v1``)::

    DIR/index.json                      written last (atomically): a complete index = a complete set
    DIR/shard-00000/<b>.<view>.npy      float32 (rows, dim of backbone b), one per backbone and view
    DIR/shard-00000/hashes.npy          |S32 image content hashes (the feature cache's keys), row order
    DIR/shard-00000/labels.npy          int32 class index per row (-1: unlabelled)
    DIR/shard-00001/...

``index.json`` holds the format, the backbones (name, dim, spec, cache store key), pooling, views,
classes, the total row count and each shard's folder and row count. Shards are written to a
temporary folder and renamed, so a shard folder is complete or absent. Backbone ``b`` is numbered
(``b0``, ``b1``...) in file names so any registry name (``timm:...``) is a safe file name.

Reading memory-maps every file (``np.load(mmap_mode="r")``): :class:`ShardedFeatures` gives the
stacked matrix (rows, n_views, sum of dims) lazily, a shard or a chunk of rows at a time, which is
what :mod:`stackvision.streaming` trains heads on. Peak memory is one chunk, whatever the row count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from .atomic import atomic_dir, atomic_open
from .errors import StackvisionError

SHARDS_FORMAT = "stackvision-shards-v1"
INDEX = "index.json"


class ShardWriter:
    """Buffer rows and write them as shards of ``rows_per_shard`` rows; :meth:`close` writes the
    index. ``backbones``: [{"name", "dim", ...any JSON-able metadata}] in stacking order."""

    def __init__(
        self,
        out_dir: str,
        backbones: Sequence[dict],
        views: Sequence[str],
        *,
        classes: Sequence[str] | None = None,
        rows_per_shard: int = 65536,
        meta: dict | None = None,
    ):
        if rows_per_shard < 1:
            raise StackvisionError(
                f"rows per shard must be at least 1, got {rows_per_shard}",
                "e.g. --shard-rows 65536",
            )
        if os.path.exists(os.path.join(out_dir, INDEX)):
            raise StackvisionError(
                f"{out_dir} already holds a sharded feature set", "choose a new folder or delete it"
            )
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.backbones, self.views = out_dir, list(backbones), tuple(views)
        self.classes = list(classes) if classes is not None else None
        self.rows_per_shard, self.meta = int(rows_per_shard), dict(meta or {})
        self.shards: list[dict] = []
        self._buf: list[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]] = []
        self._n_buf = 0
        self.n_rows = 0

    def add(self, hashes: Sequence[str], blocks: dict[str, np.ndarray], labels=None) -> None:
        """Append rows: ``blocks`` maps backbone name -> float32 (n, n_views, dim)."""
        n = len(hashes)
        for b in self.backbones:
            arr = blocks[b["name"]]
            if arr.shape != (n, len(self.views), b["dim"]):
                raise ValueError(f"block {b['name']}: shape {arr.shape}, expected "
                                 f"{(n, len(self.views), b['dim'])}")  # fmt: skip
        lab = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        self._buf.append((np.asarray(hashes, "S32"), blocks, lab))
        self._n_buf += n
        while self._n_buf >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        if n <= 0:
            return
        parts, taken = [], 0
        while taken < n:
            h, blocks, lab = self._buf[0]
            k = min(len(h), n - taken)
            parts.append((h[:k], {name: a[:k] for name, a in blocks.items()}, lab[:k]))
            if k == len(h):
                self._buf.pop(0)
            else:
                self._buf[0] = (h[k:], {name: a[k:] for name, a in blocks.items()}, lab[k:])
            taken += k
        self._n_buf -= n
        name = f"shard-{len(self.shards):05d}"
        with atomic_dir(os.path.join(self.out_dir, name)) as tmp:
            np.save(os.path.join(tmp, "hashes.npy"), np.concatenate([p[0] for p in parts]))
            np.save(os.path.join(tmp, "labels.npy"), np.concatenate([p[2] for p in parts]))
            for bi, b in enumerate(self.backbones):
                for vi, v in enumerate(self.views):
                    arr = np.concatenate([p[1][b["name"]][:, vi] for p in parts]).astype(np.float32)
                    np.save(os.path.join(tmp, f"b{bi}.{v}.npy"), arr)
        self.shards.append({"dir": name, "rows": n})
        self.n_rows += n

    def close(self) -> dict:
        self._flush(self._n_buf)
        index = {
            "format": SHARDS_FORMAT,
            "backbones": self.backbones,
            "views": list(self.views),
            "dim": int(sum(b["dim"] for b in self.backbones)),
            "classes": self.classes,
            "n_rows": self.n_rows,
            "shards": self.shards,
            **self.meta,
        }
        with atomic_open(os.path.join(self.out_dir, INDEX), "w") as fh:
            json.dump(index, fh, indent=1)
        return index


class ShardedFeatures:
    """A memory-mapped sharded feature set: the stacked matrix (N, n_views, D), read lazily."""

    def __init__(self, path: str):
        ipath = os.path.join(path, INDEX)
        if not os.path.isfile(ipath):
            raise StackvisionError(
                f"no sharded feature set at {path} (index.json missing)",
                "write one with: stackvision extract DATA --export-shards DIR",
            )
        with open(ipath) as fh:
            self.index = json.load(fh)
        if self.index.get("format") != SHARDS_FORMAT:
            raise StackvisionError(
                f"{path} is in format '{self.index.get('format')}', not {SHARDS_FORMAT}",
                "export the shards again with this stackvision",
            )
        self.path = path
        self.views = tuple(self.index["views"])
        self.backbones = self.index["backbones"]
        self.classes = self.index.get("classes")
        self.dim = int(self.index["dim"])
        self.n_views = len(self.views)
        self.shard_rows = np.asarray([s["rows"] for s in self.index["shards"]], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_rows)])
        self._maps: dict[int, list[list[np.ndarray]]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.n_views, self.dim)

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    def _dir(self, s: int) -> str:
        return os.path.join(self.path, self.index["shards"][s]["dir"])

    def _mmaps(self, s: int) -> list[list[np.ndarray]]:
        """[view][backbone] memory maps of shard ``s``."""
        if s not in self._maps:
            d = self._dir(s)
            self._maps[s] = [
                [
                    np.load(os.path.join(d, f"b{bi}.{v}.npy"), mmap_mode="r")
                    for bi in range(len(self.backbones))
                ]
                for v in self.views
            ]
        return self._maps[s]

    def labels(self) -> np.ndarray:
        """int32 class index of every row (small: 4 bytes a row)."""
        return np.concatenate(
            [np.load(os.path.join(self._dir(s), "labels.npy")) for s in range(self.n_shards)]
            or [np.zeros(0, np.int32)]
        )

    def hashes(self) -> list[str]:
        return [
            h.decode()
            for s in range(self.n_shards)
            for h in np.load(os.path.join(self._dir(s), "hashes.npy"))
        ]

    def read(self, s: int, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Stacked features of shard ``s`` (its local ``rows``): float32 (n, n_views, D) in RAM."""
        rows = slice(None) if rows is None else rows
        per_view = [np.concatenate([m[rows] for m in maps], axis=1) for maps in self._mmaps(s)]
        return np.stack(per_view, axis=1)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Stacked features of global ``rows`` (any order): float32 (len(rows), n_views, D)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.n_views, self.dim), np.float32)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = rows[sel] - self.starts[s]
            order = np.argsort(local, kind="stable")  # sequential reads within the shard
            out[sel[order]] = self.read(int(s), local[order])
        return out

    def chunks(
        self, rows: np.ndarray | None = None, chunk_rows: int = 8192, rng=None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (global row ids, features) for ``rows`` (default: all), a chunk at a time.

        With ``rng``: shards in random order, and chunks of each shard's rows shuffled (block
        shuffling: each chunk is read from one shard, so reads stay local). Without: in order.
        """
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        shards = np.unique(shard_of)
        if rng is not None:
            shards = rng.permutation(shards)
        for s in shards:
            mine = np.sort(rows[shard_of == s])
            if rng is not None:
                mine = rng.permutation(mine)
            for i in range(0, len(mine), chunk_rows):
                ids = mine[i : i + chunk_rows]
                yield ids, self.take(ids)

    def to_array(self) -> np.ndarray:
        """The whole stacked matrix in RAM (only for sets that fit)."""
        return self.take(np.arange(len(self)))


def export_shards(
    out_dir: str,
    hashes: Sequence[str],
    specs,
    *,
    views: Sequence[str],
    pool: str,
    cache,
    numbers: str = "fp32",
    labels: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    rows_per_shard: int = 65536,
    pixels: str = "pil",
) -> dict:
    """Copy the cached features of ``hashes`` (row order) into a sharded feature set at ``out_dir``.
    ``pixels``: whose decoded pixels (``pil``, ``torchvision``; see ``cache.store_fields``).

    Reads the cache a shard at a time; raises if any (image, view) is missing from the cache.
    """
    from .cache import store_fields, store_key

    stores, backbones = {}, []
    for s in specs:
        fields = store_fields(s, pool, numbers, pixels)
        stores[s.name] = cache.store(fields, s.feature_dim)
        backbones.append(
            {"name": s.name, "dim": s.feature_dim, "store": store_key(fields), "spec": s.to_dict()}
        )
    if labels is not None:
        classes = sorted(set(labels)) if classes is None else list(classes)
        pos = {c: i for i, c in enumerate(classes)}
        lab = np.asarray([pos[c] for c in labels], np.int32)
    else:
        lab = None
    writer = ShardWriter(
        out_dir,
        backbones,
        views,
        classes=classes,
        rows_per_shard=rows_per_shard,
        meta={"pool": pool, "numbers": numbers},
    )
    for i in range(0, len(hashes), rows_per_shard):
        hs = list(hashes[i : i + rows_per_shard])
        blocks = {}
        for s in specs:
            per_view = []
            for v in views:
                got = stores[s.name].get_many(hs, v)
                if len(got) < len(set(hs)):
                    raise StackvisionError(
                        f"features of {len(set(hs)) - len(got)} image(s) for backbone '{s.name}', "
                        f"view '{v}' are not in the cache",
                        "run stackvision extract with the same backbones, --pool and --tta first",
                    )
                per_view.append(np.stack([got[h] for h in hs]))
            blocks[s.name] = np.stack(per_view, axis=1)
        writer.add(hs, blocks, None if lab is None else lab[i : i + rows_per_shard])
    return writer.close()
