"""Data validation with Great Expectations 1.x: the gate in front of everything else.

Two expectation suites run on the loaded source: one on interactions (columns, nulls, types,
timestamp range, weight range, duplicates, referential integrity with the items table, minimum
size and number of users) and one on items (unique ids, non-empty, decodable text). The result
is written as a JSON summary and as GE Data Docs HTML under the output folder.

Only when every check passes is the canonical snapshot written (`interactions.parquet`,
`items.parquet`); on failure any previous snapshot is removed, so no later stage can run on
stale data, and the CLI exits non-zero after printing each failed check with counts and examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from components.config import DataConfig, ValidationConfig
from components.datasets import (SPLITS, DataSourceError, RawDataset, load_dataset, normalize, source_identity,
                                 source_stamp)

log = logging.getLogger(__name__)

UNDECODABLE = "'{}' decodes in the configured encoding (no U+FFFD replacement characters)"
# The service's rule for ids (serving/store.py `id_problem`, which its events and exports follow):
# what matches is refused. Control characters (tab and newline among them, DEL), a blank id, over
# 256 characters (Spark counts UTF-16 units). tests/unit/test_validate.py holds the two to agree.
ID_FORM = "'{}' ids are 1-256 characters, not blank, with no control characters (tab, newline...)"
ID_REFUSED = r"[\x00-\x1f\x7f]|^\s*$|^.{257,}"
# Names GE resolves to numpy dtypes or pandas extension dtypes (nullable integers), and the
# Spark types GE's Spark engine reports.
INT_TYPES = ["int64", "int32", "Int64Dtype", "Int32Dtype", "LongType", "IntegerType", "ShortType", "ByteType"]
NUMBER_TYPES = INT_TYPES + ["float64", "float32", "Float64Dtype", "DoubleType", "FloatType"]


class ValidationFailed(RuntimeError):
    """Raised by the pipeline's validation stage so that nothing downstream runs."""

    exit_code = 1  # what a CLI exits with (after printing the report, no traceback)
    # What was built from the previous snapshot must not pass for current (components/pipeline.py).
    stales_downstream = True


@dataclass(frozen=True)
class CheckFailure:
    check: str
    suite: str
    description: str
    unexpected_count: int | None
    unexpected_percent: float | None
    observed: Any
    examples: list[Any]

    def describe(self) -> str:
        parts = [f"[{self.suite}] {self.check}: {self.description}"]
        if self.unexpected_count is not None:
            pct = f" ({self.unexpected_percent:.2f}%)" if self.unexpected_percent is not None else ""
            parts.append(f"  {self.unexpected_count} offending rows{pct}")
        if self.observed is not None:
            parts.append(f"  observed: {self.observed}")
        if self.examples:
            parts.append(f"  examples: {', '.join(repr(e) for e in self.examples)}")
        return "\n".join(parts)


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    source: str
    n_interactions: int
    n_items: int
    n_checks: int
    failures: tuple[CheckFailure, ...]
    summary_path: Path
    data_docs_index: Path
    data_dir: Path | None
    fingerprint: str | None

    @property
    def failed_checks(self) -> list[str]:
        return [f.check for f in self.failures]

    def metrics(self) -> dict[str, int]:
        return {"n_interactions": self.n_interactions, "n_items": self.n_items, "n_checks": self.n_checks,
                "failed_checks": len(self.failures)}

    def describe(self) -> str:
        return report(self)


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def _id_refused(engine: str) -> str:
    # Python's \s knows Unicode spaces (as str.strip does); Java's needs (?U) to.
    return f"(?U){ID_REFUSED}" if engine == "spark" else ID_REFUSED


