"""Feature building on tiny hand-made data: worked examples for each step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from components.config import ParamsError
from components.sequences import load_sequences
from components.features import (
    build_features,
    drop_exact_duplicates,
    index_ids,
    inner_holdout,
    k_core,
    leave_one_out,
    order_chronologically,
    temporal_split,
)
from tests.conftest import tiny_params


def frame(rows):
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


def test_k_core_iterates_until_stable():
    # Items a,b,c are seen by 2 users each except c (1 user). Removing c leaves user u3 with one
    # interaction, which then removes u3 and makes b fall to one user, and so on.
    df = frame([
        ("u1", "a", 1), ("u1", "b", 2),
        ("u2", "a", 1), ("u2", "b", 2),
        ("u3", "b", 1), ("u3", "c", 2),
    ])
    out = k_core(df, 2, 2)
    assert sorted(out["user_id"].unique()) == ["u1", "u2"]
    assert sorted(out["item_id"].unique()) == ["a", "b"]
    # With users needing 3, nobody survives; with both off nothing changes.
    assert k_core(df, 3, 0).height == 0
    assert k_core(df, 0, 0).equals(df)


def test_chronological_order_breaks_ties_by_numeric_item_id():
    df = frame([("1", "10", 5), ("1", "9", 5), ("1", "2", 7), ("2", "1", 1)])
    out = order_chronologically(df)
    assert out["item_id"].to_list() == ["9", "10", "2", "1"]


def test_text_ids_sort_as_text():
    df = frame([("a", "x10", 5), ("a", "x9", 5)])
    assert order_chronologically(df)["item_id"].to_list() == ["x10", "x9"]


def test_drop_exact_duplicates():
    df = order_chronologically(frame([("u", "a", 1), ("u", "a", 1), ("u", "a", 2), ("v", "a", 1)]))
    assert drop_exact_duplicates(df).height == 3


def test_leave_one_out():
    df = order_chronologically(frame(
        [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4), ("u2", "a", 1), ("u2", "b", 2)]
    ))
    out = leave_one_out(df)
    assert out.filter(pl.col("user_id") == "u1")["split"].to_list() == ["train", "train", "valid", "test"]
    # Fewer than 3 interactions cannot give train/valid/test: all train.
    assert out.filter(pl.col("user_id") == "u2")["split"].to_list() == ["train", "train"]


def test_inner_holdout_moves_the_split_one_step_back():
    df = leave_one_out(order_chronologically(frame([
        ("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4),
        ("u2", "a", 1), ("u2", "b", 2), ("u2", "c", 3),  # one training item: nothing left to validate on
        ("u3", "a", 1), ("u3", "b", 2),  # too short for leave-one-out: training only, untouched
    ])))
    out = inner_holdout(df)
    by_user = {u: out.filter(pl.col("user_id") == u)["split"].to_list() for u in ("u1", "u2", "u3")}
    assert by_user == {"u1": ["train", "valid", "test"], "u2": ["train", "test"], "u3": ["train", "train"]}
    # The test interactions are gone: nothing the inner split scores can have seen them.
    assert out.filter(pl.col("user_id") == "u1")["item_id"].to_list() == ["a", "b", "c"]


def test_inner_holdout_keeps_what_the_data_without_its_test_interactions_would_keep(tmp_path):
    """k-core 3/3. Item x has 3 interactions, one of them u0's test item: the real split keeps x,
    the inner split must not, since only the test interaction lifts it to 3. So u0's test item
    changed to another one gives the same inner features, byte for byte. (Under leave-one-out a
    test item can still decide which interaction is another user's last in the full core:
    `inner_holdout`.)"""
    common = ["a", "b", "c", "d"]
    rows = ([("u0", i, t) for t, i in enumerate(common + ["x"])]  # x: u0's test item
            + [("u1", i, t) for t, i in enumerate(["a", "b", "x", "c", "d"])]
            + [("u2", i, t) for t, i in enumerate(["a", "x", "b", "c", "d"])]
            + [(f"u{u}", i, t) for u in (3, 4) for t, i in enumerate(common + ["a"])])
    changed = [(u, "a" if (u, t) == ("u0", 4) else i, t) for u, i, t in rows]
    items = pl.DataFrame({"item_id": common + ["x"], "text": ["T"] * 5})
    core = ("features.min_user_interactions=3", "features.min_item_interactions=3")
    out = {}
    for name, inter in (("data", rows), ("changed", changed)):
        data = write_snapshot(tmp_path / name, frame(inter), items)
        for holdout in ("test", "inner"):
            out[name, holdout] = tmp_path / f"{name}-{holdout}"
            build_features(data, out[name, holdout], tiny_params(*core, f"features.holdout={holdout}").features)

    def item_ids(folder):
        return pl.read_parquet(folder / "items.parquet")["item_id"].to_list()

    assert "x" in item_ids(out["data", "test"])
    assert item_ids(out["data", "inner"]) == common
    for name in ("interactions.parquet", "items.parquet", "user_map.parquet"):
        assert pl.read_parquet(out["data", "inner"] / name).equals(pl.read_parquet(out["changed", "inner"] / name))
    # u1 and u2 lost x and keep 4 interactions each; the old validation items are the test.
    inner = load_sequences(out["data", "inner"])
    assert inner.n_users == 5 and inner.target_matrix("test").nnz == 5


def test_an_inner_validation_item_with_no_history_left_trains_and_an_empty_inner_split_is_refused(tmp_path):
    """Items need 2 users, users nothing: u0's first item is seen only by u0 and the test
    interactions, so without them it goes, and u0's validation item has no history to be predicted
    from: it stays training data, never a test target with an empty history."""
    rows = [("u0", "z", 0), ("u0", "a", 1), ("u0", "z", 2), ("u1", "a", 0), ("u1", "b", 1), ("u1", "z", 2),
            ("u2", "b", 0), ("u2", "a", 1), ("u2", "b", 2)]
    out = inner_holdout(leave_one_out(order_chronologically(frame(rows))), 0, 2)
    assert out.filter(pl.col("user_id") == "u0")["split"].to_list() == ["train"]
    assert out.filter(pl.col("split") == "test")["user_id"].to_list() == ["u1", "u2"]
    items = pl.DataFrame({"item_id": ["a", "b", "z"], "text": ["T"] * 3})
    # One user at exactly 3 of 3 interactions: the test split has it, the inner split nothing.
    data = write_snapshot(tmp_path / "data", frame([("u0", "a", 0), ("u0", "b", 1), ("u0", "z", 2)]), items)
    thresholds = ("features.min_user_interactions=3", "features.min_item_interactions=0")
    build_features(data, tmp_path / "f", tiny_params(*thresholds).features)
    with pytest.raises(ParamsError, match="holdout=inner: nothing is left once the test interactions are dropped"):
        build_features(data, tmp_path / "f", tiny_params(*thresholds, "features.holdout=inner").features)


def test_temporal_split_uses_one_global_cut():
    df = frame([(f"u{i % 3}", f"i{i}", i) for i in range(1, 11)])
    out = temporal_split(df, 0.2, 0.2)
    by_ts = dict(zip(out["timestamp"], out["split"]))
    assert [by_ts[t] for t in range(1, 11)] == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    with pytest.raises(ValueError):
        temporal_split(df, 0.6, 0.6)


def test_index_ids_are_contiguous_and_ordered():
    df = frame([("10", "b", 1), ("9", "a", 2), ("10", "a", 3)])
    out, users, items = index_ids(df)
    assert users["user_id"].to_list() == ["9", "10"] and users["user_idx"].to_list() == [0, 1]
    assert items["item_id"].to_list() == ["a", "b"]
    assert out["user_idx"].to_list() == [1, 0, 1]  # row order kept


def write_snapshot(folder: Path, inter: pl.DataFrame, items: pl.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inter.write_parquet(folder / "interactions.parquet")
    items.write_parquet(folder / "items.parquet")
    return folder


def test_inner_holdout_in_features(tmp_path):
    """The same snapshot with holdout=inner: the old validation targets are the new test targets,
    predicted from the same histories."""
    inter = frame([(f"u{u}", f"i{(u + t) % 7}", t) for u in range(5) for t in range(5)])
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(7)], "text": [f"T{i}" for i in range(7)]})
    data = write_snapshot(tmp_path / "data", inter, items)
    no_core = ("features.min_user_interactions=0", "features.min_item_interactions=0")
    build_features(data, tmp_path / "outer", tiny_params(*no_core).features)
    build_features(data, tmp_path / "inner", tiny_params(*no_core, "features.holdout=inner").features)
    outer, inner = load_sequences(tmp_path / "outer"), load_sequences(tmp_path / "inner")
    assert outer.n_items == inner.n_items == 7  # every test item also occurs earlier: same indices
    assert (outer.target_matrix("valid") != inner.target_matrix("test")).nnz == 0
    assert (outer.history_matrix("valid") != inner.history_matrix("test")).nnz == 0
    assert inner.target_matrix("valid").nnz == 5 and inner.history_matrix("valid").nnz == 5 * 2
    assert json.loads((tmp_path / "inner" / "stats.json").read_text())["holdout"] == "inner"
    temporal = tiny_params(*no_core, "features.holdout=inner", "features.split=temporal").features
    with pytest.raises(ValueError, match="per-user split"):
        build_features(data, tmp_path / "t", temporal)


def test_build_features_outputs(tmp_path):
    inter = pl.DataFrame({
        "user_id": ["u1"] * 4 + ["u2"] * 3 + ["u3"] * 3,
        "item_id": ["a", "b", "c", "d", "b", "c", "a", "d", "a", "b"],
        "timestamp": [1, 2, 3, 4, 1, 2, 3, 1, 2, 3],
        "weight": [5.0, 4.0, 3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0],
    })
    items = pl.DataFrame({"item_id": ["a", "b", "c", "d", "e"], "text": ["A", "B", "C", "D", "E"]})
    data = write_snapshot(tmp_path / "data", inter, items)
    cfg = tiny_params("features.min_user_interactions=0", "features.min_item_interactions=0").features
    res = build_features(data, tmp_path / "f", cfg)
    assert (res.n_users, res.n_items, res.n_interactions) == (3, 4, 10)  # 'e' has no interactions

    seqs = load_sequences(tmp_path / "f")
    assert seqs.indptr.tolist() == [0, 4, 7, 10]
    assert seqs.items[:4].tolist() == [0, 1, 2, 3]  # u1: a b c d
    assert seqs.split[:4].tolist() == [0, 0, 1, 2]
    train = sp.load_npz(tmp_path / "f" / "train_matrix.npz")
    assert train.shape == (3, 4) and train.nnz == 4  # two train items per user... u1 has 2, u2 1, u3 1
    assert (train.toarray() == seqs.history_matrix("valid").toarray()).all()
    # History for test = train + valid; targets = the last item.
    assert seqs.history_matrix("test")[0].indices.tolist() == [0, 1, 2]
    assert seqs.target_matrix("test")[0].indices.tolist() == [3]
    assert [h.tolist() for h in seqs.histories("test", max_len=2)] == [[1, 2], [1, 2], [3, 0]]

    stats = json.loads((tmp_path / "f" / "stats.json").read_text())
    assert stats["n_users"] == 3 and stats["n_items"] == 4 and stats["n_interactions"] == 10
    assert stats["density"] == pytest.approx(10 / 12)
    assert stats["split_sizes"] == {"train": 4, "valid": 3, "test": 3}
    assert stats["sequence_length"]["p50"] == 3.0
    items_out = pl.read_parquet(tmp_path / "f" / "items.parquet")
    assert items_out["text"].to_list() == ["A", "B", "C", "D"]


@pytest.mark.parametrize("heavier_first", [True, False])
def test_duplicates_keep_the_largest_weight_wherever_it_lies(tmp_path, heavier_first):
    """Repeated (user, item, timestamp) rows may differ in weight: the largest is kept, every
    time and whichever comes first in the snapshot (engines read files in different orders; the
    codes are joined in a streaming pass that loses the order)."""
    n = 4000
    base = pl.DataFrame({"user_id": [f"u{i % 50}" for i in range(n)], "item_id": [str(i % 31) for i in range(n)],
                         "timestamp": [i // 50 for i in range(n)], "weight": [1.0] * n})
    heavier = base.with_columns(weight=pl.lit(5.0))
    inter = pl.concat([heavier, base] if heavier_first else [base, heavier])
    items = pl.DataFrame({"item_id": [str(i) for i in range(31)], "text": ["t"] * 31})
    data = write_snapshot(tmp_path / "data", inter, items)
    cfg = tiny_params("features.min_user_interactions=0", "features.min_item_interactions=0").features
    for run in range(3):
        res = build_features(data, tmp_path / f"f{run}", cfg)
        assert res.n_interactions == n
        assert set(load_sequences(tmp_path / f"f{run}").weights.tolist()) == {5.0}


def test_ids_equal_as_numbers_keep_a_fixed_order(tmp_path):
    """"007" and "7" are two ids that sort as the same number: their text decides, so their
    indices do not change from run to run."""
    inter = frame([("007", "a", 1), ("7", "a", 2), ("07", "a", 3), ("10", "a", 4)])
    items = pl.DataFrame({"item_id": ["a"], "text": ["A"]})
    data = write_snapshot(tmp_path / "data", inter, items)
    cfg = tiny_params("features.min_user_interactions=0", "features.min_item_interactions=0").features
    build_features(data, tmp_path / "f", cfg)
    users = pl.read_parquet(tmp_path / "f" / "user_map.parquet").sort("user_idx")["user_id"].to_list()
    assert users == ["007", "07", "7", "10"]


def test_source_split_is_kept(tmp_path):
    inter = pl.DataFrame({
        "user_id": ["u1"] * 4, "item_id": ["a", "b", "c", "d"], "timestamp": [1, 2, 3, 4],
        "split": ["train", "valid", "train", "test"],
    })
    items = pl.DataFrame({"item_id": ["a", "b", "c", "d"], "text": list("ABCD")})
    data = write_snapshot(tmp_path / "data", inter, items)
    cfg = tiny_params("features.min_user_interactions=0", "features.min_item_interactions=0").features
    res = build_features(data, tmp_path / "f", cfg)
    assert res.split_source == "source"
    assert load_sequences(tmp_path / "f").split.tolist() == [0, 1, 0, 2]


def test_everything_filtered_is_an_error(tmp_path):
    inter = pl.DataFrame({"user_id": ["u1"], "item_id": ["a"], "timestamp": [1]})
    data = write_snapshot(tmp_path / "data", inter, pl.DataFrame({"item_id": ["a"], "text": ["A"]}))
    with pytest.raises(ParamsError, match="k-core filtering removed every interaction"):
        build_features(data, tmp_path / "f", tiny_params().features)


def test_split_settings_that_cannot_work_are_settings_errors(tmp_path):
    """A CLI prints a ParamsError and exits 2; each message names the keys to change."""
    inter = pl.DataFrame({"user_id": ["u1"] * 4, "item_id": list("abcd"), "timestamp": [1, 2, 3, 4]})
    data = write_snapshot(tmp_path / "data", inter, pl.DataFrame({"item_id": list("abcd"), "text": list("ABCD")}))
    loose = ("features.min_user_interactions=0", "features.min_item_interactions=0", "features.split=temporal")
    with pytest.raises(ParamsError, match=r"features.temporal_test_fraction \(0.6\) must be in \(0, 1\), "
                                          r"features.temporal_valid_fraction \(0.5\) in \[0, 1\), and their sum below 1"):
        build_features(data, tmp_path / "f", tiny_params(*loose, "features.temporal_test_fraction=0.6",
                                                         "features.temporal_valid_fraction=0.5").features)
    with pytest.raises(ParamsError, match="features.holdout=inner needs a per-user split"):
        build_features(data, tmp_path / "f", tiny_params(*loose, "features.holdout=inner").features)


def test_missing_snapshot_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match="run validation first"):
        build_features(tmp_path / "nope", tmp_path / "f", tiny_params().features)


def test_integer_codes_sort_on_one_user_time_key_in_the_same_order():
    """User codes and timestamps packed into one key: the order of sorting on the columns,
    item and weight ties included; a span too wide to pack sorts on the columns."""
    from components.features import _user_time_key

    rng = np.random.default_rng(0)
    n = 5000
    df = pl.DataFrame({"user_id": rng.integers(0, 50, n).astype(np.uint32), "item_id": rng.integers(0, 30, n).astype(np.uint32),
                       "timestamp": rng.integers(-5, 40, n), "weight": rng.integers(1, 4, n).astype(np.float32),
                       "split": rng.choice(["train", "valid", "test"], n)})
    assert _user_time_key(df) is not None
    expected = df.sort(["user_id", "timestamp", "item_id", "weight", "split"],
                       descending=[False, False, False, True, False], maintain_order=True)
    assert order_chronologically(df).equals(expected)
    # Logs mostly in order already (what the stable packed sort is for), missing weights last.
    logged = expected.with_columns(weight=pl.when(pl.col("item_id") == 3).then(None).otherwise(pl.col("weight")))
    logged = pl.concat([logged[100:], logged[:100]])
    assert order_chronologically(logged).equals(logged.sort(["user_id", "timestamp", "item_id", "weight", "split"],
                                                            descending=[False, False, False, True, False],
                                                            nulls_last=True, maintain_order=True))
    wide = df.with_columns(timestamp=pl.when(pl.col("item_id") == 0).then(-(2**62)).otherwise(pl.col("timestamp")))
    assert _user_time_key(wide) is None
    assert order_chronologically(wide).equals(wide.sort(["user_id", "timestamp", "item_id", "weight", "split"],
                                                        descending=[False, False, False, True, False], maintain_order=True))


def test_the_fast_paths_hand_back_what_they_cannot_take():
    """Interleaved users are refused by leave-one-out (it reads runs); narrow or too wide
    timestamps and null or huge integer ids go the general way, with the same answers."""
    from components.features import _user_time_key

    interleaved = pl.DataFrame({"user_id": [1, 2, 1, 2, 1, 2], "item_id": [1, 2, 3, 4, 5, 6], "timestamp": [1, 1, 2, 2, 3, 3]})
    with pytest.raises(ValueError, match="each user's rows together"):
        leave_one_out(interleaved)
    narrow = pl.DataFrame({"user_id": [0, 0, 1], "timestamp": pl.Series([2_000_000_000, -2_000_000_000, 5], dtype=pl.Int32),
                           "item_id": [0, 1, 2]})
    assert order_chronologically(narrow)["timestamp"].to_list() == [-2_000_000_000, 2_000_000_000, 5]
    assert _user_time_key(pl.DataFrame({"user_id": [0, 0], "timestamp": [-(2**62), 2**62]})) is None
    with_null = pl.DataFrame({"user_id": [5, 5, None, 7], "item_id": [1, 2, 1, 1], "timestamp": [1, 2, 3, 4]})
    assert k_core(with_null, 0, 3)["item_id"].to_list() == [1, 1, 1]
    huge = pl.DataFrame({"user_id": [10**12, 10**12, 3], "item_id": [1, 2, 1], "timestamp": [1, 2, 3]})
    out, users, _ = index_ids(huge)
    assert users["user_id"].to_list() == [3, 10**12] and out["user_idx"].to_list() == [1, 1, 0]
