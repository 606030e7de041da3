"""Quality targets on the real datasets (slow: full-size training)."""

from __future__ import annotations

import pytest

from benchmarks.common import dataset_params
from benchmarks.quality import run_dataset
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Reference ALS figures from ../shared/datasets/README.md (NDCG@10).
REFERENCE_MF_NDCG = {"movielens-100k": 0.048, "amazon-scientific": 0.085}


@pytest.mark.parametrize("dataset,fixture", [("movielens-100k", "movielens_dir"), ("amazon-scientific", "amazon_dir")])
def test_mf_matches_reference_and_beats_popularity(dataset, fixture, request, tmp_path):
    data_dir = request.getfixturevalue(fixture)
    params = dataset_params(REPO / "params.yaml", dataset, data_dir)
    rows = run_dataset(dataset, ["popularity", "mf"], params, tmp_path)
    assert rows["mf"]["ndcg@10"] >= REFERENCE_MF_NDCG[dataset]
    assert rows["mf"]["ndcg@10"] >= 2 * rows["popularity"]["ndcg@10"]
