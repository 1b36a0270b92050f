"""Nearest neighbours on cached features: near-duplicate pairs and groups, kNN density.

Features are centred (each column less its mean over the rows given), optionally reduced by PCA,
and L2-normalised, so the inner product of two rows is their cosine similarity. Post-ReLU pooled
features are all positive: without centring every pair of images has a cosine of ~0.5-0.8 and
copies stand out far less.

Search: exact, by blocked matrix products (``EXACT_MAX`` rows and below: 13k rows x 256 dims take
about a second here), else an HNSW graph from faiss (``faiss-cpu``), whose recall of the true
nearest neighbour at these settings is above 0.99 on image features. Either returns the ``k``
most similar other rows of every row.

Near-duplicates (:func:`duplicate_pairs`) are scored by CSLS (cross-domain similarity local
scaling, Conneau et al. 2018): ``2 cos(a, b) - r_a - r_b`` with ``r`` a row's mean cosine to its
``k`` nearest neighbours. A plain cosine threshold cannot tell a re-encoded, resized and cropped
copy (cosine 0.66-0.99 from its original on cub86) from two photos of one species in a dense
class (up to 0.95); relative to each row's own neighbourhood the two separate (measured in
``benchmarks/doctor.py``, BENCHMARKS.md "doctor"). :func:`groups_from_pairs` joins pairs
transitively (union-find), so a photo, its resized copy and a crop of the copy are one group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: CSLS score from which two images are near-duplicates (chosen on cub86 and imagewoof)
DUP_CSLS = 0.30
#: and from which cosine at least: CSLS alone over-rates pairs in sparse data (a few dozen images:
#: two distinct Shih-Tzus at cosine 0.72 scored 0.52 among 49 images)
DUP_COS_MIN = 0.75
#: below this many rows neighbourhoods are too sparse for CSLS to mean much: a higher cosine floor
#: (two distinct Shih-Tzus at cosine ~0.76 scored 0.31 among 73 images)
SPARSE_ROWS, SPARSE_COS_MIN = 1000, 0.85
#: neighbours per row (density, CSLS, candidate pairs)
K = 10
#: most rows searched exactly; above, an HNSW index (faiss)
EXACT_MAX = 40_000
#: rows wider than this are searched on a random projection first, then re-scored exactly
PROJECT_DIMS = 512
PROJECT_MIN_ROWS = 4000
CANDIDATES = 4  # x k candidates per row from the projection
#: PCA dimensions kept before the search (None: none; PCA-256 lost recall on copies, so off)
PCA_DIMS = None


@dataclass
class Embedding:
    """Rows ready for cosine search, and how they were made (to embed more rows the same way)."""

    vectors: np.ndarray  # float32 (N, d), unit rows
    mean: np.ndarray
    components: np.ndarray | None  # (d, D) PCA basis, or None

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = np.asarray(X, np.float32) - self.mean
        if self.components is not None:
            Z = Z @ self.components.T
        return _unit(Z)


def _unit(Z: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    return (Z / np.maximum(n, 1e-12)).astype(np.float32)


def embed(X: np.ndarray, pca: int | None = PCA_DIMS, seed: int = 0) -> Embedding:
    """Centre, reduce to ``pca`` dimensions (when the features have more, and there are more
    rows than that), L2-normalise. ``X``: (N, D) one view of each image."""
    X = np.asarray(X, np.float32)
    mean = X.mean(axis=0) if len(X) else np.zeros(X.shape[1], np.float32)
    Z = X - mean
    comps = None
    if pca and X.shape[1] > pca and len(X) > pca:
        from sklearn.decomposition import PCA

        p = PCA(n_components=pca, svd_solver="randomized", random_state=seed).fit(Z)
        comps = p.components_.astype(np.float32)
        Z = Z @ comps.T
    return Embedding(_unit(Z), mean.astype(np.float32), comps)


def knn(
    E: np.ndarray, k: int = 10, exact_max: int = EXACT_MAX, project: int | None = PROJECT_DIMS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other rows of each row of unit vectors ``E``: (similarities, indices),
    both (N, k), most similar first; -1 / -inf pad where there are fewer than k other rows.

    Wide rows (more than ``project`` dimensions, more than ``PROJECT_MIN_ROWS`` rows): candidates
    are searched on a fixed random projection to ``project`` dimensions (``CANDIDATES`` x k of
    them), then re-scored with the full vectors: the similarities returned are exact, and the
    search costs a seventh of the full product. On cub86 train+val (5k x 3,840 dims) it kept
    99.98% of the nearest neighbours and 99.1% of the 10 nearest.
    """
    n, d = E.shape
    k = int(k)
    search = _knn_exact if n <= exact_max else _knn_hnsw
    if not project or d <= project or n <= PROJECT_MIN_ROWS:
        return search(E, k)
    P = np.random.default_rng(0).standard_normal((d, project)).astype(np.float32)
    _, cand = search(_unit(E @ P), min(CANDIDATES * k, n - 1))
    return _rescore(E, cand, k)


