"""Evaluation wiring: exclusion of history, slices, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from components.evaluate import evaluate, format_table, per_user_ndcg, popularity_model, rank
from components.factors import FactorModel
from tests.unit.test_features import write_snapshot
from components.features import build_features
from tests.conftest import tiny_params


def test_rank_excludes_history():
    users = np.array([[1.0], [1.0]], dtype=np.float32)
    items = np.array([[5.0], [4.0], [3.0], [2.0]], dtype=np.float32)
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))
    assert rank(users, items, exclude, 2, batch_size=1).tolist() == [[1, 2], [0, 1]]


def test_rank_blocks_are_bounded_by_memory_with_the_same_answer(monkeypatch):
    """With a million items, `batch_size` users' scores would not fit: blocks shrink to
    BLOCK_BYTES, and the ranking is the one unbounded blocks give."""
    import components.evaluate as ev

    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(300, 8)).astype(np.float32)
    exclude = sp.random(50, 300, density=0.05, format="csr", random_state=1)
    whole = rank(users, items, exclude, 10, batch_size=64)
    seen = []
    real_top_k = ev.block_top_k
    monkeypatch.setattr(ev, "block_top_k", lambda scores, k: seen.append(scores.nbytes) or real_top_k(scores, k))
    monkeypatch.setattr(ev, "BLOCK_BYTES", 4 * 300 * 7)
    assert np.array_equal(rank(users, items, exclude, 10, batch_size=64), whole)
    assert max(seen) <= 4 * 300 * 7 and len(seen) == 8  # 50 users in blocks of 7


def test_one_vector_for_every_user_is_ranked_once_with_the_same_answer():
    """Popularity (every user the same vector) is ranked from one order of the items: the same
    items in the same order as ranking each user's masked scores, ties and long histories
    included (a user with fewer than k items left goes the per-user way)."""
    from components import metrics

    rng = np.random.default_rng(3)
    n_users, n_items, k = 300, 400, 20
    items = rng.integers(0, 30, size=(n_items, 1)).astype(np.float32)  # counts: many ties
    users = np.ones((n_users, 1), dtype=np.float32)
    lengths = rng.integers(0, 60, size=n_users)
    lengths[:3] = [n_items - k, n_items - k + 1, n_items]  # exactly k left, fewer, none
    rows = [np.sort(rng.choice(n_items, n, replace=False)) for n in lengths]
    exclude = sp.csr_matrix((np.ones(lengths.sum()), np.concatenate(rows), np.r_[0, np.cumsum(lengths)]),
                            shape=(n_users, n_items))
    dense = np.repeat(items.T, n_users, axis=0)
    dense[exclude.toarray() > 0] = -np.inf
    assert np.array_equal(rank(users, items, exclude, k, batch_size=64), metrics.top_k(dense, k))


@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("group", [1024, 8, 13])
def test_the_fast_block_top_k_gives_the_exact_answer(k, group, monkeypatch):
    """Blocks past FAST_TOP_K_MIN_SIZE go through torch.topk: the same items in the same order
    as `metrics.top_k`, ties at the k-th place, rows with fewer than k finite scores (history
    excluded) and integer-valued scores (popularity counts) included; with small groups, rows
    are long enough to be ranked among their best groups (13: a short last group)."""
    import components.evaluate as ev
    from components import metrics
    from components.evaluate import FAST_TOP_K_MIN_SIZE, block_top_k

    monkeypatch.setattr(ev, "TOP_K_GROUP", group)

    rng = np.random.default_rng(k)
    n_rows, n_items = 256, FAST_TOP_K_MIN_SIZE // 256 + 7
    scores = rng.standard_normal((n_rows, n_items)).astype(np.float32)
    scores[:32] = np.round(scores[:32] * 4) / 4  # heavy ties everywhere in these rows
    scores[32:40] = rng.integers(0, 50, size=(8, n_items))  # counts
    scores[40:44, 3:] = -np.inf  # only three items left to rank
    row = scores[44]
    row[np.argsort(-row)[k - 1:k + 2]] = row.max() + 1  # k+1 items tied for the top places
    scores[45, [5, 17]] = np.nan  # a broken vector: numpy ranks NaN last, torch first
    scores[46, 3::group] = scores[46].max() + 1  # every group's best score tied
    scores[47, -1] = scores[47].max() + 1  # the best score in the short last group
    assert scores.size >= FAST_TOP_K_MIN_SIZE
    got = block_top_k(scores, k)
    assert np.array_equal(got, metrics.top_k(scores, k))
    assert got.shape == (n_rows, k) and got.dtype == np.int64
    # Below the size threshold, or asking for the whole row (or more), `metrics.top_k` answers.
    assert np.array_equal(block_top_k(scores[:2, :100], k), metrics.top_k(scores[:2, :100], k))
    assert np.array_equal(block_top_k(scores[:, :k], k), metrics.top_k(scores[:, :k], k))
    assert block_top_k(scores[:, :0], k).shape == (n_rows, 0)


def test_factor_model_roundtrip(tmp_path):
    m = FactorModel(items={"valid": np.eye(3), "test": 2 * np.eye(3)}, users={"valid": np.ones((2, 3)), "test": np.zeros((2, 3))})
    m.save(tmp_path / "f.npz")
    back = FactorModel.load(tmp_path / "f.npz")
    assert np.array_equal(back.items["test"], m.items["test"]) and np.array_equal(back.users["valid"], m.users["valid"])
    with pytest.raises(FileNotFoundError, match="train the model first"):
        FactorModel.load(tmp_path / "missing.npz")


def test_evaluate_writes_metrics_for_every_model_and_slice(tmp_path):
    import polars as pl

    # 4 users x 4 items; every user's test item is 'd' (idx 3), valid item 'c' (idx 2).
    rows = []
    for u in range(4):
        for t, item in enumerate(["a", "b", "c", "d"]):
            rows.append((f"u{u}", item, t))
    inter = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    data = write_snapshot(tmp_path / "data", inter, pl.DataFrame({"item_id": list("abcd"), "text": list("ABCD")}))
    cfg = tiny_params("features.min_user_interactions=0", "features.min_item_interactions=0")
    build_features(data, tmp_path / "f", cfg.features)
    # An oracle that scores the right item highest on each split.
    oracle = FactorModel(
        items={"valid": np.eye(4, dtype=np.float32), "test": np.eye(4, dtype=np.float32)},
        users={"valid": np.tile(np.eye(4, dtype=np.float32)[2], (4, 1)),
               "test": np.tile(np.eye(4, dtype=np.float32)[3], (4, 1))},
    )
    seqs_train = sp.csr_matrix(np.tile([1, 1, 0, 0], (4, 1)).astype(np.float32))
    models = {"oracle": oracle, "popularity": popularity_model(seqs_train, 4)}
    ev = evaluate(tmp_path / "f", models, tmp_path / "eval", cfg.evaluation)
    assert ev.test["oracle"]["ndcg@10"] == 1.0 and ev.valid["oracle"]["recall@10"] == 1.0
    assert ev.test["oracle"]["short_history/n_users"] == 4.0  # 2 training items each
    written = json.loads(ev.metrics_path.read_text())
    assert set(written) == {"oracle", "popularity"}
    assert {"recall@10", "ndcg@10", "mrr@10", "coverage@10", "recall@20", "long_tail/ndcg@10"} <= set(written["oracle"])
    assert ev.plot_path.exists() and ev.plot_path.stat().st_size > 1000
    csv = (tmp_path / "eval" / "recall_at_k.csv").read_text().splitlines()
    assert csv[0] == "k,oracle,popularity" and len(csv) == 21
    assert "| oracle | 1.0000" in format_table(ev.test, [10])


def random_case(tmp_path, rng, n_users: int, n_items: int, per_user: int, n_models: int, *overrides: str):
    """Features of random histories and random factor models over them: (settings, sequences,
    models)."""
    import polars as pl

    from components.sequences import load_sequences

    rows = [(f"u{u:02d}", f"i{i}", t) for u in range(n_users)
            for t, i in enumerate(rng.choice(n_items, size=per_user, replace=False))]
    inter = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    items = sorted({r[1] for r in rows})
    data = write_snapshot(tmp_path / "data", inter, pl.DataFrame({"item_id": items, "text": items}))
    cfg = tiny_params("features.min_user_interactions=0", "features.min_item_interactions=0", *overrides)
    build_features(data, tmp_path / "f", cfg.features)
    seqs = load_sequences(tmp_path / "f")
    models = [FactorModel(items={s: rng.normal(size=(seqs.n_items, 4)).astype(np.float32) for s in ("valid", "test")},
                          users={s: rng.normal(size=(seqs.n_users, 4)).astype(np.float32) for s in ("valid", "test")})
              for _ in range(n_models)]
    return cfg, seqs, models


def test_per_user_ndcg_averages_to_the_reported_ndcg(tmp_path):
    cfg, seqs, (model,) = random_case(tmp_path, np.random.default_rng(3), 12, 9, 5, 1)
    ev = evaluate(tmp_path / "f", {"random": model}, tmp_path / "eval", cfg.evaluation)
    for split, reported in (("valid", ev.valid), ("test", ev.test)):
        per_user = per_user_ndcg(model, seqs, split, 10, 4)
        assert per_user.shape == (12,) and ((per_user >= 0) & (per_user <= 1)).all()
        assert per_user.mean() == pytest.approx(reported["random"]["ndcg@10"])


def test_max_users_scores_a_seeded_sample_with_intervals(tmp_path):
    import dataclasses

    from components.evaluate import sample_users

    cfg, seqs, (a, b) = random_case(tmp_path, np.random.default_rng(5), 60, 30, 6, 2,
                                    "evaluation.max_users=20", "evaluation.sample_seed=7")
    models = {"a": a, "b": b}
    ev = evaluate(tmp_path / "f", models, tmp_path / "eval", cfg.evaluation)
    sample = sample_users(np.arange(60), 20, 7)
    assert sample.size == 20 and np.array_equal(sample, sample_users(np.arange(60), 20, 7))
    for name, model in models.items():
        row = ev.test[name]
        assert row["n_users"] == 20 and row["n_users_eligible"] == 60
        # The same users for every model: the sample's mean of the full per-user figures.
        assert row["ndcg@10"] == pytest.approx(per_user_ndcg(model, seqs, "test", 10, 8)[sample].mean())
        assert row["ndcg@10_ci95_low"] < row["ndcg@10"] < row["ndcg@10_ci95_high"]
    everyone = evaluate(tmp_path / "f", models, tmp_path / "all", dataclasses.replace(cfg.evaluation, max_users=None))
    assert everyone.test["a"]["n_users"] == 60
    with pytest.raises(ValueError, match="max_users must be at least 1"):
        evaluate(tmp_path / "f", models, tmp_path / "none", dataclasses.replace(cfg.evaluation, max_users=0))


def test_factor_files_load_memory_mapped(tmp_path):
    """Evaluation maps the factor file instead of reading it: the same arrays, read-only, and
    an entry numpy compressed is still read."""
    rng = np.random.default_rng(0)
    model = FactorModel(items={s: rng.normal(size=(7, 3)).astype(np.float32) for s in ("valid", "test")},
                        users={s: rng.normal(size=(11, 3)).astype(np.float32) for s in ("valid", "test")})
    model.save(tmp_path / "factors.npz")
    mapped = FactorModel.load(tmp_path / "factors.npz", mapped=True)
    for split in ("valid", "test"):
        assert isinstance(mapped.users[split], np.memmap) and not mapped.users[split].flags.writeable
        assert np.array_equal(mapped.users[split], model.users[split])
        assert np.array_equal(mapped.items[split], model.items[split])
    np.savez_compressed(tmp_path / "z.npz", items_valid=model.items["valid"], users_valid=model.users["valid"],
                        items_test=model.items["test"], users_test=model.users["test"])
    assert np.array_equal(FactorModel.load(tmp_path / "z.npz", mapped=True).users["test"], model.users["test"])


@pytest.mark.parametrize("tile", [64, 1000])
def test_ranking_in_order_of_item_norm_gives_the_answer_of_scoring_every_item(tile, monkeypatch):
    """Past NORM_TILE items, users stop scoring once no remaining item can reach their top k:
    the same items in the same order as scoring every item (integer vectors, so every dot
    product is exact whatever the order of its sums), with ties at the cut, histories, users
    with fewer than k items left, a NaN user, negative scores and a short last tile; and most
    users do stop early (the point of it)."""
    import components.evaluate as ev
    from components import metrics

    monkeypatch.setattr(ev, "NORM_TILE", tile)
    rng = np.random.default_rng(7)
    n_users, n_items, dim, k = 120, 3001, 6, 20
    # Norms spread over two orders of magnitude, as in ALS factors (popular items long).
    items = (rng.integers(-9, 10, size=(n_items, dim)) * rng.integers(1, 40, size=(n_items, 1))).astype(np.float32)
    users = rng.integers(-9, 10, size=(n_users, dim)).astype(np.float32)
    users[:10] = users[0]  # the same vector: ties everywhere those users share items
    users[10] = np.nan
    users[11] = 0.0  # every score 0: all tied
    lengths = rng.integers(0, 80, size=n_users)
    lengths[12:14] = [n_items - k, n_items - k + 1]  # exactly k left, fewer than k
    rows = [np.sort(rng.choice(n_items, n, replace=False)) for n in lengths]
    exclude = sp.csr_matrix((np.ones(lengths.sum()), np.concatenate(rows), np.r_[0, np.cumsum(lengths)]),
                            shape=(n_users, n_items))
    dense = users @ items.T
    dense[exclude.toarray() > 0] = -np.inf
    scored = []
    real_top = ev._torch_top
    monkeypatch.setattr(ev, "_torch_top", lambda scores, m: scored.append(scores.shape) or real_top(scores, m))
    got = rank(users, items, exclude, k, batch_size=32)
    keep = np.ones(n_users, dtype=bool)
    keep[10] = False  # NaN ranks last in numpy and is re-ranked the same way by `_rank_blocks`
    assert np.array_equal(got[keep], metrics.top_k(dense[keep], k))
    assert np.array_equal(got[10], metrics.top_k(dense[10:11], k)[0])
    if tile == 64:
        assert sum(r * c for r, c in scored) < 0.5 * n_users * n_items  # most items never scored
    # At or below NORM_TILE items every item is scored, as before.
    monkeypatch.setattr(ev, "NORM_TILE", n_items)
    assert np.array_equal(rank(users, items, exclude, k, batch_size=32), got)


def test_ranking_in_order_of_item_norm_stops_only_on_a_safe_bound(monkeypatch):
    """Two edges of the bound: a k-th score overflowed to +inf ties items further down the norm
    order (never a reason to stop), and among subnormals a product rounds up by an absolute
    half step that no relative widening covers."""
    import components.evaluate as ev
    from components import metrics

    monkeypatch.setattr(ev, "NORM_TILE", 8)
    none = sp.csr_matrix((2, 12))
    items = np.zeros((12, 2), np.float32)
    items[0, 0] = 5e19  # 1e20 x 5e19 overflows to +inf, from the smallest norm of those that do
    items[1:6, 1] = 1e21  # the longest vectors, scoring 0
    items[6:9, 0] = 1e20  # overflow too
    items[9:, 0] = 1.0
    users = np.array([[1e20, 0.0], [0.0, 1.0]], np.float32)
    with np.errstate(over="ignore"):
        assert np.array_equal(rank(users, items, none, 3, batch_size=2), metrics.top_k(users @ items.T, 3))

    tiny = np.float32(2.0 ** -74)
    items = np.zeros((12, 1), np.float32)
    items[0] = np.float32(0.7) * tiny  # 0.7 x 2^-149 exactly: rounds up to 2^-149
    items[1:5] = items[6:9] = -1.0  # the longest vectors, scoring below zero
    items[5] = tiny  # 2^-149 exactly
    users = np.array([[2.0 ** -75], [1.0]], np.float32)
    assert np.array_equal(rank(users, items, none, 1, batch_size=2), metrics.top_k(users @ items.T, 1))
