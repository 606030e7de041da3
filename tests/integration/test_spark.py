"""The Spark engine against the default one, on a real local Spark session (`local[2]`): the
same source gives the same validation verdicts (counts included) and byte-for-byte the same
feature files, on clean input and on corrupted input, for every split setting.

Needs Java 17+: skipped with how to install it where it is missing, a failure in CI
(`CI=true`), where `make install` installs it."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import polars as pl
import pytest

from benchmarks.scaling import differing_files
from benchmarks.scaling import verdicts as summary_verdicts
from components.datasets import source_identity
from components.features import build_features
from components.synthetic import generate
from components.validate import validate
from tests.conftest import tiny_params

pytestmark = pytest.mark.integration

NOW = 1_800_000_000
SPARK = ["data.spark.master=local[2]",
         "data.spark.conf={spark.sql.shuffle.partitions: 4, spark.driver.memory: 1g}"]


def require_spark() -> None:
    """Skip where Spark cannot start (saying how to set it up); fail in CI, where it must."""
    from components.spark import JAVA_HELP, java_version

    version = java_version()
    if importlib.util.find_spec("pyspark") is None:
        missing = "pyspark (pip install -e '.[spark]')"
    elif version is None or version < 17:
        missing = f"Java 17+ ({'none' if version is None else version} found): {JAVA_HELP}"
    else:
        missing = None
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"the Spark engine's tests need {missing}; make install sets it up")
    if missing:
        pytest.skip(f"the Spark engine's tests need {missing}")


@pytest.fixture(scope="module", autouse=True)
def spark_available():
    require_spark()
    yield
    from pyspark.sql import SparkSession

    # The engine keeps one session per process; the tests after these need not carry its JVM.
    if (active := SparkSession.getActiveSession()) is not None:
        active.stop()


def source_folder(root: Path, inter: pl.DataFrame, items: pl.DataFrame) -> Path:
    """A Hive-partitioned Parquet folder (three days, one of them with 32-bit timestamps and
    weights) and an items file: what a data lake hands over."""
    folder = root / "raw"
    parts = inter.with_columns(day=pl.int_range(pl.len()) % 3).partition_by("day", include_key=False)
    for day, part in enumerate(parts):
        (folder / "events" / f"day={day}").mkdir(parents=True)
        if day == 1:
            part = part.with_columns(pl.col("timestamp").cast(pl.Int32), pl.col("weight").cast(pl.Float32))
        part.write_parquet(folder / "events" / f"day={day}" / "part-0.parquet")
    items.write_parquet(folder / "items.parquet")
    return folder


def settings(folder: Path, engine: str, *overrides: str):
    return tiny_params("data.source=files", f"data.path={folder}", "data.files.interactions=events",
                       "data.files.items=items.parquet", "data.files.columns.weight=weight",
                       "data.files.text_columns=[text]", f"data.engine={engine}", *SPARK, *overrides)


def run_validation(root: Path, folder: Path, engine: str):
    p = settings(folder, engine)
    out = root / engine
    return validate(p.data, p.validation, p.seed, out / "validation", out / "data", now=NOW)


def verdicts(result) -> list[tuple]:
    return summary_verdicts(result.summary_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic interactions with text-free numeric user ids (they sort as numbers) and a few
    repeats that differ in weight, one of them in another day's file than its original."""
    root = tmp_path_factory.mktemp("spark")
    p = tiny_params("data.synthetic.n_users=300", "data.synthetic.n_interactions=8000")
    inter, items = generate(p.data.synthetic, 0)
    inter = inter.with_columns(pl.col("user_id").str.strip_prefix("u").cast(pl.Int64).cast(pl.Utf8))
    repeats = inter.gather(list(range(0, inter.height, 250))).with_columns(weight=6 - pl.col("weight"))
    return root, pl.concat([inter, repeats]), items


