"""Ranking metrics for full-ranking evaluation: pure, vectorized, per user.

Conventions (those of the sequential-recommendation literature, e.g. SASRec/BERT4Rec/RecBole):
- `topk[u]` holds item indices ranked best first; `targets` is a CSR matrix of relevant items.
- Recall@K = |relevant in top K| / |relevant|; with one target per user this is HR@K.
- NDCG@K with binary relevance: DCG = sum over hits of 1/log2(rank + 1) (rank from 1), divided
  by the ideal DCG of min(K, |relevant|) hits at the top.
- MRR@K = 1 / rank of the first relevant item within the top K, else 0.
- Coverage@K = distinct items recommended in anybody's top K / catalogue size.
Users without any target are not scored (callers select them).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores of each row, best first (ties: lower index first)."""
    n = scores.shape[1]
    if k <= 0:
        raise ValueError("k must be positive")
    k = min(k, n)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        _lowest_indices_at_the_cut(scores, part)
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _lowest_indices_at_the_cut(scores: np.ndarray, part: np.ndarray) -> None:
    """argpartition picks among scores tied at the k-th place in no fixed way: in the rows with
    such a tie, take the lowest indices among them (in place), so that the top k depends on
    the scores alone. Rows whose k-th score is NaN keep argpartition's choice (NaN ranks last)."""
    k = part.shape[1]
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
    rows = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k)
    if not rows.size:
        return
    block, cut = scores[rows], kth[rows, None]
    tied = block == cut
    need = k - (block > cut).sum(axis=1)
    chosen = (block > cut) | (tied & (np.cumsum(tied, axis=1) <= need[:, None]))
    part[rows] = np.nonzero(chosen)[1].reshape(rows.size, k)


def hits(topk: np.ndarray, targets: sp.csr_matrix) -> np.ndarray:
    """Boolean matrix: hits[u, r] is True when topk[u, r] is one of user u's targets."""
    if targets.shape[0] != topk.shape[0]:
        raise ValueError("topk and targets must have one row per user")
    n_items = targets.shape[1]
    t = targets.tocsr()
    rows = np.repeat(np.arange(t.shape[0], dtype=np.int64), np.diff(t.indptr))
    target_codes = rows * n_items + t.indices.astype(np.int64)
    cand_codes = np.arange(topk.shape[0], dtype=np.int64)[:, None] * n_items + topk.astype(np.int64)
    return np.isin(cand_codes, target_codes)


def recall_at_k(hit: np.ndarray, n_targets: np.ndarray, k: int) -> np.ndarray:
    return hit[:, :k].sum(axis=1) / np.maximum(n_targets, 1)


def ndcg_at_k(hit: np.ndarray, n_targets: np.ndarray, k: int) -> np.ndarray:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hit[:, :k] * discounts[: hit[:, :k].shape[1]]).sum(axis=1)
    ideal_hits = np.minimum(n_targets, k)
    idcg = np.concatenate(([0.0], np.cumsum(discounts)))[ideal_hits]
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def mrr_at_k(hit: np.ndarray, k: int) -> np.ndarray:
    h = hit[:, :k]
    first = h.argmax(axis=1)
    return np.where(h.any(axis=1), 1.0 / (first + 1), 0.0)


def coverage_at_k(topk: np.ndarray, n_items: int, k: int) -> float:
    if topk.size == 0:
        return 0.0
    return float(np.unique(topk[:, :k]).size) / n_items


def summarize(topk: np.ndarray, targets: sp.csr_matrix, ks: list[int], n_items: int) -> dict[str, float]:
    """Mean Recall/NDCG/MRR@K and Coverage@K over the users (rows) given."""
    n_targets = np.diff(targets.tocsr().indptr)
    hit = hits(topk, targets)
    out: dict[str, float] = {}
    for k in ks:
        if topk.shape[0] == 0:
            out.update({f"recall@{k}": 0.0, f"ndcg@{k}": 0.0, f"mrr@{k}": 0.0, f"coverage@{k}": 0.0})
            continue
        out[f"recall@{k}"] = float(recall_at_k(hit, n_targets, k).mean())
        out[f"ndcg@{k}"] = float(ndcg_at_k(hit, n_targets, k).mean())
        out[f"mrr@{k}"] = float(mrr_at_k(hit, k).mean())
        out[f"coverage@{k}"] = coverage_at_k(topk, n_items, k)
    return out


def recall_curve(topk: np.ndarray, targets: sp.csr_matrix, max_k: int) -> np.ndarray:
    """Recall@k for k = 1..max_k (mean over users); flat beyond the length of `topk`."""
    if topk.shape[0] == 0:
        return np.zeros(max_k)
    n_targets = np.maximum(np.diff(targets.tocsr().indptr), 1)
    hit = hits(topk[:, :max_k], targets)
    curve = (np.cumsum(hit, axis=1) / n_targets[:, None]).mean(axis=0)
    if curve.size < max_k:  # fewer items than max_k: nothing more can be found
        curve = np.concatenate([curve, np.full(max_k - curve.size, curve[-1] if curve.size else 0.0)])
    return curve


def paired_bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """mean(a) / mean(b) of per-user metrics of two models on the same users, with a paired
    bootstrap confidence interval: users are resampled with replacement, the same resample for
    both models, so what the two share (easy and hard users) cancels out of the ratio.

    Returns (ratio, low, high). A ratio target is met with confidence when `low` clears it."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("a and b must be non-empty per-user vectors of the same length")
    if b.sum() <= 0:
        raise ValueError("the reference model scores zero on every user: no ratio")
    rng = np.random.default_rng(seed)
    n = a.size
    ratios = np.empty(n_boot)
    # Resample counts rather than index matrices: memory O(chunk * n), not O(n_boot * n).
    chunk = max(1, min(n_boot, 20_000_000 // (8 * n)))
    for lo in range(0, n_boot, chunk):
        hi = min(lo + chunk, n_boot)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=hi - lo).astype(np.float64)
        sum_b = counts @ b
        ratios[lo:hi] = np.divide(counts @ a, sum_b, out=np.full(hi - lo, np.nan), where=sum_b > 0)
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(ratios, [tail, 1.0 - tail])
    return float(a.mean() / b.mean()), float(low), float(high)
