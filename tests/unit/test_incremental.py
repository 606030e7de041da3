"""Drift, the update decision and the incremental update (components/incremental.py)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from components.bert.model import SeqRecConfig, SeqRecModel
from components.config import load_params
from tests.conftest import LOSS_OVERRIDES, LOSS_SETTINGS
from components.incremental import (
    FULL, INCREMENTAL, NOTHING, Events, decide, extend_items, incremental_update, js_divergence, measure_drift,
    train_steps,
)

N_ITEMS = 200


def events(items: np.ndarray, users: np.ndarray | None = None, start: int = 0, hours: float = 100.0) -> Events:
    users = np.arange(items.size) % 50 if users is None else users
    return Events(users.astype(np.int64), items.astype(np.int64),
                  (start + np.linspace(0, hours * 3600, items.size)).astype(np.int64))


def zipf_items(rng: np.random.Generator, n: int, n_items: int = N_ITEMS) -> np.ndarray:
    p = 1.0 / np.arange(1, n_items + 1)
    return rng.choice(n_items, n, p=p / p.sum())


@pytest.fixture
def cfg():
    return load_params().incremental


def test_js_divergence_bounds():
    assert js_divergence(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert 0 < js_divergence(np.array([3, 1]), np.array([1, 3])) < 1


def test_same_distribution_is_an_incremental_update(cfg):
    rng = np.random.default_rng(0)
    base = events(zipf_items(rng, 20_000))
    window = events(zipf_items(rng, 300), start=400_000, hours=1)
    drift = measure_drift(base, window, N_ITEMS)
    # A small window is far from any distribution by chance; the noise floor takes that out.
    assert drift.popularity_divergence > 0.1
    assert drift.popularity_divergence_excess < 0.1
    assert drift.unseen_item_share == 0.0
    assert decide(drift, 0, cfg).action == INCREMENTAL


def test_new_items_taking_the_window_force_a_full_retrain(cfg):
    rng = np.random.default_rng(1)
    base = events(zipf_items(rng, 20_000))
    items = zipf_items(rng, 500)
    moved = rng.random(items.size) < 0.8
    items[moved] = N_ITEMS + rng.integers(0, 20, int(moved.sum()))  # a block of brand-new items
    drift = measure_drift(base, events(items, start=400_000, hours=1), N_ITEMS)
    assert drift.unseen_item_share == pytest.approx(moved.mean())
    decision = decide(drift, 0, cfg)
    assert decision.action == FULL
    assert "never seen" in decision.reason and "incremental.unseen_item_share" in decision.reason


def test_popularity_shift_forces_a_full_retrain(cfg):
    rng = np.random.default_rng(2)
    base = events(zipf_items(rng, 20_000))
    # The same items, popularity reversed: the tail takes the window.
    window = events(N_ITEMS - 1 - zipf_items(rng, 2_000), start=400_000, hours=1)
    drift = measure_drift(base, window, N_ITEMS)
    assert drift.unseen_item_share == 0.0
    decision = decide(drift, 0, cfg)
    assert decision.action == FULL and "popularity" in decision.reason


def test_too_few_events_or_too_many_updates(cfg):
    rng = np.random.default_rng(3)
    base = events(zipf_items(rng, 20_000))
    tiny = measure_drift(base, events(zipf_items(rng, cfg.min_events - 1), start=400_000), N_ITEMS)
    assert decide(tiny, 0, cfg).action == NOTHING
    normal = measure_drift(base, events(zipf_items(rng, 1_000), start=400_000, hours=1), N_ITEMS)
    assert decide(normal, cfg.max_updates_between_full - 1, cfg).action == INCREMENTAL
    decision = decide(normal, cfg.max_updates_between_full, cfg)
    assert decision.action == FULL and "max_updates_between_full" in decision.reason


def test_event_rate_threshold_only_when_set(cfg):
    rng = np.random.default_rng(4)
    base = events(zipf_items(rng, 20_000), hours=1000)  # 20 events an hour
    burst = measure_drift(base, events(zipf_items(rng, 2_000), start=10**7, hours=1), N_ITEMS)
    assert burst.event_rate_ratio == pytest.approx(100, rel=0.05)
    assert decide(burst, 0, dataclasses.replace(cfg, event_rate_ratio=None)).action == INCREMENTAL
    decision = decide(burst, 0, dataclasses.replace(cfg, event_rate_ratio=10.0))
    assert decision.action == FULL and "event rate" in decision.reason


def test_history_length_ratio_counts_new_users():
    base = events(np.arange(100) % N_ITEMS, users=np.arange(100) % 10)  # 10 users, 10 events each
    window = events(np.arange(10), users=np.array([0] * 5 + list(range(100, 105))), start=400_000)
    drift = measure_drift(base, window, N_ITEMS)
    assert drift.users == 6 and drift.new_users == 5
    assert drift.history_length_ratio == pytest.approx((10 / 6) / 10)


def tiny_model(mode: str = "text+id", n_items: int = 30) -> SeqRecModel:
    torch.manual_seed(0)
    cfg = SeqRecConfig(n_items=n_items, mode=mode, text_dim=8 if "text" in mode else 0, hidden_size=16,
                       num_layers=1, num_heads=2, intermediate_size=32, max_len=12, dropout=0.0)
    text = torch.randn(n_items, 8) if "text" in mode else None
    return SeqRecModel(cfg, text_features=text).eval()


def test_extend_items_keeps_old_items_and_adds_new_ones_from_text():
    model = tiny_model()
    new_text = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    bigger = extend_items(model, 35, new_text)
    assert bigger.cfg.n_items == 35
    with torch.no_grad():
        old, new = model.item_representations(), bigger.item_representations()
        torch.testing.assert_close(new[:30], old)
        # New items: their text through the champion's projection, a zero id vector.
        torch.testing.assert_close(new[30:], model.project_text(torch.as_tensor(new_text)))
        history = torch.tensor([[3, 7, 11]])
        torch.testing.assert_close(bigger.user_vectors(history), model.user_vectors(history))
    assert model.cfg.n_items == 30  # the champion itself is untouched


def test_extend_items_refuses_what_it_cannot_do():
    model = tiny_model()
    with pytest.raises(ValueError, match="shrink"):
        extend_items(model, 20)
    with pytest.raises(ValueError, match="text embeddings of shape"):
        extend_items(model, 35, np.zeros((4, 8), np.float32))
    id_only = extend_items(tiny_model("id"), 33)
    assert torch.count_nonzero(id_only.id_embedding.weight[30:]) == 0


def test_incremental_update_learns_the_new_pattern():
    """The changed users follow a pattern (item i -> i + 1); a few hundred steps on their
    sequences make the model rank the next item first far more often than before."""
    params = load_params()
    bert = dataclasses.replace(params.bert, dropout=0.0, loss="full")
    model = tiny_model("id")
    rng = np.random.default_rng(0)
    changed = [np.arange(s, s + 10) % 30 for s in rng.integers(0, 30, 40)]
    others = [rng.integers(0, 30, 10) for _ in range(100)]

    def top1() -> float:
        with torch.no_grad():
            histories = torch.as_tensor(np.stack([s[:-1] for s in changed]))
            scores = model.scores(model.user_vectors(histories))
        return float((scores.argmax(1).numpy() == np.array([s[-1] for s in changed])).mean())

    before = top1()
    cfg = dataclasses.replace(params.incremental, steps=150, lr=0.01, batch_size=32, replay_ratio=0.5)
    result = incremental_update(model, changed, others, cfg, bert, seed=0)
    assert result.changed_sequences == 40 and result.replayed_sequences == 20 and result.steps == 150
    assert before < 0.2 and top1() > 0.8


def test_train_steps_calls_back_every_n_steps():
    params = load_params()
    model = tiny_model("id")
    seen = []
    seqs = [np.arange(10) % 30 for _ in range(8)]
    loss = train_steps(model, seqs, 9, 0.001, 4, params.bert, 0, every=3, after=seen.append)
    assert seen == [3, 6, 9] and np.isfinite(loss)
    assert np.isnan(train_steps(model, [np.array([1])], 5, 0.001, 4, params.bert, 0))  # nothing to predict


def test_train_steps_train_on_the_configured_loss(built_modules):
    bert = load_params(overrides=LOSS_OVERRIDES).bert
    train_steps(tiny_model("id"), [np.arange(10) % 30 for _ in range(8)], 2, 0.001, 4, bert, 0)
    (module,) = built_modules
    assert {k: module.hparams[k] for k in LOSS_SETTINGS} == LOSS_SETTINGS


def test_store_exports_after_a_watermark(tmp_path):
    """The flow's window: events after the watermark, the next watermark, refused rows kept."""
    import csv

    from serving.store import EventStore

    store = EventStore(tmp_path / "events.db")
    store.add_many([("u1", "a", 100, None), ("u1", "b", 101, None)])
    assert store.last_seq() == 2
    store.add_many([("u2", "c", 102, None), ("u2", "d", -1, None)])
    out, quarantine = tmp_path / "out.csv", tmp_path / "q.csv"
    export = store.export_csv(out, quarantine, after_seq=2)
    assert (export.exported, export.quarantined, export.last_seq) == (1, 1, 4)
    assert [r["item_id"] for r in csv.DictReader(out.open())] == ["c"]
    assert "before" in next(csv.DictReader(quarantine.open()))["reason"]
    nothing = store.export_csv(out, quarantine, after_seq=export.last_seq)
    assert (nothing.exported, nothing.quarantined, nothing.last_seq) == (0, 0, 4)
    store.close()


