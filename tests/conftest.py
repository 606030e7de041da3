"""Shared fixtures: the real params.yaml, shrunk (tiny data, few iterations), and real datasets.

Tests never change params.yaml; they apply `--set`-style overrides to it, so the real wiring is
exercised and a key renamed in params.yaml breaks the tests that use it.
"""

from __future__ import annotations

import functools
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


# Loss settings other than the defaults, for tests that a trainer passes them on.
LOSS_OVERRIDES = ["bert.loss=sampled", "bert.num_negatives=7", "bert.negative_sampling=uniform",
                  "bert.recency_half_life=2", "bert.recency_boost=3", "bert.weight_decay=0.25"]
LOSS_SETTINGS = {"loss": "sampled", "num_negatives": 7, "negative_sampling": "uniform",
                 "recency_half_life": 2.0, "recency_boost": 3.0, "weight_decay": 0.25}


def tiny_params(*overrides: str) -> Params:
    return load_params(REPO / "params.yaml", [*TINY, *overrides])


@pytest.fixture
def params() -> Params:
    return tiny_params()


@pytest.fixture
def built_modules(monkeypatch) -> list:
    """Every `SeqRecModule` built while the test runs, in order (what its trainer configured)."""
    from components.bert.module import SeqRecModule

    built, init = [], SeqRecModule.__init__

    @functools.wraps(init)  # Lightning reads the hyperparameters' names off the signature
    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(SeqRecModule, "__init__", record)
    return built


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
