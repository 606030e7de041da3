"""Shared fixtures: the real params.yaml, shrunk (tiny data, few iterations), and real datasets.

Tests never change params.yaml; they apply `--set`-style overrides to it, so the real wiring is
exercised and a key renamed in params.yaml breaks the tests that use it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
MOVIELENS = DATASETS / "movielens-100k"
AMAZON = DATASETS / "amazon-scientific"

# A dataset small enough that the whole pipeline runs in seconds.
TINY = [
    "data.synthetic.n_users=150",
    "data.synthetic.n_items=120",
    "data.synthetic.n_interactions=3000",
    "data.synthetic.n_topics=6",
    "validation.min_interactions=100",
    "features.min_user_interactions=3",
    "features.min_item_interactions=2",
    "mf.factors=16",
    "mf.iterations=5",
    "mf.num_threads=1",
    "bert.hidden_size=16",
    "bert.num_layers=1",
    "bert.intermediate_size=32",
    "bert.max_len=12",
    "bert.batch_size=64",
    # Off by default; the tests keep running the cloze stage (the pipeline's widest path).
    "bert.pretrain.enabled=true",
    "bert.pretrain.max_epochs=1",
    "bert.finetune.max_epochs=2",
    "bert.refit_epochs=1",
    "bert.trainer.num_threads=1",
    "compress.prune.recovery_epochs=1",
    "export.parity_users=64",
]


def tiny_params(*overrides: str) -> Params:
    return load_params(REPO / "params.yaml", [*TINY, *overrides])


@pytest.fixture
def params() -> Params:
    return tiny_params()


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS / "u.data").exists():
        pytest.skip("MovieLens-100K not available in ../shared/datasets")
    return MOVIELENS


@pytest.fixture
def amazon_dir() -> Path:
    if not (AMAZON / "Scientific.text").exists():
        pytest.skip("Amazon-Scientific not available in ../shared/datasets")
    return AMAZON