def test_store_export_stops_at_an_event_still_settling(tmp_path):
    """Replicas on PostgreSQL number events when they start writing them, so event 4 can commit
    after event 5: an export stops at the first event received too recently, and its watermark
    stays below it, so that the next export takes it."""
    import sqlite3

    from serving.store import EventStore

    db = tmp_path / "events.db"
    store = EventStore(db)
    store.add_many([("u1", "a", 100, None), ("u1", "b", 101, None), ("u2", "c", 102, None),
                    ("u2", "d", 103, None), ("u3", "e", 104, None)])
    now = time.time()
    with sqlite3.connect(db) as conn:  # arrival times: 4 is recent, 5 (another replica) is not
        conn.executemany("UPDATE events SET received_at = ? WHERE seq = ?",
                         [(now - 600, 1), (now - 600, 2), (now - 600, 3), (now - 5, 4), (now - 600, 5)])
    out, quarantine = tmp_path / "out.csv", tmp_path / "q.csv"
    first = store.export_csv(out, quarantine, after_seq=1, received_before=now - 60)
    assert (first.exported, first.last_seq, first.waiting) == (2, 3, 2)
    later = store.export_csv(out, quarantine, after_seq=first.last_seq, received_before=now + 60)
    assert (later.exported, later.last_seq, later.waiting) == (2, 5, 0)
    store.close()


