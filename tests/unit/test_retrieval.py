"""Exact and FAISS top-k retrieval (serving/retrieval.py) on hand-made and small random tables."""

from __future__ import annotations

import numpy as np
import pytest

from serving.retrieval import RetrievalConfig, Retriever, exact_topk, recall_at_k


def test_exact_topk_worked_example():
    items = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
    users = np.array([[2, 1], [0, 1]], np.float32)
    # user 0 scores: 2, 1, 3, -2; user 1: 0, 1, 1, 0
    top, scores = exact_topk(users, items, 3, [[2], []])
    assert top[0].tolist() == [0, 1, 3] and scores[0].tolist() == [2, 1, -2]
    assert top[1].tolist() == [1, 2, 0] and scores[1].tolist() == [1, 1, 0]  # a tie keeps index order


def test_exact_topk_pads_when_fewer_than_k_remain():
    items = np.eye(3, dtype=np.float32)
    top, scores = exact_topk(np.ones((1, 3), np.float32), items, 5, [[0, 2, -1, 99]])
    assert top[0].tolist() == [1, -1, -1, -1, -1]
    assert scores[0, 0] == 1 and np.isneginf(scores[0, 1:]).all()


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, dim)).astype(np.float32)
    return (centers[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def test_small_catalogue_is_exact_and_large_uses_the_configured_index():
    vectors = _clustered(500, 16)
    assert Retriever(vectors, RetrievalConfig(exact_max_items=500)).kind == "exact"
    assert Retriever(vectors, RetrievalConfig(exact_max_items=499, ann="hnsw")).kind == "hnsw"
    with pytest.raises(ValueError, match="ann must be one of"):
        RetrievalConfig(ann="annoy")


def test_ivf_visiting_every_list_equals_exact_search():
    vectors = _clustered(3000, 16)
    users = _clustered(40, 16, seed=1)
    ivf = Retriever(vectors, RetrievalConfig(exact_max_items=0, nlist=32, nprobe=32))
    exact, _ = exact_topk(users, vectors, 10)
    approx, _ = ivf.search(users, 10)
    assert recall_at_k(approx, exact) == 1.0


@pytest.mark.parametrize("ann, knobs", [("ivf", {"nlist": 64, "nprobe": 16}), ("hnsw", {"ef_search": 64})])
def test_ann_recall_and_exclusions(ann, knobs):
    vectors = _clustered(5000, 16)
    users = _clustered(100, 16, seed=2)
    retriever = Retriever(vectors, RetrievalConfig(exact_max_items=0, ann=ann, **knobs))
    exact, _ = exact_topk(users, vectors, 10)
    approx, scores = retriever.search(users, 10)
    assert recall_at_k(approx, exact) >= 0.9
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    # Excluding each user's exact top 5 removes them and still returns 10 items.
    excludes = [row[:5].tolist() for row in exact]
    approx_ex, _ = retriever.search(users, 10, excludes)
    assert (approx_ex >= 0).all()
    assert not any(set(a.tolist()) & set(e) for a, e in zip(approx_ex, excludes))


def test_ann_index_is_cached_on_disk_by_key(tmp_path):
    vectors = _clustered(2000, 8)
    config = RetrievalConfig(exact_max_items=0, nlist=16)
    first = Retriever(vectors, config, cache_key="a" * 64, cache_dir=tmp_path)
    assert first.build_seconds > 0 and len(list(tmp_path.glob("*.faiss"))) == 1
    second = Retriever(vectors, config, cache_key="a" * 64, cache_dir=tmp_path)
    assert second.build_seconds == 0  # loaded, not rebuilt
    users = _clustered(5, 8, seed=3)
    assert (first.search(users, 10)[0] == second.search(users, 10)[0]).all()
    # A damaged cache file is rebuilt rather than fatal.
    next(tmp_path.glob("*.faiss")).write_bytes(b"not an index")
    assert Retriever(vectors, config, cache_key="a" * 64, cache_dir=tmp_path).build_seconds > 0


def test_recall_at_k_worked_example():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    approx = np.array([[1, 2, 9, 8], [6, 5, -1, -1]])
    assert recall_at_k(approx, exact, k=4) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_int8_table_keeps_the_ranking_at_a_quarter_of_the_memory(ann):
    vectors = _clustered(4000, 32)
    users = _clustered(100, 32, seed=4)
    exact, _ = exact_topk(users, vectors, 10)
    flat = Retriever(vectors, RetrievalConfig(exact_max_items=10_000, int8=True))
    assert flat.label == "exact-int8" and flat.table_bytes * 4 == vectors.nbytes
    assert recall_at_k(flat.search(users, 10)[0], exact) >= 0.95
    approx = Retriever(vectors, RetrievalConfig(exact_max_items=0, ann=ann, int8=True, nlist=32, nprobe=32))
    assert approx.label == f"{ann}-int8"
    assert recall_at_k(approx.search(users, 10)[0], exact) >= 0.9


def test_default_lists_keep_enough_points_per_centroid():
    # 4 sqrt(N) lists would leave ~14 points each at N = 3120; capped at N / 39 (FAISS's floor).
    vectors = np.random.default_rng(0).normal(size=(3120, 8)).astype(np.float32)
    assert Retriever(vectors, RetrievalConfig(exact_max_items=0)).nlist == 80