def _interaction_expectations(
    columns: list[str], cfg: ValidationConfig, now: int, engine: str
) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    out: list[Any] = []

    def add(check: str, description: str, expectation: Any) -> None:
        expectation.meta = {"check": check, "description": description}
        out.append(expectation)

    for col in ("user_id", "item_id", "timestamp"):
        add(f"column_{col}_present", f"required column '{col}' is present", E.ExpectColumnToExist(column=col))
    present = set(columns)
    add(
        "min_interactions",
        f"at least {cfg.min_interactions} interactions",
        E.ExpectTableRowCountToBeBetween(min_value=cfg.min_interactions),
    )
    for col in ("user_id", "item_id", "timestamp", "weight", "split"):
        if col in present:
            add(f"{col}_not_null", f"'{col}' has no nulls", E.ExpectColumnValuesToNotBeNull(column=col))
    for col in ("user_id", "item_id"):
        if col in present:
            add(f"{col}_decodable", UNDECODABLE.format(col), E.ExpectColumnValuesToNotMatchRegex(column=col, regex="\ufffd"))
            add(f"{col}_form", ID_FORM.format(col), E.ExpectColumnValuesToNotMatchRegex(column=col, regex=_id_refused(engine)))
    if "user_id" in present:
        add(
            "min_users",
            f"at least {cfg.min_users} distinct users",
            E.ExpectColumnUniqueValueCountToBeBetween(column="user_id", min_value=cfg.min_users),
        )
    if "timestamp" in present:
        add(
            "timestamp_type",
            "'timestamp' holds integer seconds since the epoch",
            E.ExpectColumnValuesToBeInTypeList(column="timestamp", type_list=INT_TYPES),
        )
        add(
            "timestamp_not_too_old",
            f"timestamps not before {time.strftime('%Y-%m-%d', time.gmtime(cfg.min_timestamp))} "
            "(negative or zero values are corrupt)",
            E.ExpectColumnValuesToBeBetween(column="timestamp", min_value=cfg.min_timestamp),
        )
        add(
            "timestamp_not_in_future",
            f"timestamps not later than now + {cfg.max_future_seconds} s",
            E.ExpectColumnValuesToBeBetween(column="timestamp", max_value=now + cfg.max_future_seconds),
        )
    if "weight" in present:
        add(
            "weight_type",
            "'weight' is numeric",
            E.ExpectColumnValuesToBeInTypeList(column="weight", type_list=NUMBER_TYPES),
        )
        if cfg.weight_min is not None or cfg.weight_max is not None:
            add(
                "weight_in_range",
                f"weights within [{cfg.weight_min}, {cfg.weight_max}]",
                E.ExpectColumnValuesToBeBetween(
                    column="weight", min_value=cfg.weight_min, max_value=cfg.weight_max
                ),
            )
    if {"user_id", "item_id", "timestamp"} <= present:
        add(
            "duplicate_rows",
            f"rows duplicated on (user_id, item_id, timestamp) are at most "
            f"{cfg.max_duplicate_fraction:.2%} of all rows",
            E.ExpectCompoundColumnsToBeUnique(
                column_list=["user_id", "item_id", "timestamp"],
                mostly=1.0 - cfg.max_duplicate_fraction,
            ),
        )
    if "item_id" in present:
        add(
            "item_id_known",
            "every interaction's item_id is in the items table",
            # Over the column `with_unknown_items` adds (the item id where it is unknown): a
            # value set of every item id costs GE seconds per expectation evaluation per 100k
            # items (it copies its arguments), i.e. hours per run with a million items.
            E.ExpectColumnValuesToBeNull(column=UNKNOWN_ITEM),
        )
    if "split" in present:
        add(
            "split_values",
            f"'split' is one of {', '.join(SPLITS)}",
            E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        )
    return out


