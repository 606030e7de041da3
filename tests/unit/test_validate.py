"""Validation: each corruption fails with the check that names it, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from components.synthetic import generate
from components.validate import validate
from tests.conftest import tiny_params

NOW = 1_800_000_000  # fixed "now" so that "future" is deterministic


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    """A clean dataset in the `files` layout (CSV), built from the synthetic generator."""
    params = tiny_params()
    inter, items = generate(params.data.synthetic, 0)
    folder = tmp_path / "raw"
    folder.mkdir()
    inter.rename({"weight": "rating"}).write_csv(folder / "interactions.csv")
    items.select("item_id", pl.col("text").alias("title"), pl.lit("desc").alias("description")).write_csv(
        folder / "items.csv"
    )
    return folder


def run(folder: Path, tmp_path: Path, *overrides: str):
    params = tiny_params(
        "data.source=files",
        f"data.path={folder}",
        "data.files.columns.weight=rating",
        *overrides,
    )
    return validate(params.data, params.validation, params.seed, tmp_path / "validation", tmp_path / "data", now=NOW)


def rewrite(folder: Path, name: str, fn) -> None:
    df = pl.read_csv(folder / name, infer_schema_length=0)  # all strings: corrupt freely
    fn(df).write_csv(folder / name)


def failed(result) -> set[str]:
    return set(result.failed_checks)


def test_clean_data_passes_and_writes_snapshot(files_dir, tmp_path):
    result = run(files_dir, tmp_path)
    assert result.success, [f.describe() for f in result.failures]
    snap = pl.read_parquet(tmp_path / "data" / "interactions.parquet")
    assert snap.schema["timestamp"] == pl.Int64 and snap.schema["weight"] == pl.Float64
    assert result.fingerprint and len(result.fingerprint) == 64
    summary = json.loads(result.summary_path.read_text())
    assert summary["success"] and summary["failed_checks"] == []
    assert result.data_docs_index.exists()
    assert "interactions" in result.data_docs_index.read_text()


def test_nulls(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        user_id=pl.when(pl.int_range(pl.len()) < 7).then(None).otherwise(pl.col("user_id"))))
    result = run(files_dir, tmp_path)
    assert "user_id_not_null" in failed(result)
    f = next(f for f in result.failures if f.check == "user_id_not_null")
    assert f.unexpected_count == 7


def test_unknown_item_ids(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        item_id=pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("ghost-item")).otherwise(pl.col("item_id"))))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"item_id_known"}
    f = result.failures[0]
    assert f.unexpected_count == 3 and "ghost-item" in f.examples


def test_duplicates_over_the_allowed_fraction(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: pl.concat([d, d.head(200)]))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"duplicate_rows"}
    # A few duplicates under the configured fraction are tolerated (and dropped by features).
    result = run(files_dir, tmp_path, "validation.max_duplicate_fraction=0.2")
    assert result.success


def test_negative_timestamps(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        timestamp=pl.when(pl.int_range(pl.len()) < 4).then(pl.lit("-5")).otherwise(pl.col("timestamp"))))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"timestamp_not_too_old"}
    assert -5 in result.failures[0].examples


def test_future_timestamps(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        timestamp=pl.when(pl.int_range(pl.len()) < 2).then(pl.lit(str(NOW + 10 * 86400))).otherwise(pl.col("timestamp"))))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"timestamp_not_in_future"}


def test_out_of_range_ratings(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        rating=pl.when(pl.int_range(pl.len()) < 5).then(pl.lit("7.0")).otherwise(pl.col("rating"))))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"weight_in_range"}
    assert result.failures[0].unexpected_count == 5


def test_empty_file(files_dir, tmp_path):
    (files_dir / "interactions.csv").write_text("")
    result = run(files_dir, tmp_path)
    assert {"min_interactions", "column_user_id_present", "column_timestamp_present"} <= failed(result)


def test_header_only_file(files_dir, tmp_path):
    (files_dir / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n")
    result = run(files_dir, tmp_path)
    assert "min_interactions" in failed(result)


def test_wrong_column_type(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        timestamp=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("2021-03-04")).otherwise(pl.col("timestamp"))))
    result = run(files_dir, tmp_path)
    assert "timestamp_type" in failed(result)
    f = next(f for f in result.failures if f.check == "timestamp_type")
    assert f.observed == "str" and "2021-03-04" in f.examples
    # The range checks cannot compare text with a bound: they say so, not GE's internal error.
    for name in ("timestamp_not_too_old", "timestamp_not_in_future"):
        assert _checks(result)[name]["error"] == "'timestamp' is not numeric (see its type check)"


def test_ids_the_service_could_not_take_fail_validation(files_dir, tmp_path):
    """An id with a tab, a blank id: training refuses what the service's door and export refuse,
    so no bundle holds an item the service would not take an event for."""
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        user_id=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("a\tb")).otherwise(pl.col("user_id"))))
    rewrite(files_dir, "items.csv", lambda d: d.with_columns(
        item_id=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("   ")).otherwise(pl.col("item_id"))))
    result = run(files_dir, tmp_path)
    assert {"user_id_form", "items_item_id_form"} <= failed(result) and "item_id_form" not in failed(result)


def test_the_id_rule_is_the_services():
    """components/validate.py's regex and serving.store.id_problem (serving imports nothing from
    training, so the rule is written twice) refuse the same ids."""
    import re

    from components.validate import ID_REFUSED
    from serving.store import id_problem

    ids = ["u1", "B00ABC", "caf\u00e9", "a b", " x", "a\tb", "a\nb", "a\rb", "\x00", "a\x7fb", "a\x1fb", "",
           " ", "\u00a0", "\u3000\u2028", "x" * 256, "x" * 257, "\u00e9" * 257, "\u0085", "a\u0085"]
    for value in ids:
        regex_refuses = bool(re.search(ID_REFUSED, value)) or "\ufffd" in value
        assert regex_refuses == (id_problem(value, "id") is not None), repr(value)


def test_undecodable_text(files_dir, tmp_path):
    raw = (files_dir / "items.csv").read_bytes()
    lines = raw.split(b"\n")
    lines[3] = lines[3].replace(b"desc", b"d\xff\xfesc")  # not valid UTF-8
    (files_dir / "items.csv").write_bytes(b"\n".join(lines))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"text_decodable"}
    assert result.failures[0].unexpected_count == 1


def test_missing_column(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.drop("timestamp"))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"column_timestamp_present"}


def test_single_user(files_dir, tmp_path):
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(user_id=pl.lit("only-user")))
    result = run(files_dir, tmp_path)
    assert "min_users" in failed(result)


def test_duplicate_item_ids_and_blank_text(files_dir, tmp_path):
    rewrite(files_dir, "items.csv", lambda d: pl.concat([d, d.head(1)]).with_columns(
        title=pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("  ")).otherwise(pl.col("title")),
        description=pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("")).otherwise(pl.col("description")),
    ))
    result = run(files_dir, tmp_path)
    assert failed(result) == {"item_id_unique", "text_not_blank"}


def test_failure_removes_previous_snapshot(files_dir, tmp_path):
    assert run(files_dir, tmp_path).success
    assert (tmp_path / "data" / "interactions.parquet").exists()
    rewrite(files_dir, "interactions.csv", lambda d: d.drop("user_id"))
    result = run(files_dir, tmp_path)
    assert not result.success and result.data_dir is None
    assert not (tmp_path / "data").exists()
    summary = json.loads(result.summary_path.read_text())
    assert summary["success"] is False and "column_user_id_present" in summary["failed_checks"]


def test_report_names_checks_with_counts_and_examples(files_dir, tmp_path):
    from components.validate import report

    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        item_id=pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("ghost-item")).otherwise(pl.col("item_id"))))
    text = report(run(files_dir, tmp_path))
    assert "VALIDATION FAILED" in text and "item_id_known" in text
    assert "3 offending rows" in text and "'ghost-item'" in text


def _checks(result) -> dict[str, dict]:
    return {c["check"]: c for c in json.loads(result.summary_path.read_text())["checks"]}


def test_batches_give_the_whole_tables_verdicts(files_dir, tmp_path, caplog):
    """Interactions checked in user partitions (batch_rows far below the table) report exactly
    what one whole batch reports: the same verdicts, counts and observed values, including the
    checks that need the whole table (distinct users, duplicate rows across the table)."""
    def corrupt(d):
        n = pl.int_range(pl.len())
        d = d.with_columns(
            user_id=pl.when(n < 7).then(None).otherwise(pl.col("user_id")),
            item_id=pl.when((n >= 10) & (n < 13)).then(pl.lit("ghost-item")).otherwise(pl.col("item_id")),
            timestamp=pl.when((n >= 20) & (n < 24)).then(pl.lit("-5")).otherwise(pl.col("timestamp")),
            rating=pl.when((n >= 30) & (n < 35)).then(pl.lit("7.0")).otherwise(pl.col("rating")),
        )
        # Duplicates of rows spread over the whole file, appended at its end: only a check that
        # sees each user's rows together finds them.
        return pl.concat([d, d.gather_every(15)])

    rewrite(files_dir, "interactions.csv", corrupt)
    whole = run(files_dir, tmp_path / "whole")
    with caplog.at_level("INFO", logger="components.validate"):
        batched = run(files_dir, tmp_path / "batched", "validation.batch_rows=700")
    assert sum("validated interaction batch" in r.message for r in caplog.records) >= 4
    assert failed(whole) == failed(batched) == {
        "user_id_not_null", "item_id_known", "timestamp_not_too_old", "weight_in_range", "duplicate_rows"}
    a, b = _checks(whole), _checks(batched)
    assert a.keys() == b.keys()
    for name in a:
        for field in ("success", "unexpected_count", "observed"):
            assert a[name][field] == b[name][field], (name, field, a[name][field], b[name][field])
        if a[name]["unexpected_percent"] is not None:
            assert b[name]["unexpected_percent"] == pytest.approx(a[name]["unexpected_percent"])
        assert len(a[name]["examples"]) == len(b[name]["examples"])
    assert b["duplicate_rows"]["unexpected_count"] > 0 and b["min_users"]["observed"] == a["min_users"]["observed"]
    assert set(b["item_id_known"]["examples"]) == {"ghost-item"} and -5 in b["timestamp_not_too_old"]["examples"]
    assert whole.n_interactions == batched.n_interactions
    # The Data Docs render the whole table's result once, not one page per batch.
    validations = list((tmp_path / "batched" / "validation" / "data_docs" / "validations").rglob("*.html"))
    assert len(validations) == 2
    assert not (tmp_path / "batched" / "validation" / ".batches").exists()


def test_batched_snapshot_equals_whole(files_dir, tmp_path):
    whole = run(files_dir, tmp_path / "whole")
    batched = run(files_dir, tmp_path / "batched", "validation.batch_rows=500")
    assert whole.success and batched.success
    assert whole.fingerprint == batched.fingerprint
    assert _checks(whole)["min_users"]["observed"] == _checks(batched)["min_users"]["observed"]


def test_batch_rows_must_be_positive():
    from components.config import ParamsError

    with pytest.raises(ParamsError, match="validation.batch_rows"):
        tiny_params("validation.batch_rows=0")


def test_a_check_that_errors_fails_in_every_batch_too(files_dir, tmp_path):
    """Text in the weight column: GE cannot compare it with the range. One batch or many, the
    range check is reported failed with GE's error, never passed over no values."""
    rewrite(files_dir, "interactions.csv", lambda d: d.with_columns(
        rating=pl.when(pl.int_range(pl.len()) % 97 == 0).then(pl.lit("abc")).otherwise(pl.col("rating"))))
    whole = run(files_dir, tmp_path / "whole")
    batched = run(files_dir, tmp_path / "batched", "validation.batch_rows=700")
    for result in (whole, batched):
        assert {"weight_type", "weight_in_range"} <= failed(result)
        check = _checks(result)["weight_in_range"]
        assert check["success"] is False and check["error"], check
    assert failed(whole) == failed(batched)