def test_validation_and_features_agree_on_clean_data(data):
    root, inter, items = data
    folder = source_folder(root / "clean", inter, items)
    default, spark = run_validation(root / "clean", folder, "default"), run_validation(root / "clean", folder, "spark")
    assert default.success and spark.success, spark.describe()
    assert verdicts(default) == verdicts(spark)
    assert default.n_interactions == spark.n_interactions == inter.height
    snap = [pl.read_parquet(r.data_dir / "interactions.parquet") for r in (default, spark)]
    assert snap[0].schema == snap[1].schema
    assert snap[0].sort(pl.all()).equals(snap[1].sort(pl.all()))  # the same rows (file order may differ)

    for name, overrides in {
        "leave_one_out": [],
        "inner": ["features.holdout=inner"],
        "temporal": ["features.split=temporal"],
        "no_k_core": ["features.min_user_interactions=0", "features.min_item_interactions=0"],
        "strict_k_core": ["features.min_user_interactions=10", "features.min_item_interactions=30"],
        # Dropping the test events takes items and users under these again: k-core re-runs alike.
        "inner_strict_k_core": ["features.holdout=inner", "features.min_user_interactions=10",
                                "features.min_item_interactions=30"],
        # No user threshold: a user can lose every training event, and keeps its validation one.
        "inner_items_only": ["features.holdout=inner", "features.min_user_interactions=0",
                             "features.min_item_interactions=60"],
    }.items():
        outs = {}
        for engine, result in (("default", default), ("spark", spark)):
            p = settings(folder, engine, *overrides)
            outs[engine] = root / "features" / name / engine
            build_features(result.data_dir, outs[engine], p.features, p.data, p.seed)
        assert differing_files(outs["default"], outs["spark"]) == []
        stats = json.loads((outs["spark"] / "stats.json").read_text())
        assert stats["n_exact_duplicates_dropped"] == len(range(0, inter.height - len(range(0, 8000, 250)), 250))


def test_a_published_split_is_kept_alike(data, tmp_path):
    """A source with its own split column (UniSRec's): both engines keep it, the inner holdout
    moves it alike."""
    _, inter, items = data
    folder = tmp_path / "data"
    folder.mkdir()
    split = pl.when(pl.int_range(pl.len()).over("user_id") == pl.len().over("user_id") - 1).then(pl.lit("test"))
    inter.with_columns(split=split.otherwise(pl.lit("train"))).write_parquet(folder / "interactions.parquet")
    items.write_parquet(folder / "items.parquet")
    p = tiny_params()
    (folder / "dataset.json").write_text(json.dumps({"settings": source_identity(p.data, p.seed)}))
    for holdout in ("test", "inner"):
        outs = {}
        for engine in ("default", "spark"):
            p = tiny_params(f"data.engine={engine}", *SPARK, f"features.holdout={holdout}")
            outs[engine] = tmp_path / holdout / engine
            assert build_features(folder, outs[engine], p.features, p.data, p.seed).split_source == "source"
        assert differing_files(outs["default"], outs["spark"]) == []


def test_corrupted_data_is_refused_alike(data):
    """A few hundredths of unknown items, negative timestamps and 2 % repeated rows: both
    engines refuse the same checks, with the same counts, and write no snapshot."""
    root, inter, items = data
    n = inter.height
    row = pl.int_range(pl.len())
    bad = inter.with_columns(
        item_id=pl.when(row % 997 == 5).then(pl.lit("ghost-") + row.cast(pl.Utf8)).otherwise(pl.col("item_id")),
        timestamp=pl.when(row % 1009 == 7).then(-row).otherwise(pl.col("timestamp")),
    )
    bad = pl.concat([bad, bad.gather(list(range(1, n, 50)))])
    folder = source_folder(root / "corrupt", bad, items)
    default, spark = run_validation(root / "corrupt", folder, "default"), run_validation(root / "corrupt", folder, "spark")
    assert not default.success and not spark.success
    assert {"item_id_known", "timestamp_not_too_old", "duplicate_rows"} <= set(spark.failed_checks)
    assert default.failed_checks == spark.failed_checks
    assert verdicts(default) == verdicts(spark)
    counts = {f.check: f.unexpected_count for f in spark.failures}
    assert counts["item_id_known"] == len(range(5, n, 997)) + sum(1 for i in range(1, n, 50) if i % 997 == 5)
    assert spark.data_dir is None and not (root / "corrupt" / "spark" / "data").exists()
    assert "examples:" in spark.describe()