def _item_expectations(columns: list[str], engine: str) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    out: list[Any] = []

    def add(check: str, description: str, expectation: Any) -> None:
        expectation.meta = {"check": check, "description": description}
        out.append(expectation)

    add("items_not_empty", "the items table has at least one row", E.ExpectTableRowCountToBeBetween(min_value=1))
    for col in ("item_id", "text"):
        add(f"items_column_{col}_present", f"items column '{col}' is present", E.ExpectColumnToExist(column=col))
    if "item_id" in columns:
        add("item_id_not_null", "item ids have no nulls", E.ExpectColumnValuesToNotBeNull(column="item_id"))
        add("item_id_unique", "item ids are unique", E.ExpectColumnValuesToBeUnique(column="item_id"))
        add("items_item_id_decodable", UNDECODABLE.format("item_id"),
            E.ExpectColumnValuesToNotMatchRegex(column="item_id", regex="\ufffd"))
        add("items_item_id_form", ID_FORM.format("item_id"),
            E.ExpectColumnValuesToNotMatchRegex(column="item_id", regex=_id_refused(engine)))
    if "text" in columns:
        add("text_not_null", "every item has text", E.ExpectColumnValuesToNotBeNull(column="text"))
        add(
            "text_not_blank",
            "item text is not empty or blank",
            # Python's \S knows Unicode spaces (no-break, ideographic); Java's needs (?U) to.
            E.ExpectColumnValuesToMatchRegex(column="text", regex=r"(?U)\S" if engine == "spark" else r"\S"),
        )
        add(
            "text_decodable",
            "item text decodes in the configured encoding (no U+FFFD replacement characters)",
            E.ExpectColumnValuesToNotMatchRegex(column="text", regex="\ufffd"),
        )
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _to_pandas(df: pl.DataFrame):  # -> pandas.DataFrame
    import pandas as pd

    columns = {}
    for series in df.get_columns():
        if series.dtype.is_integer() and series.dtype != pl.UInt64:
            # Any integer width is an integer: as int64, so that a type check does not depend on
            # the width or on whether one batch happens to hold a null.
            series = series.cast(pl.Int64)
        if series.dtype.is_integer() and series.null_count():
            # numpy would turn an integer column with one null into floats, and the null into
            # a second, misleading type failure; pandas' nullable Int64 keeps it an integer.
            columns[series.name] = series.to_pandas(use_pyarrow_extension_array=True).astype("Int64")
        else:
            columns[series.name] = series.to_pandas()
    return pd.DataFrame(columns, index=pd.RangeIndex(df.height))


PART = "__part"
UNKNOWN_ITEM = "item_id_not_in_items"


def with_unknown_items(frame: pl.DataFrame, known: pl.Series) -> pl.DataFrame:
    """`frame` plus UNKNOWN_ITEM: the row's item id where the items table lacks it, else null
    (a null item id is the not-null check's to report)."""
    if "item_id" not in frame.columns:
        return frame
    unknown = pl.when(pl.col("item_id").is_in(known.implode()).not_()).then(pl.col("item_id"))
    return frame.with_columns(unknown.alias(UNKNOWN_ITEM))


