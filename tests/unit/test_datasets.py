import hashlib
import io
import zipfile
from pathlib import Path

import polars as pl
import pytest

from components import datasets
from components.datasets import DataSourceError, load_files, load_movielens, load_unisrec
from tests.conftest import tiny_params


def write_movielens(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250951\n")
    flags_a = "|".join(["0", "0", "0", "1", "1"] + ["0"] * 14)
    flags_b = "|".join(["0", "1"] + ["0"] * 17)
    (folder / "u.item").write_bytes(
        (f"10|Amélie (2001)|01-Jan-2001||http://x|{flags_a}\n20|Heat (1995)|01-Jan-1995||http://y|{flags_b}\n")
        .encode("iso-8859-1")
    )


def test_movielens_parses_latin1_and_genres(tmp_path):
    write_movielens(tmp_path)
    ds = load_movielens(tmp_path)
    assert ds.interactions.columns == ["user_id", "item_id", "timestamp", "weight"]
    assert ds.interactions["user_id"].dtype == pl.Utf8
    assert ds.interactions.height == 3
    texts = dict(zip(ds.items["item_id"], ds.items["text"]))
    assert texts["10"] == "Amélie (2001). Genres: Animation, Children's."
    assert texts["20"] == "Heat (1995). Genres: Action."


def test_movielens_missing_without_download_explains(tmp_path):
    with pytest.raises(DataSourceError, match="data.download=true"):
        load_movielens(tmp_path / "nope")


def _zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("u.data", "u.item"):
            z.write(folder / name, f"ml-100k/{name}")
    return buf.getvalue()


def test_movielens_download_verifies_checksum(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_movielens(src)
    archive = tmp_path / "ml-100k.zip"
    archive.write_bytes(_zip_of(src))
    url = archive.as_uri()
    target = tmp_path / "dest"
    # The real GroupLens md5s do not match our tiny files: the download must refuse them.
    with pytest.raises(DataSourceError, match="md5"):
        datasets.download_movielens(target, url=url)
    assert not (target / "u.data").exists()
    # With the md5s of these files it is accepted, and loading goes through download.
    monkeypatch.setattr(
        datasets,
        "MOVIELENS_MD5",
        {n: hashlib.md5((src / n).read_bytes()).hexdigest() for n in ("u.data", "u.item")},
    )
    monkeypatch.setattr(datasets, "MOVIELENS_URL", url)
    monkeypatch.setattr(datasets.download_movielens, "__defaults__", (url,))
    ds = load_movielens(target, download=True)
    assert ds.interactions.height == 3


def write_unisrec(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    # user 0: 0 1 2 3 4 (train 0 1 2, valid 3, test 4); user 1: 5 6 7 (train 5, valid 6, test 7)
    # Train rows list each prefix, longest first; user 1 has a single training item, so none.
    (folder / "X.train.inter").write_text(header + "0\t0 1\t2\n0\t0\t1\n")
    (folder / "X.valid.inter").write_text(header + "0\t0 1 2\t3\n1\t5\t6\n")
    (folder / "X.test.inter").write_text(header + "0\t0 1 2 3\t4\n1\t5 6\t7\n")
    (folder / "X.item2index").write_text("".join(f"A{i}\t{i}\n" for i in range(8)))
    (folder / "X.user2index").write_text("U0\t0\nU1\t1\n")
    (folder / "X.text").write_text("item_id:token\ttext:token_seq\n" + "".join(f"A{i}\titem {i}\n" for i in range(8)))


def test_unisrec_rebuilds_sequences_and_keeps_split(tmp_path):
    write_unisrec(tmp_path)
    ds = load_unisrec(tmp_path, None)
    u0 = ds.interactions.filter(pl.col("user_id") == "U0")
    assert u0["item_id"].to_list() == ["A0", "A1", "A2", "A3", "A4"]
    assert u0["split"].to_list() == ["train", "train", "train", "valid", "test"]
    assert u0["timestamp"].diff().drop_nulls().to_list() == [1, 1, 1, 1]
    u1 = ds.interactions.filter(pl.col("user_id") == "U1")
    # user 1 has no train rows of its own: its training item comes from the valid history.
    assert u1["item_id"].to_list() == ["A5", "A6", "A7"]
    assert u1["split"].to_list() == ["train", "valid", "test"]
    assert ds.items.height == 8


def test_unisrec_inconsistent_files_are_refused(tmp_path):
    write_unisrec(tmp_path)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (tmp_path / "X.test.inter").write_text(header + "0\t0 1 2 9\t4\n1\t5 6\t7\n")
    with pytest.raises(DataSourceError, match="do not chain"):
        load_unisrec(tmp_path, None)


def test_files_source_maps_columns_and_joins_text(tmp_path):
    (tmp_path / "events.csv").write_text("uid,product,ts,rating\n1,p1,1700000000,4\n2,p2,1700000001,5\n")
    (tmp_path / "catalog.csv").write_text("sku,name,blurb\np1,Red mug, ceramic\np2,Blue cup,\n")
    params = tiny_params(
        "data.source=files",
        f"data.path={tmp_path}",
        "data.files.interactions=events.csv",
        "data.files.items=catalog.csv",
        "data.files.columns.user_id=uid",
        "data.files.columns.item_id=product",
        "data.files.columns.timestamp=ts",
        "data.files.columns.weight=rating",
        "data.files.item_id_column=sku",
        "data.files.text_columns=[name, blurb]",
    )
    ds = load_files(tmp_path, params.data)
    assert ds.interactions.columns == ["user_id", "item_id", "timestamp", "weight"]
    assert ds.interactions["user_id"].to_list() == ["1", "2"]
    assert dict(zip(ds.items["item_id"], ds.items["text"])) == {"p1": "Red mug. ceramic", "p2": "Blue cup"}


def test_files_source_reads_parquet_and_datetimes(tmp_path):
    from datetime import datetime

    pl.DataFrame(
        {"user_id": ["a"], "item_id": ["x"], "timestamp": [datetime(2024, 1, 1)]}
    ).write_parquet(tmp_path / "i.parquet")
    pl.DataFrame({"item_id": ["x"], "title": ["X"], "description": ["d"]}).write_parquet(tmp_path / "it.parquet")
    params = tiny_params(
        "data.source=files", f"data.path={tmp_path}",
        "data.files.interactions=i.parquet", "data.files.items=it.parquet",
    )
    ds = load_files(tmp_path, params.data)
    assert ds.interactions["timestamp"].to_list() == [1704067200]


def test_files_source_missing_file(tmp_path):
    params = tiny_params("data.source=files", f"data.path={tmp_path}")
    with pytest.raises(DataSourceError, match="file not found"):
        load_files(tmp_path, params.data)


def write_partitions(root, parts: dict[str, pl.DataFrame]) -> None:
    """A Hive-partitioned folder as Spark writes it: `date=.../part-0.parquet`, a `_SUCCESS`
    marker and `.crc` checksums beside the data."""
    for date, frame in parts.items():
        folder = root / f"date={date}"
        folder.mkdir(parents=True)
        frame.write_parquet(folder / "part-0.parquet")
        (folder / ".part-0.parquet.crc").write_bytes(b"\x00crc")
    (root / "_SUCCESS").write_text("")


def partitioned_source(tmp_path):
    parts = {"2026-11-01": pl.DataFrame({"uid": [7, 8], "sku": ["p1", "p2"], "ts": [100, 101], "extra": [1.0, 2.0]}),
             "2026-11-02": pl.DataFrame({"uid": [7, 9], "sku": ["p2", "p1"], "ts": [200, 201], "extra": [3.0, 4.0]})}
    write_partitions(tmp_path / "events", parts)
    pl.DataFrame({"item_id": ["p1", "p2"], "title": ["Mug", "Cup"]}).write_parquet(tmp_path / "items.parquet")
    return ("data.source=files", f"data.path={tmp_path}", "data.files.items=items.parquet",
            "data.files.columns.user_id=uid", "data.files.columns.item_id=sku", "data.files.columns.timestamp=ts")


@pytest.mark.parametrize("spec", ["events", "events/*/*.parquet", "events/**/*.parquet"])
def test_files_source_reads_a_hive_partitioned_folder_or_glob(tmp_path, spec):
    settings = partitioned_source(tmp_path)
    ds = load_files(tmp_path, tiny_params(*settings, f"data.files.interactions={spec}").data)
    got = ds.interactions.sort("timestamp")
    # Only the mapped columns are read; integer ids become their text.
    assert got.columns == ["user_id", "item_id", "timestamp"]
    assert got.rows() == [("7", "p1", 100), ("8", "p2", 101), ("7", "p2", 200), ("9", "p1", 201)]


def test_a_partition_key_can_be_a_mapped_column(tmp_path):
    """`date=2026-11-01` folders carry the day: mapped as the timestamp, it becomes epoch seconds."""
    settings = partitioned_source(tmp_path)
    ds = load_files(tmp_path, tiny_params(*settings, "data.files.interactions=events",
                                          "data.files.columns.timestamp=date").data)
    assert sorted(set(ds.interactions["timestamp"].to_list())) == [1793491200, 1793491200 + 86400]


@pytest.mark.parametrize("spec", ["events", "events/**/*.parquet"])
def test_a_spark_jobs_working_files_are_not_data(tmp_path, spec):
    """A Spark job still running (or failed) leaves `_temporary/` and `.spark-staging-*` folders
    of Parquet parts beside the partitions, at any depth: none of it is read."""
    settings = partitioned_source(tmp_path)
    stray = pl.DataFrame({"uid": [99], "sku": ["p1"], "ts": [999], "extra": [0.0]})
    for folder in ("_temporary/0/date=2026-11-03", ".spark-staging-1/date=2026-11-03", "date=2026-11-01/_tmp"):
        (tmp_path / "events" / folder).mkdir(parents=True)
        stray.write_parquet(tmp_path / "events" / folder / "part-9.parquet")
    ds = load_files(tmp_path, tiny_params(*settings, f"data.files.interactions={spec}").data)
    assert 999 not in ds.interactions["timestamp"].to_list() and ds.interactions.height == 4


def read_events_folder(tmp_path, weight: str) -> pl.DataFrame:
    """The interactions of the Parquet folder `events/` under `tmp_path` (columns uid, sku, ts
    and `weight`), beside a two-item catalogue."""
    pl.DataFrame({"item_id": ["p1", "p2"], "title": ["Mug", "Cup"]}).write_parquet(tmp_path / "items.parquet")
    params = tiny_params("data.source=files", f"data.path={tmp_path}", "data.files.interactions=events",
                         "data.files.items=items.parquet", "data.files.columns.user_id=uid",
                         "data.files.columns.item_id=sku", "data.files.columns.timestamp=ts",
                         f"data.files.columns.weight={weight}")
    return load_files(tmp_path, params.data).interactions


def test_partitions_may_add_drop_and_widen_columns(tmp_path):
    """Schemas evolve: a later partition adds a column (null before it), drops one, or writes
    an integer column wider; the mapped columns are read from every file."""
    folder = tmp_path / "events"
    write_partitions(folder, {
        "1": pl.DataFrame({"uid": pl.Series([1], dtype=pl.Int32), "sku": ["p1"], "ts": [10]}),
        "2": pl.DataFrame({"uid": [2], "sku": ["p2"], "ts": [20], "rating": [4.0], "unmapped": ["x"]}),
        "3": pl.DataFrame({"uid": [3], "sku": ["p1"], "rating": [5.0]})})
    got = read_events_folder(tmp_path, weight="rating").sort("user_id")
    assert got.columns == ["user_id", "item_id", "timestamp", "weight"]
    assert got.rows() == [("1", "p1", 10, None), ("2", "p2", 20, 4.0), ("3", "p1", None, 5.0)]


def test_partitions_agree_on_numbers_nulls_and_ids_in_folder_names(tmp_path):
    """An integer weight one day and a float the next is one number column; an all-null column
    (Parquet's null type) agrees with any type; an id that is a partition key keeps its text
    ("007" stays "007", not 7); a column nobody maps may be anything."""
    folder = tmp_path / "events"
    for uid, frame in {"007": pl.DataFrame({"sku": ["p1"], "ts": [10], "w": [4], "odd": [[1]]}),
                       "010": pl.DataFrame({"sku": ["p2"], "ts": [20], "w": [2.5], "odd": [{"a": 1}]}),
                       "011": pl.DataFrame({"sku": [None, "p1"], "ts": [30, 31], "w": [1.0, 2.0],
                                            "odd": ["x", "y"]})}.items():
        (folder / f"uid={uid}").mkdir(parents=True)
        frame.write_parquet(folder / f"uid={uid}" / "part-0.parquet")
    pl.DataFrame({"sku": pl.Series([None], dtype=pl.Null), "ts": [40], "w": [3.0]}).write_parquet(
        folder / "uid=011" / "part-1.parquet")
    got = read_events_folder(tmp_path, weight="w").sort("timestamp")
    assert got.rows() == [("007", "p1", 10, 4.0), ("010", "p2", 20, 2.5), ("011", None, 30, 1.0),
                          ("011", "p1", 31, 2.0), ("011", None, 40, 3.0)]


def test_a_delta_table_is_refused_with_what_to_do(tmp_path):
    settings = partitioned_source(tmp_path)
    (tmp_path / "events" / "_delta_log").mkdir()
    with pytest.raises(DataSourceError, match="is a Delta table.*Export the current version to Parquet"):
        load_files(tmp_path, tiny_params(*settings, "data.files.interactions=events").data)


def test_a_data_path_with_brackets_is_a_folder_not_a_pattern(tmp_path):
    root = tmp_path / "shop[eu]"
    settings = partitioned_source(root)
    for spec in ("events", "events/*/*.parquet"):
        ds = load_files(root, tiny_params(*settings, f"data.path={root}", f"data.files.interactions={spec}").data)
        assert ds.interactions.height == 4


def test_parquet_folders_and_globs_fail_clearly(tmp_path):
    settings = partitioned_source(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "events" / "notes.csv").write_text("a,b\n1,2\n")
    cases = {"empty": "holds no \\*.parquet file", "events/nothing-*.parquet": "no file matches",
             "events/*": "reads Parquet files only; it matches .*notes.csv"}
    for spec, message in cases.items():
        with pytest.raises(DataSourceError, match=message):
            load_files(tmp_path, tiny_params(*settings, f"data.files.interactions={spec}").data)
    # A column that is a number in one file and text in another: one error naming both files.
    write_partitions(tmp_path / "mixed", {"1": pl.DataFrame({"uid": [1]}), "2": pl.DataFrame({"uid": ["x"]})})
    with pytest.raises(DataSourceError, match="column 'uid' is number in .*uid=1|column 'uid' is number in .*1/part-0"
                                              ".parquet but String in .*2/part-0.parquet"):
        load_files(tmp_path, tiny_params(*settings, "data.files.interactions=mixed").data)