def _csv_case(folder: Path, case: str) -> None:
    """Corrupt the CSV source in `folder` as `case` says."""
    def rewrite(name, fn):
        fn(pl.read_csv(folder / name, infer_schema_length=0)).write_csv(folder / name)

    first = pl.int_range(pl.len()) < 3
    if case == "nulls":
        rewrite("interactions.csv", lambda d: d.with_columns(item_id=pl.when(first).then(None).otherwise(pl.col("item_id"))))
    elif case == "text_timestamps":
        rewrite("interactions.csv", lambda d: d.with_columns(
            timestamp=pl.when(first).then(pl.lit("2021-03-04")).otherwise(pl.col("timestamp"))))
    elif case == "float_timestamps":
        rewrite("interactions.csv", lambda d: d.with_columns(timestamp=pl.col("timestamp") + ".5"))
    elif case == "missing_column":
        rewrite("interactions.csv", lambda d: d.drop("timestamp"))
    elif case == "ratings_out_of_range":
        rewrite("interactions.csv", lambda d: d.with_columns(rating=pl.when(first).then(pl.lit("9")).otherwise(pl.col("rating"))))
    elif case == "odd_ids":  # the service's id rule: a tab, a no-break-space blank, 257 characters
        rewrite("interactions.csv", lambda d: d.with_columns(
            user_id=pl.Series(["u\tx", "\u00a0", "u" * 257, *d["user_id"][3:]])))
    elif case == "items_without_ids":
        rewrite("items.csv", lambda d: d.drop("item_id"))
    elif case == "header_only":
        (folder / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n")
    elif case == "empty_file":
        (folder / "interactions.csv").write_text("")


@pytest.mark.parametrize("case", ["nulls", "text_timestamps", "float_timestamps", "missing_column", "ratings_out_of_range",
                                  "odd_ids", "items_without_ids", "header_only", "empty_file"])
def test_each_corruption_gets_the_same_verdicts(tmp_path, case):
    """A CSV source (read whole, handed to Spark as Parquet) corrupted one way at a time: the
    same failed checks and counts on both engines."""
    p = tiny_params()
    inter, items = generate(p.data.synthetic, 0)
    folder = tmp_path / "raw"
    folder.mkdir()
    inter.rename({"weight": "rating"}).write_csv(folder / "interactions.csv")
    items.select("item_id", pl.col("text").alias("title")).write_csv(folder / "items.csv")
    _csv_case(folder, case)
    results = {}
    for engine in ("default", "spark"):
        p = tiny_params("data.source=files", f"data.path={folder}", "data.files.columns.weight=rating",
                        f"data.engine={engine}", *SPARK)
        results[engine] = validate(p.data, p.validation, p.seed, tmp_path / engine / "v", tmp_path / engine / "d", now=NOW)
    assert not results["spark"].success and results["spark"].failed_checks
    assert verdicts(results["default"]) == verdicts(results["spark"])


@pytest.mark.parametrize("dtype", [pl.Datetime("us"), pl.Datetime("ms", "UTC"), pl.Datetime("ns"), pl.Date])
def test_date_and_datetime_timestamps_become_the_same_seconds(data, tmp_path, dtype):
    """A Parquet timestamp column holding dates or datetimes (with or without a time zone):
    both engines turn it into the same epoch seconds."""
    _, inter, items = data
    folder = tmp_path / "raw"
    folder.mkdir()
    (inter.with_columns(pl.from_epoch("timestamp", time_unit="s").cast(dtype))
     .write_parquet(folder / "events.parquet"))
    items.write_parquet(folder / "items.parquet")
    snaps = []
    for engine in ("default", "spark"):
        p = tiny_params("data.source=files", f"data.path={folder}", "data.files.interactions=events.parquet",
                        "data.files.items=items.parquet", "data.files.columns.weight=weight",
                        "data.files.text_columns=[text]", f"data.engine={engine}", *SPARK)
        result = validate(p.data, p.validation, p.seed, tmp_path / engine / "v", tmp_path / engine / "d", now=NOW)
        assert result.success, result.describe()
        snaps.append(pl.read_parquet(result.data_dir / "interactions.parquet").sort(pl.all()))
    assert snaps[0].equals(snaps[1])
    assert snaps[1]["timestamp"].min() >= 1_500_000_000  # seconds, not micro- or milliseconds


def test_nan_weights_and_unicode_blank_text_get_the_same_verdicts(data, tmp_path):
    """NaN is missing to GE's pandas engine but a value to its Spark engine, and \\S knows
    Unicode spaces in Python but not in Java: each engine is made to judge them alike."""
    _, inter, items = data
    folder = tmp_path / "raw"
    folder.mkdir()
    inter.with_columns(weight=pl.when(pl.int_range(pl.len()) < 4).then(float("nan")).otherwise(pl.col("weight"))) \
        .write_parquet(folder / "events.parquet")
    items.with_columns(text=pl.when(pl.int_range(pl.len()) < 2).then(pl.lit("\u00a0\u3000")).otherwise(pl.col("text"))) \
        .write_parquet(folder / "items.parquet")
    results = {}
    for engine in ("default", "spark"):
        p = tiny_params("data.source=files", f"data.path={folder}", "data.files.interactions=events.parquet",
                        "data.files.items=items.parquet", "data.files.columns.weight=weight",
                        "data.files.text_columns=[text]", f"data.engine={engine}", *SPARK)
        results[engine] = validate(p.data, p.validation, p.seed, tmp_path / engine / "v", tmp_path / engine / "d", now=NOW)
    assert {"weight_not_null", "text_not_blank"} <= set(results["spark"].failed_checks)
    assert verdicts(results["default"]) == verdicts(results["spark"])
