"""Metrics at their limits, on worked examples, and against an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from components import metrics


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    data = [(r, c) for r, cols in enumerate(rows) for c in cols]
    r, c = zip(*data) if data else ((), ())
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


def test_top_k_orders_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.0]])
    assert metrics.top_k(scores, 3).tolist() == [[1, 3, 2]]
    assert metrics.top_k(scores, 10).tolist() == [[1, 3, 2, 0, 4]]
    with pytest.raises(ValueError):
        metrics.top_k(scores, 0)


def test_perfect_ranking_scores_one():
    topk = np.array([[3, 1, 2], [0, 2, 1]])
    res = metrics.summarize(topk, csr([[3], [0]], 4), [1, 3], 4)
    assert res["recall@1"] == res["ndcg@1"] == res["mrr@1"] == 1.0
    assert res["ndcg@3"] == 1.0


def test_no_hit_scores_zero():
    topk = np.array([[1, 2], [1, 2]])
    res = metrics.summarize(topk, csr([[0], [3]], 4), [2], 4)
    assert res["recall@2"] == res["ndcg@2"] == res["mrr@2"] == 0.0
    assert res["coverage@2"] == 0.5


def test_worked_example_single_target():
    # Target at rank 3: recall 1, NDCG = 1/log2(4) = 0.5, MRR = 1/3; at K=2 it is a miss.
    topk = np.array([[5, 6, 7, 8]])
    res = metrics.summarize(topk, csr([[7]], 10), [2, 4], 10)
    assert res["recall@4"] == 1.0
    assert res["ndcg@4"] == pytest.approx(0.5)
    assert res["mrr@4"] == pytest.approx(1 / 3)
    assert res["recall@2"] == res["ndcg@2"] == res["mrr@2"] == 0.0
    assert res["coverage@4"] == pytest.approx(0.4)


def test_worked_example_two_targets():
    # Targets {a, b}; hits at ranks 1 and 3 of K=3.
    # DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3); recall = 1; MRR = 1.
    topk = np.array([[0, 9, 1]])
    res = metrics.summarize(topk, csr([[0, 1]], 10), [3], 10)
    assert res["ndcg@3"] == pytest.approx(1.5 / (1 + 1 / np.log2(3)))
    assert res["recall@3"] == 1.0 and res["mrr@3"] == 1.0
    # Recall is |hits| / |targets|: one of two targets in the top 1.
    assert metrics.summarize(topk, csr([[0, 1]], 10), [1], 10)["recall@1"] == 0.5


def test_recall_curve():
    topk = np.array([[1, 2, 3], [4, 5, 6]])
    curve = metrics.recall_curve(topk, csr([[2], [9]], 10), 3)
    assert curve.tolist() == [0.0, 0.5, 0.5]


def test_agrees_with_ranx():
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(0)
    n_users, n_items, k = 60, 40, 10
    scores = rng.random((n_users, n_items))
    targets = [sorted(rng.choice(n_items, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(n_users)]
    topk = metrics.top_k(scores, n_items)
    ours = metrics.summarize(topk, csr(targets, n_items), [k], n_items)

    qrels = ranx.Qrels({f"u{u}": {f"i{i}": 1 for i in t} for u, t in enumerate(targets)})
    run = ranx.Run({f"u{u}": {f"i{i}": float(scores[u, i]) for i in range(n_items)} for u in range(n_users)})
    theirs = ranx.evaluate(qrels, run, [f"ndcg@{k}", f"recall@{k}", f"mrr@{k}"])
    for name in ("ndcg", "recall", "mrr"):
        assert ours[f"{name}@{k}"] == pytest.approx(theirs[f"{name}@{k}"], abs=1e-9), name


def test_recall_curve_is_flat_beyond_the_catalogue():
    topk = np.array([[1, 0]])
    assert metrics.recall_curve(topk, csr([[0]], 2), 4).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_paired_bootstrap_ratio_worked_examples():
    from components.metrics import paired_bootstrap_ratio

    rng = np.random.default_rng(0)
    b = (rng.random(3000) < 0.2) * rng.random(3000)
    # Identical models, and a model exactly twice as good on every user: a paired resample
    # cannot move those ratios.
    assert paired_bootstrap_ratio(b, b) == (1.0, 1.0, 1.0)
    assert paired_bootstrap_ratio(2 * b, b) == pytest.approx((2.0, 2.0, 2.0))
    # 10 % better on average, with noise: the interval holds the ratio and clears 1.
    a = b * 1.1 * rng.uniform(0.8, 1.2, size=b.size)
    ratio, low, high = paired_bootstrap_ratio(a, b, seed=1)
    assert low < ratio < high and 1.0 < low and ratio == pytest.approx(a.mean() / b.mean())
    # Two models that each get a different handful of users right: the interval straddles 1.
    ref, other = b.copy(), b.copy()
    ref[:5], other[:5] = 1.0, 0.0
    ref[5:10], other[5:10] = 0.0, 1.0
    _, low, high = paired_bootstrap_ratio(other, ref, seed=1)
    assert low < 1.0 < high


def test_paired_bootstrap_ratio_rejects_bad_input():
    from components.metrics import paired_bootstrap_ratio

    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_ratio(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="zero"):
        paired_bootstrap_ratio(np.ones(3), np.zeros(3))


def test_top_k_breaks_ties_at_the_cut_by_index():
    """Among scores tied at the k-th place the lowest indices win, whatever argpartition picks:
    the top k is that of a stable sort (integer counts and -inf histories tie a lot)."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(200, 500)).astype(np.float32)
    scores[:20, rng.integers(0, 500, 400)] = -np.inf
    scores[20:25, 10:] = -np.inf  # fewer than k finite: the lowest-index -inf fill the rest
    for k in (1, 7, 40):
        assert np.array_equal(metrics.top_k(scores, k), np.argsort(-scores, axis=1, kind="stable")[:, :k])