def _rescore(E: np.ndarray, cand: np.ndarray, k: int, block: int = 256):
    n = len(E)
    sims = np.full((n, k), -np.inf, np.float32)
    idx = np.full((n, k), -1, np.int64)
    for s in range(0, n, block):
        c = cand[s : s + block]
        S = np.matmul(E[np.maximum(c, 0)], E[s : s + block, :, None])[..., 0]
        S[c < 0] = -np.inf
        order = np.argsort(-S, axis=1)[:, :k]
        sims[s : s + block, : order.shape[1]] = np.take_along_axis(S, order, axis=1)
        idx[s : s + block, : order.shape[1]] = np.take_along_axis(c, order, axis=1)
    idx[~np.isfinite(sims)] = -1
    return sims, idx


def _knn_exact(E: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    n = len(E)
    kk = min(k, max(n - 1, 0))
    sims = np.full((n, k), -np.inf, np.float32)
    idx = np.full((n, k), -1, np.int64)
    if kk == 0:
        return sims, idx
    for s in range(0, n, block):
        S = E[s : s + block] @ E.T
        rows = np.arange(S.shape[0])
        S[rows, s + rows] = -np.inf  # not its own neighbour
        part = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
        ps = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx[s : s + block, :kk] = np.take_along_axis(part, order, axis=1)
        sims[s : s + block, :kk] = np.take_along_axis(ps, order, axis=1)
    return sims, idx


def _knn_hnsw(E: np.ndarray, k: int, m: int = 32, ef: int = 128) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(E.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef
    index.hnsw.efSearch = max(ef, 2 * k)
    index.add(np.ascontiguousarray(E, np.float32))
    sims, idx = index.search(np.ascontiguousarray(E, np.float32), k + 1)
    out_s = np.full((len(E), k), -np.inf, np.float32)
    out_i = np.full((len(E), k), -1, np.int64)
    for r in range(len(E)):  # drop the row itself wherever the graph put it
        keep = [(s, j) for s, j in zip(sims[r], idx[r]) if j != r and j >= 0][:k]
        if keep:
            out_s[r, : len(keep)] = [s for s, _ in keep]
            out_i[r, : len(keep)] = [j for _, j in keep]
    return out_s, out_i


def pairs_above(
    sims: np.ndarray, idx: np.ndarray, threshold: float
) -> list[tuple[int, int, float]]:
    """Pairs (i < j, similarity) among the kNN lists with similarity >= ``threshold``, each once,
    most similar first."""
    rows, cols = np.nonzero(sims >= threshold)
    best: dict[tuple[int, int], float] = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        j = int(idx[r, c])
        if j < 0:
            continue
        key = (min(r, j), max(r, j))
        best[key] = max(best.get(key, -1.0), float(sims[r, c]))
    return sorted(((a, b, s) for (a, b), s in best.items()), key=lambda t: -t[2])


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def labels(self) -> np.ndarray:
        """Group ids 0..G-1 in order of first appearance."""
        first: dict[int, int] = {}
        return np.asarray([first.setdefault(self.find(i), len(first)) for i in range(len(self.parent))], np.int64)  # fmt: skip


def groups_from_pairs(n: int, pairs, base: np.ndarray | None = None) -> np.ndarray:
    """Group ids (0..G-1, order of first appearance) joining every pair, and every pair of rows
    with equal ``base`` ids (e.g. identical bytes)."""
    uf = UnionFind(n)
    if base is not None:
        first: dict[int, int] = {}
        for i, g in enumerate(np.asarray(base).tolist()):
            uf.union(i, first.setdefault(g, i))
    for a, b, *_ in pairs:
        uf.union(int(a), int(b))
    return uf.labels()


def duplicate_pairs(
    E: np.ndarray, k: int = K, csls_min: float = DUP_CSLS, cos_min: float | None = None
) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """Near-duplicate pairs (i < j, CSLS score) of unit rows ``E``, and each row's density ``r``
    (mean cosine to its ``k`` nearest neighbours). ``cos_min``: default ``DUP_COS_MIN``, or
    ``SPARSE_COS_MIN`` under ``SPARSE_ROWS`` rows."""
    if cos_min is None:
        cos_min = DUP_COS_MIN if len(E) >= SPARSE_ROWS else SPARSE_COS_MIN
    k = min(k, max(len(E) - 1, 1))
    sims, idx = knn(E, k)
    r = np.where(np.isfinite(sims), sims, 0.0).mean(1)
    csls = 2 * sims - r[:, None] - r[np.maximum(idx, 0)]
    csls[(idx < 0) | (sims < cos_min)] = -np.inf
    return pairs_above(csls, idx, csls_min), r


def near_duplicate_groups(X: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """Group ids for ``X`` (N, D) or (N, views, D) (the first view is used) in which near-duplicates
    (and rows with equal ``base`` ids) share a group: what ``train --group-duplicates`` splits on."""
    X = np.asarray(X)
    if X.ndim == 3:
        X = X[:, 0]
    E = embed(X).vectors
    return groups_from_pairs(len(E), duplicate_pairs(E)[0], base)