def test_rows_without_a_user_are_spread_over_the_batches(tmp_path):
    """Half the rows have no user: they must not all land in one batch (memory), and a repeated
    user-less row stays in the batch of the row it repeats (the duplicate count stays exact)."""
    from components.validate import interaction_batches

    n = 3000
    df = pl.DataFrame({"user_id": [None if i % 2 else f"u{i % 40}" for i in range(n)],
                       "item_id": [f"i{i % 97}" for i in range(n)], "timestamp": list(range(n))})
    df = pl.concat([df, df.filter(pl.col("user_id").is_null()).head(10)])
    batches = list(interaction_batches(df.lazy(), 300, tmp_path / "b"))
    assert sum(b.height for b in batches) == df.height
    assert max(b.height for b in batches) < 3 * 300, [b.height for b in batches]
    repeated = sum(b.filter(pl.col("user_id").is_null()).is_duplicated().sum() for b in batches)
    assert repeated == 20  # each of the 10 repeats beside its original


def test_batched_parquet_folder_source(tmp_path):
    """A Hive-partitioned Parquet folder, scanned lazily and checked in batches: the same
    verdicts and counts as in one batch, and the same snapshot."""
    params = tiny_params()
    clean, items = generate(params.data.synthetic, 0)
    inter = clean.with_columns(timestamp=pl.when(pl.int_range(pl.len()) < 4).then(-5).otherwise(pl.col("timestamp")))
    folder = tmp_path / "raw"
    for day, part in enumerate(inter.with_columns(day=pl.int_range(pl.len()) % 3).partition_by("day")):
        (folder / "events" / f"day={day}").mkdir(parents=True)
        part.drop("day").write_parquet(folder / "events" / f"day={day}" / "part-0.parquet")
    items.write_parquet(folder / "items.parquet")

    def go(name: str, *overrides: str):
        p = tiny_params("data.source=files", f"data.path={folder}", "data.files.interactions=events",
                        "data.files.items=items.parquet", "data.files.columns.weight=weight",
                        "data.files.text_columns=[text]", *overrides)
        return validate(p.data, p.validation, p.seed, tmp_path / name / "validation", tmp_path / name / "data", now=NOW)

    whole, batched = go("whole"), go("batched", "validation.batch_rows=400")
    assert failed(whole) == failed(batched) == {"timestamp_not_too_old"}
    assert _checks(batched)["timestamp_not_too_old"]["unexpected_count"] == 4
    assert _checks(whole)["min_users"]["observed"] == _checks(batched)["min_users"]["observed"]
    for day, part in enumerate(clean.with_columns(day=pl.int_range(pl.len()) % 3).partition_by("day")):
        part.drop("day").write_parquet(folder / "events" / f"day={day}" / "part-0.parquet")
    whole, batched = go("whole"), go("batched", "validation.batch_rows=400")
    assert whole.success and batched.success and whole.fingerprint == batched.fingerprint


def test_files_changed_while_validating_write_no_snapshot(files_dir, tmp_path, monkeypatch):
    """The snapshot is streamed from the source after the checks: if a writer changed the files
    in between, what would be written is not what was validated."""
    import components.validate as v
    from components.datasets import DataSourceError

    real = v._run_suites

    def checks_then_a_writer_appends(*args, **kwargs):
        out = real(*args, **kwargs)
        with (files_dir / "interactions.csv").open("a") as f:
            f.write("late-user,late-item,1700000000,4\n")
        return out

    monkeypatch.setattr(v, "_run_suites", checks_then_a_writer_appends)
    with pytest.raises(DataSourceError, match="changed while they were validated"):
        run(files_dir, tmp_path)
    assert not (tmp_path / "data").exists()
