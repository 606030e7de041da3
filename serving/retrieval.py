"""Top-k retrieval over an item table: exact by batched matrix product up to a catalogue size,
FAISS (IVF or HNSW, inner product) beyond it. numpy and faiss only.

Scores are inner products of user and item vectors, as in the sequence graph. Excluded items
(the user's history) are dropped after the search; the ANN search over-fetches by their number
so that k results remain.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("serving.retrieval")

ANN_KINDS = ("ivf", "hnsw")
# Extra results fetched per query to make up for excluded items (see `Retriever.search`).
EXCLUDE_SLACK = 16


@dataclass(frozen=True)
class RetrievalConfig:
    # Exact search up to this many items; FAISS beyond. 200k x 64 floats is ~50 MB and one
    # batched product of 8 users costs ~5 ms on one core, past that ANN wins.
    exact_max_items: int = 200_000
    ann: str = "ivf"
    # IVF: lists ~ 4 sqrt(N), at most N / 39 (FAISS's floor of training points per centroid:
    # below it, small catalogues get lists too thin to cluster and recall collapses); nprobe
    # lists visited per query (recall vs. latency).
    nlist: int | None = None
    nprobe: int = 32
    # HNSW: graph degree, build and search breadth.
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    # Item vectors stored as INT8 (FAISS scalar quantizer, one scale per dimension): a quarter
    # of the memory and bandwidth, scores approximate; exact search then runs in FAISS too.
    int8: bool = False
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ann not in ANN_KINDS:
            raise ValueError(f"ann must be one of {ANN_KINDS}, got {self.ann!r}")
        if self.exact_max_items < 0 or self.nprobe < 1 or self.ef_search < 1 or self.hnsw_m < 2:
            raise ValueError("exact_max_items >= 0, nprobe >= 1, ef_search >= 1, hnsw_m >= 2 required")


def exact_topk(users: np.ndarray, vectors: np.ndarray, k: int,
               excludes: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (indices [B, k], scores [B, k]), best first; rows with fewer
    than k candidates are padded with index -1 and score -inf."""
    n = vectors.shape[0]
    scores = users @ vectors.T
    if excludes:
        rows = np.repeat(np.arange(len(excludes)), [len(e) for e in excludes])
        cols = np.fromiter((i for e in excludes for i in e), dtype=np.int64, count=len(rows))
        valid = (cols >= 0) & (cols < n)
        scores[rows[valid], cols[valid]] = -np.inf
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(n), (scores.shape[0], n))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top_scores = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    top[~np.isfinite(top_scores)] = -1
    return _pad(top, top_scores, k)


