"""benchmarks.ensembles: EASE's closed form, mixtures of z-scored models, weights chosen on
validation as the evaluate stage would score them, and runs that cannot be mixed refused."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest

import benchmarks.ensembles as ensembles
from benchmarks.ensembles import EnsembleError, ease, run, simplex
from components.evaluate import per_user_ndcg
from components.factors import FILE_NAME, FactorModel
from components.fusion import mix
from components.sequences import load_sequences, write_sequences
from tests.conftest import REPO

N_USERS, N_ITEMS = 80, 25


def write_run(root: Path, seed: int = 0, data_seed: int = 0) -> None:
    """A finished run's dataset folder: sequences (each user's last event the test, the one
    before it the validation) and random MF and bert factor files."""
    rng = np.random.default_rng(data_seed)
    lengths = rng.integers(4, 9, N_USERS)
    items = np.concatenate([rng.choice(N_ITEMS, n, replace=False) for n in lengths])
    split = np.concatenate([[0] * (n - 2) + [1, 2] for n in lengths]).astype(np.int8)
    features = root / "features"
    features.mkdir(parents=True)
    write_sequences(features, np.concatenate([[0], np.cumsum(lengths)]), items, np.arange(items.size),
                    np.ones(items.size, np.float32), split)
    (features / "stats.json").write_text(json.dumps({"n_items": N_ITEMS}))
    rng = np.random.default_rng(100 + seed)
    for model, dim in (("mf", 4), ("bert", 6)):
        FactorModel(items={s: rng.normal(size=(N_ITEMS, dim)).astype(np.float32) for s in ("valid", "test")},
                    users={s: rng.normal(size=(N_USERS, dim)).astype(np.float32) for s in ("valid", "test")}
                    ).save(root / model / FILE_NAME)


def test_ease_is_the_constrained_least_squares_solution(tmp_path):
    """B minimises |X - XB|^2 + lam |B|^2 with a zero diagonal: its stationarity condition makes
    (X'X + lam I) B - X'X diagonal. The test split's B is fitted on training + validation."""
    write_run(tmp_path)
    seqs = load_sequences(tmp_path / "features")
    model = ease(seqs, 5.0)
    for split in ("valid", "test"):
        x = seqs.history_matrix(split).toarray()
        x[x > 0] = 1.0
        b = model.items[split].T.astype(np.float64)
        assert np.allclose(np.diag(b), 0.0)
        kkt = (x.T @ x + 5.0 * np.eye(N_ITEMS)) @ b - x.T @ x
        assert np.allclose(kkt - np.diag(np.diag(kkt)), 0.0, atol=1e-4)
        assert np.array_equal(model.users[split], x.astype(np.float32))
    assert not np.allclose(model.items["valid"], model.items["test"])
    with pytest.raises(EnsembleError, match="lambda must be positive"):
        ease(seqs, 0.0)


@pytest.mark.parametrize("n,grid", [(2, 21), (3, 11), (3, 2)])
def test_the_simplex_grid_holds_every_weighting_once(n, grid):
    points = simplex(n, grid)
    assert len(points) == len(set(points)) == comb(grid - 1 + n - 1, n - 1)
    assert all(len(p) == n and abs(sum(p) - 1) < 1e-12 and min(p) >= 0 for p in points)


def test_weights_are_the_best_on_validation_and_rows_scored_as_evaluate_scores(tmp_path):
    roots = [tmp_path / "a", tmp_path / "b"]
    for seed, root in enumerate(roots):
        write_run(root, seed=seed)
    out = run(roots, [1.0, 50.0], grid_size=5, batch_size=16)
    rows = {r["model"]: r for r in out["rows"]}
    seqs = load_sequences(roots[0] / "features")
    mf = FactorModel.load(roots[0] / "mf" / FILE_NAME)
    bert = FactorModel.load(roots[0] / "bert" / FILE_NAME)
    assert rows["mf"]["ndcg@10"] == pytest.approx(per_user_ndcg(mf, seqs, "test", 10, 16).mean())
    assert rows["mf"]["ratio_to_mf"] == pytest.approx(1.0)
    assert rows["bert (a)"]["ndcg@10"] == pytest.approx(per_user_ndcg(bert, seqs, "test", 10, 16).mean())
    e = ease(seqs, rows["ease"]["lambda"])
    assert rows["ease"]["valid_ndcg@10"] == pytest.approx(
        max(per_user_ndcg(ease(seqs, v), seqs, "valid", 10, 16).mean() for v in (1.0, 50.0)))
    average = mix([bert, FactorModel.load(roots[1] / "bert" / FILE_NAME)], [0.5, 0.5])
    assert rows["bert, 2 runs averaged"]["ndcg@10"] == pytest.approx(per_user_ndcg(average, seqs, "test", 10, 16).mean())
    # Each mixture's weights are the best on validation, as the evaluate stage scores them.
    for name, models in (("fused bert + mf", [bert, mf]), ("fused bert (2 runs averaged) + mf", [average, mf]),
                         ("fused bert + mf + ease", [bert, mf, e])):
        fused = rows[name]
        best = max(per_user_ndcg(mix(models, list(w)), seqs, "valid", 10, 16).mean() for w in simplex(len(models), 5))
        assert fused["valid_ndcg@10"] == pytest.approx(best), name
        assert len(fused["validation_curve"]) == len(simplex(len(models), 5))
        chosen = mix(models, fused["weights"])
        assert fused["ndcg@10"] == pytest.approx(per_user_ndcg(chosen, seqs, "test", 10, 16).mean()), name
        assert fused["ci95"][0] <= fused["ratio_to_mf"] <= fused["ci95"][1]


def test_no_choice_reads_the_test_split(tmp_path):
    """Other test targets and test-split factors change the test rows, never a weight or
    lambda: those are chosen on validation alone."""
    write_run(tmp_path / "a")
    lambdas = [0.1, 1.0, 10.0, 100.0, 1000.0]
    before = {r["model"]: r for r in run([tmp_path / "a"], lambdas, grid_size=5, batch_size=16)["rows"]}
    rng = np.random.default_rng(7)
    seqs = load_sequences(tmp_path / "a" / "features")
    items = seqs.items.copy()
    test = seqs.split == 2
    items[test] = rng.integers(0, N_ITEMS, test.sum())  # (a repeat of a history item is fine here)
    write_sequences(tmp_path / "a" / "features", seqs.indptr, items, seqs.timestamps, seqs.weights, seqs.split)
    for model in ("mf", "bert"):
        m = FactorModel.load(tmp_path / "a" / model / FILE_NAME)
        FactorModel(items={"valid": m.items["valid"], "test": rng.normal(size=m.items["test"].shape).astype(np.float32)},
                    users={"valid": m.users["valid"], "test": rng.normal(size=m.users["test"].shape).astype(np.float32)}
                    ).save(tmp_path / "a" / model / FILE_NAME)
    after = {r["model"]: r for r in run([tmp_path / "a"], lambdas, grid_size=5, batch_size=16)["rows"]}
    assert [r["ndcg@10"] for r in after.values()] != [r["ndcg@10"] for r in before.values()]
    for name, row in before.items():
        for chosen in ("weights", "lambda", "valid_ndcg@10"):
            assert row.get(chosen) == after[name].get(chosen), (name, chosen)


def test_ties_go_to_the_most_even_weights_as_the_products_fusion(tmp_path):
    """MF the same model as bert: every weighting ranks alike, and the even mix is chosen."""
    write_run(tmp_path / "a")
    (tmp_path / "a" / "mf" / FILE_NAME).write_bytes((tmp_path / "a" / "bert" / FILE_NAME).read_bytes())
    fused = {r["model"]: r for r in run([tmp_path / "a"], [1.0], grid_size=5, batch_size=16)["rows"]}["fused bert + mf"]
    assert len({v for *_, v in fused["validation_curve"]}) == 1
    assert fused["weights"] == [0.5, 0.5]


def test_runs_over_other_sequences_are_refused_by_name(tmp_path, monkeypatch):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", data_seed=1)
    with pytest.raises(EnsembleError, match=r"other sequences than .*a.*: .*b"):
        run([tmp_path / "a", tmp_path / "b"], [1.0], grid_size=3, batch_size=16)
    monkeypatch.setattr(ensembles, "EASE_MAX_ITEMS", N_ITEMS - 1)
    with pytest.raises(EnsembleError, match=f"{N_ITEMS} items is more than {N_ITEMS - 1}"):
        run([tmp_path / "a"], [1.0], grid_size=3, batch_size=16)
    monkeypatch.setattr(ensembles, "MAX_SCORE_BYTES", 16 * N_USERS * N_ITEMS - 1)
    monkeypatch.setattr(ensembles, "EASE_MAX_ITEMS", N_ITEMS)
    with pytest.raises(EnsembleError, match=f"{N_USERS} users x {N_ITEMS} items: the validation scores"):
        run([tmp_path / "a"], [1.0], grid_size=3, batch_size=16)
    (tmp_path / "c").mkdir()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ensembles", "--runs", str(tmp_path / "a"),
                           str(tmp_path / "c"), "--out", str(tmp_path / "e.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"missing {tmp_path / 'c'}/features/sequences.npz" in proc.stderr
    assert not (tmp_path / "e.json").exists()