def test_old_update_roots_go_except_the_newest_and_protected(tmp_path):
    from flows.incremental import roots_to_remove

    roots = [tmp_path / f"2026112{d}T000000000000" for d in range(7)]
    protected = {roots[1].resolve(), roots[6].resolve()}
    assert roots_to_remove(roots, 3, protected) == [roots[0], roots[2], roots[3]]
    assert roots_to_remove(list(reversed(roots)), 3, protected) == [roots[0], roots[2], roots[3]]
    assert roots_to_remove(roots, None, set()) == [] and roots_to_remove(roots, 10, set()) == []
    # A folder the flow did not name is neither counted nor removed.
    assert roots_to_remove([*roots, tmp_path / "manual-copy"], 3, protected) == [roots[0], roots[2], roots[3]]


@pytest.mark.parametrize("setting, message", [
    ("incremental.keep_roots=0", "keep_roots must be at least 1"),
    ("incremental.settle_seconds=-1", "must be numbers >= 0"),
    ("incremental.lock_wait_seconds=-5", "must be numbers >= 0"),
    ("incremental.settle_seconds=.nan", "must be numbers >= 0"),
])
def test_incremental_settings_out_of_range_are_refused_by_name(setting, message):
    from components.config import ParamsError

    with pytest.raises(ParamsError, match=message):
        load_params(overrides=[setting])


