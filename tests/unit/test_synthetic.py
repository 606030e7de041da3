import dataclasses

import numpy as np
import polars as pl
import pytest

from components.synthetic import generate
from tests.conftest import tiny_params


@pytest.fixture
def cfg():
    return tiny_params().data.synthetic


def test_deterministic_for_a_seed(cfg):
    a_inter, a_items = generate(cfg, 3)
    b_inter, b_items = generate(cfg, 3)
    assert a_inter.equals(b_inter) and a_items.equals(b_items)
    c_inter, _ = generate(cfg, 4)
    assert not a_inter.equals(c_inter)


def test_schema_and_sizes(cfg):
    inter, items = generate(cfg, 0)
    assert inter.schema == pl.Schema(
        {"user_id": pl.Utf8, "item_id": pl.Utf8, "timestamp": pl.Int64, "weight": pl.Float64}
    )
    assert set(items.columns) >= {"item_id", "text"}
    assert items.height == cfg.n_items
    assert inter["user_id"].n_unique() == cfg.n_users
    # n_interactions is a target, met within a few percent after repeats are dropped.
    assert 0.85 * cfg.n_interactions <= inter.height <= 1.05 * cfg.n_interactions
    assert inter["item_id"].is_in(items["item_id"].implode()).all()
    assert inter.select(pl.struct("user_id", "item_id").is_unique().all()).item()
    assert inter["weight"].is_between(1, 5).all()


def test_timestamps_increase_per_user(cfg):
    inter, _ = generate(cfg, 0)
    ok = inter.group_by("user_id").agg(pl.col("timestamp").diff().drop_nulls().min().alias("d"))
    assert (ok["d"].fill_null(1) > 0).all()


def test_order_carries_signal(cfg):
    """Consecutive items are chain successors far more often than chance."""
    cfg = dataclasses.replace(cfg, successor_prob=0.6, topic_switch_prob=0.1)
    inter, items = generate(cfg, 0)
    idx = {iid: i for i, iid in enumerate(items["item_id"])}
    text = items["text"].to_list()
    parts = np.array([int(t.split("part ")[1].split(" ")[0]) for t in text])
    topics = items["topic"].to_numpy()
    seq = np.array([idx[i] for i in inter["item_id"]])
    same_user = inter["user_id"].to_numpy()[1:] == inter["user_id"].to_numpy()[:-1]
    a, b = seq[:-1][same_user], seq[1:][same_user]
    successor = (topics[a] == topics[b]) & (parts[b] == parts[a] + 1)
    chance = 1.0 / cfg.n_items
    assert successor.mean() > 50 * chance


def test_text_carries_topic(cfg):
    _, items = generate(cfg, 0)
    for topic, group in items.group_by("topic"):
        categories = {t.rsplit("Category: ", 1)[1] for t in group["text"]}
        assert len(categories) == 1


@pytest.mark.parametrize("field,value", [("n_users", 0), ("successor_prob", 1.5), ("n_topics", 10_000)])
def test_invalid_config(cfg, field, value):
    with pytest.raises(ValueError, match=field):
        generate(dataclasses.replace(cfg, **{field: value}), 0)