def _pad(top: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if top.shape[1] >= k:
        return top[:, :k], scores[:, :k]
    b = top.shape[0]
    return (np.concatenate([top, np.full((b, k - top.shape[1]), -1, np.int64)], axis=1),
            np.concatenate([scores, np.full((b, k - top.shape[1]), -np.inf, np.float32)], axis=1))


class Retriever:
    """Top-k over a fixed item table. `kind` is "exact" for catalogues up to
    `exact_max_items`, else the configured FAISS index (built once, cached on disk by key)."""

    def __init__(self, vectors: np.ndarray, config: RetrievalConfig, cache_key: str | None = None,
                 cache_dir: Path | None = None):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.config = config
        self.n, self.dim = self.vectors.shape
        self.index = None
        self.kind = "exact" if self.n <= config.exact_max_items else config.ann
        self.build_seconds = 0.0
        if self.kind != "exact" or config.int8:
            self.index = self._load_or_build(cache_key, cache_dir)

    # ---- index --------------------------------------------------------------------------

    def _params_tag(self) -> str:
        c = self.config
        tag = {"exact": "flat", "ivf": f"ivf{self.nlist}", "hnsw": f"hnsw{c.hnsw_m}-{c.ef_construction}"}[self.kind]
        return tag + ("-int8" if c.int8 else "")

    @property
    def nlist(self) -> int:
        return self.config.nlist or max(1, min(65_536, int(4 * math.sqrt(self.n)), self.n // 39))

    def _load_or_build(self, cache_key: str | None, cache_dir: Path | None):
        import faiss

        faiss.omp_set_num_threads(max(1, self.config.threads))
        path = cache_dir / f"{cache_key[:16]}-{self.n}-{self._params_tag()}.faiss" if cache_key and cache_dir else None
        if path is not None and path.exists():
            try:
                index = faiss.read_index(str(path))
                if index.ntotal == self.n and index.d == self.dim:
                    log.info("ANN index loaded from %s", path)
                    return index
            except RuntimeError as exc:  # a damaged cache file is rebuilt, not fatal
                log.warning("ANN cache %s unreadable (%s): rebuilding", path, exc)
        start = time.perf_counter()
        index = self._build()
        self.build_seconds = time.perf_counter() - start
        log.info("%s index over %d items built in %.1f s", self.kind.upper(), self.n, self.build_seconds)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            faiss.write_index(index, str(tmp))
            tmp.replace(path)
        return index

    def _build(self):
        import faiss

        c = self.config
        ip = faiss.METRIC_INNER_PRODUCT
        int8 = faiss.ScalarQuantizer.QT_8bit
        if self.kind == "exact":  # only with int8: a brute-force scan of the quantized table
            index = faiss.IndexScalarQuantizer(self.dim, int8, ip)
            index.train(self.vectors)
            index.add(self.vectors)
        elif self.kind == "hnsw":
            if c.int8:
                index = faiss.IndexHNSWSQ(self.dim, int8, c.hnsw_m, ip)
                index.train(self.vectors)
            else:
                index = faiss.IndexHNSWFlat(self.dim, c.hnsw_m, ip)
            index.hnsw.efConstruction = c.ef_construction
            index.add(self.vectors)
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            if c.int8:
                index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist, int8, ip)
            else:
                index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, ip)
            # k-means on a sample: 50 points per list is plenty and keeps the build to seconds.
            rng = np.random.default_rng(c.seed)
            sample_size = min(self.n, 50 * self.nlist)
            sample = self.vectors[np.sort(rng.choice(self.n, sample_size, replace=False))]
            index.cp.seed = c.seed
            index.train(sample)
            index.add(self.vectors)
        return index

    # ---- search -------------------------------------------------------------------------

    @property
    def table_bytes(self) -> int:
        """Memory of the scored table: fp32 vectors, or the INT8 codes when quantized."""
        return self.n * self.dim * (1 if self.config.int8 else 4)

    @property
    def label(self) -> str:
        return self.kind + ("-int8" if self.config.int8 else "")

    def search(self, users: np.ndarray, k: int,
               excludes: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices [B, k], scores [B, k]) best first, padded with -1 / -inf."""
        users = np.ascontiguousarray(users, dtype=np.float32)
        if self.index is None:
            return exact_topk(users, self.vectors, k, excludes)
        excludes = excludes or [[] for _ in range(len(users))]
        # Over-fetch a little for the excluded (seen) items; the few rows that lose more than
        # that to exclusions are searched again, wide enough. Fetching k + the longest history
        # for every row made the search of a batch several times slower.
        fetch = min(self.n, k + min(EXCLUDE_SLACK, max((len(e) for e in excludes), default=0)))
        scores, top = self._search(users, fetch)
        out_top = np.full((len(users), k), -1, np.int64)
        out_scores = np.full((len(users), k), -np.inf, np.float32)
        for r, excluded in enumerate(excludes):
            row, row_scores = self._filter(top[r], scores[r], excluded, k)
            if len(row) < k and fetch < min(self.n, k + len(excluded)):
                wide_scores, wide_top = self._search(users[r:r + 1], min(self.n, k + len(excluded)))
                row, row_scores = self._filter(wide_top[0], wide_scores[0], excluded, k)
            out_top[r, : len(row)] = row
            out_scores[r, : len(row)] = row_scores
        return out_top, out_scores

    def _search(self, users: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        # Per-call parameters, not the index's fields: worker threads search concurrently.
        if self.kind == "hnsw":
            # HNSW returns at most efSearch neighbours: widened for large k.
            params = faiss.SearchParametersHNSW(efSearch=max(self.config.ef_search, fetch))
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.config.nprobe)
        else:
            params = None
        return self.index.search(users, fetch, params=params)

    @staticmethod
    def _filter(row: np.ndarray, row_scores: np.ndarray, excluded: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        keep = row >= 0
        if excluded:
            keep &= ~np.isin(row, excluded)
        return row[keep][:k], row_scores[keep][:k]


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top-k found by the approximate top-k."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist()) - {-1}) / max(1, min(k, int((e[:k] >= 0).sum())))
            for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 0.0
