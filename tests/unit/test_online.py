"""Online metrics on a worked example (numbers computed by hand in the comments)."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from serving.online import compute, from_store, parse_time
from serving.store import EventStore, Impression


def imp(user: str, at: float, items: str, variant: str = "champion", version: str = "3") -> Impression:
    return Impression(f"{user}-{at}-{variant}", user, version, variant, at, tuple(items), (0.0,) * len(items), 20)


IMPRESSIONS = [
    imp("u1", 10, "abc"),  # u1 does b at 11: position 2 -> NDCG 1/log2(3) = 0.6309, MRR 0.5
    imp("u1", 20, "def"),  # z at 21 (not shown), d at 25: position 1 -> 1, 1
    imp("u2", 10, "abc"),  # c at 500: past the 100 s window -> miss
    imp("u2", 30, "xyz"),  # closed at 40 by the next list -> miss
    imp("u2", 40, "xyz"),  # x at 45 -> position 1
    imp("u1", 10, "bac", variant="shadow"),  # the same b at 11, position 1 in the shadow list
]
EVENTS = [("u1", "b", 11.0), ("u1", "z", 21.0), ("u1", "d", 25.0), ("u2", "c", 500.0), ("u2", "x", 45.0)]


def test_worked_example():
    rows = {m.variant: m for m in compute(IMPRESSIONS, EVENTS, k=3, attribution_seconds=100)}
    champ = rows["champion"]
    assert (champ.requests, champ.users, champ.hits) == (5, 2, 3)
    # Per user, then over users: u1 (1, 0.8155, 0.75), u2 (1/3, 1/3, 1/3).
    assert champ.hr.mean == pytest.approx((1 + 1 / 3) / 2)
    assert champ.ndcg.mean == pytest.approx(((1 / math.log2(3) + 1) / 2 + 1 / 3) / 2)
    assert champ.mrr.mean == pytest.approx((0.75 + 1 / 3) / 2)
    assert champ.ndcg.low < champ.ndcg.mean < champ.ndcg.high
    assert champ.distinct_items == 9 and champ.coverage == pytest.approx(9 / 20)
    shadow = rows["shadow"]
    assert (shadow.requests, shadow.hits, shadow.ndcg.mean) == (1, 1, 1.0)
    assert math.isnan(shadow.ndcg.low)  # one user: no interval


def test_k_cuts_the_list_and_versions_are_kept_apart():
    rows = compute([imp("u1", 10, "abc"), imp("u1", 10, "abc", version="4")], [("u1", "c", 11.0)], k=2,
                   attribution_seconds=100)
    assert {m.model_version: m.hits for m in rows} == {"3": 0, "4": 0}  # c is third: outside the top 2


def test_from_the_store_on_the_service_clock(tmp_path):
    store = EventStore(tmp_path / "events.db")
    store.add_impressions(IMPRESSIONS)
    rows = store._read("SELECT count(*) FROM impressions")
    assert rows == [(5 + 1,)]
    # Events carry the client's timestamp; attribution uses when the store received them.
    with store._write_lock:
        store._writer.executemany("INSERT INTO events (user_id, item_id, timestamp, weight, received_at)"
                                  " VALUES (?, ?, 0, NULL, ?)", EVENTS)
    by_variant = {m.variant: m for m in from_store(store, 0, 1000, k=3, attribution_seconds=100)}
    assert by_variant["champion"].hits == 3
    assert from_store(store, 15, 1000, k=3, attribution_seconds=100)[0].requests == 3
    store.close()


def test_times_are_read_as_people_write_them():
    assert parse_time("24h", 100_000) == 100_000 - 86_400
    assert parse_time("1700000000", 0) == 1_700_000_000
    assert parse_time("2026-11-01T00:00:00+00:00", 0) == datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()


def test_a_bad_time_is_a_clear_error():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a time"):
        parse_time("yesterday", 0)


def test_lift_pairs_shared_users_and_separates_groups():
    from serving.online import lift

    champion = {f"u{i}": 0.2 + 0.01 * (i % 5) for i in range(50)}
    shadow = {u: v + 0.05 for u, v in champion.items()}  # the same users, each 0.05 better
    paired = lift(champion, shadow)
    assert paired.mean == pytest.approx(0.05) and paired.high - paired.low < 1e-9  # no spread in the differences
    ab = lift(champion, {f"w{i}": 0.25 + 0.01 * (i % 5) for i in range(50)})  # other users
    assert ab.mean == pytest.approx(0.05) and ab.low < 0.05 < ab.high and ab.high - ab.low > 0.005


def test_the_online_gate_needs_users_and_a_lift_beyond_noise():
    from components.config import OnlineConfig
    from flows.promotion import online_gate

    cfg = OnlineConfig(db="x", k=10, attribution_seconds=60, window_hours=1, min_users=20, min_ndcg_lift=0.0,
                       rollback_below=None)
    champion = {f"u{i}": float(i % 2) * 0.3 for i in range(40)}
    better = {f"w{i}": 0.6 + 0.1 * (i % 3) for i in range(40)}
    assert online_gate(champion, better, cfg).promote
    noisy = {f"w{i}": float(i % 2) * 0.32 for i in range(40)}  # +0.01 on average, well inside the noise
    decision = online_gate(champion, noisy, cfg)
    assert not decision.promote and "not above 0" in decision.reason
    few = online_gate(dict(list(champion.items())[:5]), better, cfg)
    assert not few.promote and "fewer than 20 users" in few.reason