def test_window_drift_maps_ids_to_the_champion_features(tmp_path):
    import polars as pl

    from components.incremental import window_drift

    features = tmp_path / "features"
    features.mkdir()
    pl.DataFrame({"user_idx": [0, 0, 1, 1], "item_idx": [0, 1, 1, 2], "timestamp": [0, 3600, 0, 7200],
                  "split": ["train", "train", "train", "test"]}).write_parquet(features / "interactions.parquet")
    pl.DataFrame({"item_idx": [0, 1, 2], "item_id": ["a", "b", "c"]}).write_parquet(features / "items.parquet")
    pl.DataFrame({"user_idx": [0, 1], "user_id": ["u0", "u1"]}).write_parquet(features / "user_map.parquet")
    pl.DataFrame({"user_id": ["u0", "u9", "u9", "u1"], "item_id": ["a", "new", "new", "other"],
                  "timestamp": [10, 11, 12, 13]}).write_parquet(tmp_path / "window.parquet")
    drift = window_drift(features, tmp_path / "window.parquet")
    assert drift.events == 4 and drift.users == 3 and drift.new_users == 1
    assert drift.unseen_item_share == pytest.approx(0.75)  # "new" twice and "other" once


def test_update_mf_carries_known_items_and_solves_new_ones(tmp_path):
    """Known items keep the champion's factors; an item new to it, taken by exactly the users of
    a known item, is solved in closed form onto that item's direction."""
    import json

    import polars as pl

    from components.datasets import RawDataset, normalize
    from components.factors import FactorModel
    from components.features import build_features
    from components.incremental import update_mf
    from components.synthetic import generate
    from components.train_mf import train_mf
    from tests.conftest import tiny_params

    params = tiny_params("mf.iterations=15")
    inter, items = normalize(RawDataset(*generate(params.data.synthetic, 0), "synthetic", ""))
    champion = tmp_path / "champion"
    (champion / "data").mkdir(parents=True)
    inter.write_parquet(champion / "data" / "interactions.parquet")
    items.write_parquet(champion / "data" / "items.parquet")
    build_features(champion / "data", champion / "features", params.features)
    train_mf(champion / "features", champion / "mf", params.mf, params.seed)

    # The window: everyone who took the most popular item also takes "i-new", at the start of
    # their history (so it stays in the training split).
    top = inter["item_id"].value_counts().sort("count", descending=True)["item_id"][0]
    takers = inter.filter(pl.col("item_id") == top).group_by("user_id").agg(pl.col("timestamp").min())
    new_rows = takers.select("user_id", item_id=pl.lit("i-new"), timestamp=pl.col("timestamp") - 1,
                             weight=pl.lit(3.0))
    data = tmp_path / "new" / "data"
    data.mkdir(parents=True)
    pl.concat([inter, new_rows.select(inter.columns)]).write_parquet(data / "interactions.parquet")
    pl.concat([items, pl.DataFrame({"item_id": ["i-new"], "text": ["new"]})], how="diagonal").write_parquet(
        data / "items.parquet")
    build_features(data, tmp_path / "new" / "features", params.features)
    result = update_mf(tmp_path / "new" / "features", champion, tmp_path / "new" / "mf", params.mf, params.seed)
    assert result.new_items == 1 and result.carried_items == result.n_items - 1

    old, new = FactorModel.load(champion / "mf" / "factors.npz"), FactorModel.load(result.factors_path)
    old_ids = json.loads((champion / "mf" / "ids.json").read_text())["items"]
    new_ids = json.loads((tmp_path / "new" / "mf" / "ids.json").read_text())["items"]
    for split in ("valid", "test"):
        for item in (top, old_ids[5]):
            np.testing.assert_array_equal(new.items[split][new_ids.index(item)], old.items[split][old_ids.index(item)])
        v, t = new.items[split][new_ids.index("i-new")], old.items[split][old_ids.index(top)]
        assert float(v @ t / np.linalg.norm(v) / np.linalg.norm(t)) > 0.8
        assert np.isfinite(new.users[split]).all()