def interaction_batches(inter: pl.DataFrame | pl.LazyFrame, batch_rows: int, work_dir: Path) -> Iterator[pl.DataFrame]:
    """The interactions in batches of about `batch_rows` rows, so that Great Expectations (which
    works on pandas) never holds more than one batch.

    The batches are hash partitions by `user_id`, written in one streaming pass: every row of a
    user, and so every duplicate of a (user, item, timestamp) row, lies in one batch. That makes
    each check exact when the batches' results are added up, including the two that need the
    whole table (distinct users, duplicate rows). A table that fits one batch is one batch. A
    batch holds all of its users' rows, so a single user with more than `batch_rows` rows (a
    bot, a shared account) makes its batch that large."""
    lazy = inter.lazy()
    with _reading():
        n_rows = lazy.select(pl.len()).collect().item()
        whole = lazy.collect() if n_rows <= batch_rows else None
    if whole is not None:
        yield whole
        return
    n_parts = -(-n_rows // batch_rows)
    columns = lazy.collect_schema().names()
    if "user_id" in columns:
        # Rows without a user (the not-null check counts them) would all land in one batch:
        # they are spread by (item, timestamp), which keeps their duplicates together.
        rest = [c for c in ("item_id", "timestamp") if c in columns]
        key = pl.col("user_id").hash(seed=0)
        if rest:
            key = pl.when(pl.col("user_id").is_null()).then(pl.struct(rest).hash(seed=0)).otherwise(key)
        key = key % n_parts
    else:  # no user column (a failed check already): any split keeps the row-wise checks exact
        lazy, key = lazy.with_row_index(PART), pl.col(PART) % n_parts
    with _reading():
        lazy.with_columns(key.alias(PART)).sink_parquet(pl.PartitionBy(work_dir, key=PART, include_key=False),
                                                        mkdir=True)
    for folder in sorted(work_dir.iterdir(), key=lambda f: int(f.name.split("=", 1)[1])):
        yield pl.read_parquet(sorted(folder.glob("*.parquet")))
        shutil.rmtree(folder)  # disk in use stays one copy of the table, shrinking as it goes


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A lazy Parquet source is read here: a file it cannot read is the source's error."""
    try:
        yield
    except pl.exceptions.PolarsError as exc:
        raise DataSourceError(f"cannot read the interactions: {str(exc).splitlines()[0]}") from exc


# How each expectation's result over the whole table follows from its results over the batches.
# Row-wise checks add up their counts; the table-wide ones are exact because batches are user
# partitions (see `interaction_batches`).
ROW_WISE = {
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_null", "expect_column_values_to_match_regex",
    "expect_column_values_to_not_match_regex", "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set", "expect_compound_columns_to_be_unique",
}
SAME_IN_EVERY_BATCH = {"expect_column_to_exist", "expect_column_values_to_be_in_type_list"}


def _merge_results(parts: list[Any], sample_size: int) -> Any:
    """One GE suite result for the whole table from the results of its batches (mutates and
    returns the first, so that Data Docs render it as GE's own)."""
    merged = parts[0]
    if len(parts) == 1:
        return _ranges_need_numbers(merged)
    for i, first in enumerate(merged.results):
        each = [p.results[i] for p in parts]
        kind = first.expectation_config.type
        kwargs = first.expectation_config.kwargs
        if any(_raised(r) for r in each):
            merged.results[i] = next(r for r in each if _raised(r))
            continue
        if kind in SAME_IN_EVERY_BATCH:
            merged.results[i] = next((r for r in each if not r.success), first)
        elif kind == "expect_table_row_count_to_be_between":
            rows = sum(r.result["observed_value"] for r in each)
            first.result["observed_value"] = rows
            first.success = _within(rows, kwargs)
        elif kind == "expect_column_unique_value_count_to_be_between":
            # Users are disjoint across batches, so their distinct counts add up.
            assert kwargs["column"] == "user_id", f"{kind} on {kwargs['column']} cannot be merged"
            distinct = sum(r.result["observed_value"] for r in each)
            first.result["observed_value"] = distinct
            first.success = _within(distinct, kwargs)
        elif kind in ROW_WISE:
            _merge_row_wise(first, each, kwargs, sample_size)
        else:
            raise AssertionError(f"no rule merges {kind} over batches")
    return _ranges_need_numbers(merged)


def _ranges_need_numbers(merged: Any) -> Any:
    """A range check over a column whose type check found text fails too, with the reason. GE's
    pandas engine passes one over an empty text column (no value to compare) while its Spark
    engine cannot compute it: the verdict must not depend on the engine. Where GE raised instead
    (text compared with a number), its internal message gives way to the same reason."""
    wrong_type = {r.expectation_config.kwargs.get("column") for r in merged.results
                  if r.expectation_config.type == "expect_column_values_to_be_in_type_list" and not r.success
                  and r.result.get("observed_value") not in NUMBER_TYPES}  # floats are compared fine
    for r in merged.results:
        column = r.expectation_config.kwargs.get("column")
        if (r.expectation_config.type == "expect_column_values_to_be_between" and column in wrong_type
                and (r.success or _raised(r))):
            r.success, r.result = False, {}
            r.exception_info = {"raised_exception": True, "exception_traceback": None,
                                "exception_message": f"'{column}' is not numeric (see its type check)"}
    merged.success = all(r.success for r in merged.results)
    ok = sum(r.success for r in merged.results)
    merged.statistics.update(successful_expectations=ok, unsuccessful_expectations=len(merged.results) - ok,
                             success_percent=100.0 * ok / max(len(merged.results), 1))
    return merged


def _raised(r: Any) -> dict[str, Any] | None:
    """The error a check raised instead of computing (GE files it flat, or under the id of the
    metric that failed), or None."""
    info = r.exception_info or {}
    if info.get("raised_exception"):
        return info
    return next((v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")), None)


def _within(value: float, kwargs: dict[str, Any]) -> bool:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    return (low is None or value >= low) and (high is None or value <= high)


def _merge_row_wise(first: Any, each: list[Any], kwargs: dict[str, Any], sample_size: int) -> None:
    out = first.result
    total = sum(r.result.get("element_count", 0) for r in each)
    unexpected = sum(r.result.get("unexpected_count", 0) for r in each)
    out["element_count"], out["unexpected_count"] = total, unexpected
    # GE counts a value check over the non-null values; the null check itself over all rows.
    base = total
    if "missing_count" in out:
        missing = sum(r.result.get("missing_count", 0) for r in each)
        base = total - missing
        out["missing_count"] = missing
        out["missing_percent"] = 100.0 * missing / total if total else None
        out["unexpected_percent_total"] = 100.0 * unexpected / total if total else None
        out["unexpected_percent_nonmissing"] = 100.0 * unexpected / base if base else None
    out["unexpected_percent"] = 100.0 * unexpected / base if base else None
    examples = [v for r in each for v in r.result.get("partial_unexpected_list") or []]
    out["partial_unexpected_list"] = examples[:max(sample_size, 1)]
    counts: dict[str, dict[str, Any]] = {}
    for r in each:
        for c in r.result.get("partial_unexpected_counts") or []:
            slot = counts.setdefault(repr(c["value"]), {"value": c["value"], "count": 0})
            slot["count"] += c["count"]
    out["partial_unexpected_counts"] = sorted(counts.values(), key=lambda c: -c["count"])[:max(sample_size, 1)]
    out.pop("partial_unexpected_index_list", None)  # row numbers within a batch mean nothing
    mostly = kwargs.get("mostly", 1.0)
    # GE's own rule (a check over no values passes), unless a batch failed without counting.
    counted = all(r.success or r.result.get("unexpected_count") for r in each)
    first.success = counted and (base == 0 or (base - unexpected) / base >= mostly)


def _pandas_batches(raw: RawDataset, cfg: ValidationConfig, work_dir: Path) -> dict[str, Iterator[tuple[Any, int]]]:
    """The default engine's input to Great Expectations: pandas batches and their row counts."""
    known = raw.items["item_id"].drop_nulls().unique() if "item_id" in raw.items.columns else pl.Series([], dtype=pl.Utf8)

    def interactions() -> Iterator[tuple[Any, int]]:
        for frame in interaction_batches(raw.interactions, cfg.batch_rows, work_dir):
            frame = with_unknown_items(frame, known)
            yield _to_pandas(frame), frame.height

    return {"interactions": interactions(), "items": iter([(_to_pandas(raw.items), raw.items.height)])}


def _run_suites(
    batches: dict[str, Iterator[tuple[Any, int]]], columns: dict[str, list[str]], engine: str, cfg: ValidationConfig,
    docs_dir: Path, now: int,
) -> tuple[list[dict[str, Any]], Path, int]:
    """Both suites over their batches (pandas frames, or one Spark DataFrame each); returns the
    per-check results, the Data Docs index and the number of interactions."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    # GE logs every internal registration at INFO; only its warnings are worth showing.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GE sets this module's logger to INFO when imported (a line per temporary docs folder).
    logging.getLogger(ProgressBarsConfig.__module__).setLevel(logging.WARNING)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    # An ephemeral context comes with a default docs site in a fresh temporary folder that
    # nothing ever removes; ours replaces it.
    for name, site in dict(ctx.variables.data_docs_sites or {}).items():
        default_dir = site.get("store_backend", {}).get("base_directory")
        ctx.delete_data_docs_site(name)
        if default_dir and Path(default_dir).is_dir() and Path(default_dir).parent == Path(tempfile.gettempdir()):
            shutil.rmtree(default_dir, ignore_errors=True)
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    ctx.add_data_docs_site(
        site_name="recforge",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = ctx.data_sources.add_spark("recforge") if engine == "spark" else ctx.data_sources.add_pandas("recforge")
    expectations = {
        "interactions": _interaction_expectations(columns["interactions"], cfg, now, engine),
        "items": _item_expectations(columns["items"], engine),
    }
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": max(cfg.sample_size, 1)}
    results: list[dict[str, Any]] = []
    n_interactions = 0
    for name, exps in expectations.items():
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=exps))
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        parts = []
        for i, (frame, n_rows) in enumerate(batches[name]):
            parts.append(vd.run(batch_parameters={"dataframe": frame}, result_format=result_format))
            del frame
            if name == "interactions":
                n_interactions += n_rows
                if engine == "spark":
                    log.info("validated %d interactions on Spark", n_rows)
                else:
                    log.info("validated interaction batch %d (%d rows, %d so far)", i + 1, n_rows, n_interactions)
        merged = _merge_results(parts, cfg.sample_size)
        # In the suite's order (GE's Spark engine reports in the order its metrics resolve).
        rank = {e.meta["check"]: k for k, e in enumerate(exps)}
        merged.results.sort(key=lambda r: rank.get((r.expectation_config.meta or {}).get("check"), len(rank)))
        # The store holds one result per batch; Data Docs show the whole table's.
        store = ctx.validation_results_store
        keys = list(store.list_keys())
        suite_keys = [k for k in keys if k.expectation_suite_identifier.name == name]
        for key in suite_keys:
            store.remove_key(key)
        store.set(suite_keys[0], merged)
        for r in merged.results:
            cfg_meta = r.expectation_config.meta or {}
            exc = _raised(r) or {}
            results.append(
                {
                    "suite": name,
                    "check": cfg_meta.get("check", r.expectation_config.type),
                    "description": cfg_meta.get("description", r.expectation_config.type),
                    "expectation": r.expectation_config.type,
                    "kwargs": _small_kwargs(r.expectation_config.kwargs),
                    "success": bool(r.success),
                    "unexpected_count": _unexpected_count(r, exc),
                    "unexpected_percent": r.result.get("unexpected_percent"),
                    "observed": _jsonable(r.result.get("observed_value")),
                    "examples": _jsonable(r.result.get("partial_unexpected_list") or [])[: cfg.sample_size],
                    "error": _short_error(exc.get("exception_message")),
                }
            )
    ctx.build_data_docs()
    return results, docs_dir / "index.html", n_interactions


def _short_error(message: str | None) -> str | None:
    """An error's own line: a Spark job's error comes wrapped in Py4J's and Java's frames."""
    if not message:
        return message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "Exception: " in line and ("org.apache." in line or "java." in line):
            return line.split("Exception: ", 1)[1]
    return lines[0] if lines else message


def _unexpected_count(r: Any, exc: dict[str, Any]) -> int | None:
    """A row-wise check's offending rows; 0 over an empty table, where GE's Spark engine reports
    no count at all (its pandas engine reports 0)."""
    count = r.result.get("unexpected_count")
    if count is None and not exc and r.expectation_config.type in ROW_WISE:
        return 0
    return count


def _small_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Expectation arguments for the summary, a long value set shortened to its size."""
    out = {}
    for key, value in kwargs.items():
        if key == "value_set" and isinstance(value, (list, set, tuple)) and len(value) > 10:
            out[key] = f"<{len(value)} values>"
        else:
            out[key] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    return str(value)


def _type_examples(df: pl.DataFrame | pl.LazyFrame, column: str, n: int) -> list[Any]:
    """Example values of a column that failed its type check (GE reports only the type),
    from the table's first rows: the type is the whole column's, so any rows show it."""
    if column not in df.collect_schema().names():
        return []
    head = df.lazy().select(column).drop_nulls().head(100_000).collect()[column]
    return [str(v) for v in head.unique(maintain_order=True).head(n).to_list()]


def fingerprint_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def validate(source: DataConfig, cfg: ValidationConfig, seed: int, out_dir: Path, data_dir: Path,
             now: int | None = None) -> ValidationResult:
    """Load the configured source, validate it, and write the snapshot only if it passes.

    `out_dir` receives `summary.json` and `data_docs/`; `data_dir` receives the canonical
    snapshot (`interactions.parquet`, `items.parquet`, `dataset.json`) on success and is
    emptied on failure.
    """
    now = int(time.time()) if now is None else now
    out_dir.mkdir(parents=True, exist_ok=True)
    # Remove the previous snapshot first: a failure must never leave old data looking current.
    if data_dir.exists():
        shutil.rmtree(data_dir)

    raw = load_dataset(source, seed, lazy=True)
    log.info("loaded %s: %d items; interactions %s", raw.description, raw.items.height,
             "on Spark" if source.engine == "spark" else f"in batches of up to {cfg.batch_rows} rows")
    work_dir = out_dir / ".batches"
    shutil.rmtree(work_dir, ignore_errors=True)
    read_at = source_stamp(source)
    columns = {"interactions": raw.interactions.collect_schema().names(), "items": raw.items.columns}
    # The Spark engine writes the snapshot from what it validated, here until it may be kept.
    staged = out_dir / ".snapshot.parquet"
    staged.unlink(missing_ok=True)
    try:
        if source.engine == "spark":
            from components import spark

            with spark.reading_source():
                as_read, checked, items = spark.validation_frames(source, raw, UNKNOWN_ITEM, work_dir)
                columns["interactions"] = as_read.columns
                n_rows = checked.count()
            batches = {"interactions": iter([(checked, n_rows)]), "items": iter([(items, raw.items.height)])}
        else:
            batches = _pandas_batches(raw, cfg, work_dir)
        results, docs_index, n_interactions = _run_suites(batches, columns, source.engine, cfg, out_dir / "data_docs",
                                                          now)
        if source.engine == "spark":
            checked.sparkSession.catalog.clearCache()  # GE cached what it validated
            if all(r["success"] for r in results):
                with spark.reading_source():
                    spark.write_snapshot(as_read, n_rows, staged, work_dir)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    failures = []
    for r in results:
        if r["success"]:
            continue
        examples = r["examples"]
        if r["expectation"] == "expect_column_values_to_be_in_type_list" and not examples:
            frame = raw.interactions if r["suite"] == "interactions" else raw.items
            examples = _type_examples(frame, r["kwargs"].get("column", ""), cfg.sample_size)
        failures.append(
            CheckFailure(
                check=r["check"],
                suite=r["suite"],
                description=r["description"] + (f" (error: {r['error']})" if r["error"] else ""),
                unexpected_count=r["unexpected_count"],
                unexpected_percent=r["unexpected_percent"],
                observed=r["observed"],
                examples=examples,
            )
        )
    success = not failures

    written_dir, fingerprint = None, None
    if success and source_stamp(source) != read_at:
        staged.unlink(missing_ok=True)
        raise DataSourceError(f"{raw.description}: the files changed while they were validated (a writer still "
                              f"running?); nothing was written: validate again once they are complete")
    if success:
        inter, items = normalize(raw)
        data_dir.mkdir(parents=True, exist_ok=True)
        if staged.exists():
            shutil.move(staged, data_dir / "interactions.parquet")
        else:
            # Streams from the source to the snapshot (a lazy source is never held whole).
            inter.lazy().sink_parquet(data_dir / "interactions.parquet")
        items.write_parquet(data_dir / "items.parquet")
        fingerprint = fingerprint_files([data_dir / "interactions.parquet", data_dir / "items.parquet"])
        (data_dir / "dataset.json").write_text(
            json.dumps(
                {"source": raw.source, "description": raw.description, "fingerprint": fingerprint,
                 "n_interactions": n_interactions, "n_items": items.height,
                 "settings": source_identity(source, seed)},
                indent=2,
            )
        )
        written_dir = data_dir

    summary_path = out_dir / "summary.json"
    summary = {
        "success": success,
        "source": raw.source,
        "description": raw.description,
        "validated_at": now,
        "n_interactions": n_interactions,
        "n_items": raw.items.height,
        "fingerprint": fingerprint,
        "failed_checks": [f.check for f in failures],
        "checks": results,
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return ValidationResult(
        success=success,
        source=raw.source,
        n_interactions=n_interactions,
        n_items=raw.items.height,
        n_checks=len(results),
        failures=tuple(failures),
        summary_path=summary_path,
        data_docs_index=docs_index,
        data_dir=written_dir,
        fingerprint=fingerprint,
    )


def report(result: ValidationResult) -> str:
    if result.success:
        return (
            f"validation passed: {result.n_checks} checks on {result.n_interactions} interactions and "
            f"{result.n_items} items ({result.source}); snapshot in {result.data_dir}"
        )
    lines = [
        f"VALIDATION FAILED: {len(result.failures)} of {result.n_checks} checks failed "
        f"({result.source}); nothing downstream will run.",
    ]
    lines += [f.describe() for f in result.failures]
    lines.append(f"details: {result.summary_path}  data docs: {result.data_docs_index}")
    return "\n".join(lines)


def validated_snapshot(source: DataConfig, cfg: ValidationConfig, seed: int, out_dir: Path,
                       data_dir: Path) -> ValidationResult:
    """The pipeline's gate: validate, and stop the pipeline (`ValidationFailed`, naming every
    failed check) unless every check passed."""
    result = validate(source, cfg, seed, out_dir, data_dir)
    if not result.success:
        raise ValidationFailed(report(result))
    return result


if __name__ == "__main__":
    from components.pipeline import main

    main("validate")
