"""ALS baseline: recency confidence, block structure learned, fold-in, outputs."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import polars as pl
import pytest

from components.config import ParamsError
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


def test_confidence_matrix_matches_a_row_by_row_reference():
    # Users of any length (empty ones too), later splits anywhere in a row.
    rng = np.random.default_rng(3)
    rows = [list(rng.integers(0, 12, rng.integers(0, 9))) for _ in range(50)]
    splits = [list(rng.choice(3, len(r), p=[0.6, 0.2, 0.2])) for r in rows]
    seqs = seqs_of([r or [] for r in rows], 12, splits)
    cfg = tiny_params("mf.recency_half_life=1.5", "mf.recency_boost=2.0").mf
    for split, code in (("valid", 1), ("test", 2)):
        expected = np.zeros((len(rows), 12))
        for u, (row, sp_) in enumerate(zip(rows, splits)):
            kept = [i for i, s in zip(row, sp_) if s < code]
            for k, item in enumerate(reversed(kept)):
                expected[u, item] += 1 + 2.0 * 0.5 ** (k / 1.5)
        assert np.allclose(confidence_matrix(seqs, split, cfg).toarray(), expected, rtol=1e-6), split


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


def test_conjugate_gradient_fold_in_matches_the_closed_form():
    # train_mf refines the fitted users by CG steps; the closed form is the reference.
    rng = np.random.default_rng(1)
    rows = [sorted(rng.choice(30, 8, replace=False)) for _ in range(60)]
    cfg = tiny_params("mf.factors=8", "mf.iterations=10", "mf.recency_half_life=0").mf
    X = confidence_matrix(seqs_of(rows, 30), "valid", cfg)
    model = fit_als(X, cfg, seed=0, show_progress=False)
    fitted = model.user_factors.copy()
    exact = fold_in(model, X)
    refined = fold_in(model, X, start=model.user_factors)
    assert refined is model.user_factors  # in place: no second user table
    # Two CG steps from the fitted users (FOLD_IN_CG_STEPS) land within 0.5 % of the closed form ...
    assert np.abs(refined - exact).max() < 5e-3 * np.abs(exact).max()
    # ... and are not a no-op: the fitted users were solved against the previous item factors.
    assert np.abs(fitted - exact).max() > 10 * np.abs(refined - exact).max()


def _features(tmp_path, params):
    from components.synthetic import generate
    from components.datasets import RawDataset, normalize

    inter, items = normalize(RawDataset(*generate(params.data.synthetic, 0), "synthetic", ""))
    (tmp_path / "data").mkdir()
    inter.write_parquet(tmp_path / "data" / "interactions.parquet")
    items.write_parquet(tmp_path / "data" / "items.parquet")
    return build_features(tmp_path / "data", tmp_path / "features", params.features)


def test_refit_continues_from_the_validation_model(tmp_path):
    params = tiny_params("mf.refit=continue", "mf.refit_iterations=0")
    _features(tmp_path, params)
    still = FactorModel.load(train_mf(tmp_path / "features", tmp_path / "mf0", params.mf, params.seed).factors_path)
    # No refit iterations: the validation model's items, users folded in from the longer history.
    assert np.array_equal(still.items["valid"], still.items["test"])
    assert not np.allclose(still.users["valid"], still.users["test"])
    params = tiny_params("mf.refit=continue", "mf.refit_iterations=2")
    moved = FactorModel.load(train_mf(tmp_path / "features", tmp_path / "mf2", params.mf, params.seed).factors_path)
    # The validation tables are kept as they were (the refit works on copies) ...
    assert np.array_equal(moved.items["valid"], still.items["valid"])
    assert np.array_equal(moved.users["valid"], still.users["valid"])
    # ... and two iterations from them move the items less than a fresh fit's distance away.
    fresh = FactorModel.load(train_mf(tmp_path / "features", tmp_path / "mf", tiny_params().mf, params.seed).factors_path)
    step = np.abs(moved.items["test"] - moved.items["valid"]).mean()
    assert 0 < step < np.abs(fresh.items["test"] - fresh.items["valid"]).mean()
    record = json.loads((tmp_path / "mf2" / "model.json").read_text())
    assert record["refit"] == "continue" and record["refit_iterations"] == 2 and set(record["phase_seconds"]) == {
        "fit_valid", "fold_in_valid", "fit_test", "fold_in_test"}
    with pytest.raises(ParamsError, match="mf.refit_iterations must be at least 0"):
        tiny_params("mf.refit_iterations=-1")


def test_als_device():
    import implicit.gpu

    from components.train_mf import als_device

    if implicit.gpu.HAS_CUDA:
        pytest.skip("implicit's CUDA build finds a GPU here")
    # No CUDA build here: auto fits on the CPU, cuda says what to install.
    assert als_device("auto") == als_device("cpu") == "cpu"
    with pytest.raises(ParamsError, match="rmm-cu12"):  # a one-line error from the CLI, exit 2
        als_device("cuda")


def test_train_mf_outputs(tmp_path, params, caplog, monkeypatch):
    feats = _features(tmp_path, params)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under `pytest -s`
    with caplog.at_level("INFO", logger="components.train_mf"):
        res = train_mf(tmp_path / "features", tmp_path / "mf", params.mf, params.seed)
    # Off a terminal, each iteration of both fits is a log line (a 100M fit runs 15 minutes).
    assert sum("ALS iteration" in r.getMessage() for r in caplog.records) == 2 * params.mf.iterations
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
