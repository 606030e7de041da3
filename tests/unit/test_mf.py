"""ALS baseline: recency confidence, block structure learned, fold-in, outputs."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from components.evaluate import FactorModel, rank
from components.features import build_features
from components.sequences import Sequences
from components.train_mf import confidence_matrix, fit_als, fold_in, train_mf
from tests.conftest import tiny_params


def seqs_of(rows: list[list[int]], n_items: int, splits: list[list[int]] | None = None) -> Sequences:
    indptr = np.concatenate(([0], np.cumsum([len(r) for r in rows])))
    items = np.concatenate(rows).astype(np.int32)
    split = np.concatenate(splits).astype(np.int8) if splits else np.zeros(items.size, np.int8)
    return Sequences(indptr, items, np.arange(items.size), np.ones(items.size, np.float32), split, n_items)


def test_recency_confidence_worked_example():
    cfg = tiny_params("mf.recency_half_life=1.0", "mf.recency_boost=3.0").mf
    seqs = seqs_of([[0, 1, 2, 3]], 5, [[0, 0, 0, 2]])
    m = confidence_matrix(seqs, "test", cfg).toarray()[0]
    # History before test is items 0, 1, 2; item 2 is the latest (k=0): 1 + 3 * 0.5^0 = 4.
    assert m.tolist() == pytest.approx([1 + 3 * 0.25, 1 + 3 * 0.5, 4.0, 0.0, 0.0])
    plain = confidence_matrix(seqs, "test", tiny_params("mf.recency_half_life=0").mf).toarray()[0]
    assert plain.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_als_learns_block_structure():
    # Two communities: users 0-19 use items 0-9, users 20-39 use items 10-19.
    rng = np.random.default_rng(0)
    rows = [sorted(rng.choice(10, 6, replace=False) + (0 if u < 20 else 10)) for u in range(40)]
    seqs = seqs_of(rows, 20)
    cfg = tiny_params("mf.factors=4", "mf.iterations=10", "mf.regularization=0.1", "mf.alpha=10.0",
                      "mf.recency_half_life=0").mf
    X = confidence_matrix(seqs, "valid", cfg)
    model = fit_als(X, cfg, seed=0, show_progress=False)
    users = fold_in(model, X)
    top = rank(users, np.asarray(model.item_factors), X, 3, 64)
    in_block = np.where(np.arange(40)[:, None] < 20, top < 10, top >= 10)
    assert in_block.mean() > 0.95
    # A new user folded in from two items of community B gets community-B items.
    new = confidence_matrix(seqs_of([[12, 15]], 20), "valid", cfg)
    top_new = rank(fold_in(model, new), np.asarray(model.item_factors), new, 3, 64)
    assert (top_new >= 10).all()


def test_train_mf_outputs(tmp_path, params):
    from components.synthetic import generate
    from components.datasets import RawDataset, normalize

    inter, items = normalize(RawDataset(*generate(params.data.synthetic, 0), "synthetic", ""))
    (tmp_path / "data").mkdir()
    inter.write_parquet(tmp_path / "data" / "interactions.parquet")
    items.write_parquet(tmp_path / "data" / "items.parquet")
    feats = build_features(tmp_path / "data", tmp_path / "features", params.features)
    res = train_mf(tmp_path / "features", tmp_path / "mf", params.mf, params.seed)
    model = FactorModel.load(res.factors_path)
    for split in ("valid", "test"):
        assert model.items[split].shape == (feats.n_items, params.mf.factors)
        assert model.users[split].shape == (feats.n_users, params.mf.factors)
        assert np.isfinite(model.users[split]).all()
    # The test model is refitted on more data, so its item table differs from validation's.
    assert not np.allclose(model.items["valid"], model.items["test"])
    ids = json.loads((tmp_path / "mf" / "ids.json").read_text())
    assert len(ids["items"]) == feats.n_items and len(ids["users"]) == feats.n_users
    assert ids["items"] == pl.read_parquet(tmp_path / "features" / "items.parquet")["item_id"].to_list()
