"""The real datasets (skipped when ../shared/datasets is absent)."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.common import dataset_params
from components.features import build_features
from components.validate import validate
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_movielens_sizes_with_filtering_off(movielens_dir, tmp_path):
    params = dataset_params(REPO / "params.yaml", "movielens-100k", movielens_dir)
    assert validate(params.data, params.validation, params.seed, tmp_path / "v", tmp_path / "data").success
    res = build_features(tmp_path / "data", tmp_path / "f", params.features)
    assert (res.n_users, res.n_items, res.n_interactions) == (943, 1682, 100_000)
    stats = json.loads((tmp_path / "f" / "stats.json").read_text())
    assert stats["n_eval_users"] == {"valid": 943, "test": 943}


def test_amazon_keeps_published_split(amazon_dir, tmp_path):
    params = dataset_params(REPO / "params.yaml", "amazon-scientific", amazon_dir)
    assert validate(params.data, params.validation, params.seed, tmp_path / "v", tmp_path / "data").success
    res = build_features(tmp_path / "data", tmp_path / "f", params.features)
    assert (res.n_users, res.n_items, res.n_interactions) == (8442, 4385, 59_427)
    assert res.split_source == "source"


def test_corrupted_movielens_copy_fails_validation(movielens_dir, tmp_path):
    copy = tmp_path / "ml"
    copy.mkdir()
    shutil.copy(movielens_dir / "u.item", copy / "u.item")
    lines = (movielens_dir / "u.data").read_text().splitlines()
    lines[0] = "1\t99999\t3\t881250949"  # unknown item id
    lines[1] = "2\t50\t4\t-881250949"  # negative timestamp
    lines += lines[100:2100]  # 2,000 duplicated rows (2% > the 1% allowed)
    (copy / "u.data").write_text("\n".join(lines) + "\n")
    params = dataset_params(REPO / "params.yaml", "movielens-100k", copy)
    result = validate(params.data, params.validation, params.seed, tmp_path / "v", tmp_path / "data")
    assert not result.success
    assert {"item_id_known", "timestamp_not_too_old", "duplicate_rows"} <= set(result.failed_checks)
    unknown = next(f for f in result.failures if f.check == "item_id_known")
    assert unknown.examples == ["99999"]
    assert not (tmp_path / "data").exists()
    with pytest.raises(FileNotFoundError, match="run validation first"):
        build_features(tmp_path / "data", tmp_path / "f", params.features)
    assert not (tmp_path / "f" / "sequences.npz").exists()
