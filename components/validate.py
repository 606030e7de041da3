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

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from components.config import DataConfig, ValidationConfig
from components.datasets import SPLITS, RawDataset, load_dataset, normalize, source_identity

log = logging.getLogger(__name__)

UNDECODABLE = "'{}' decodes in the configured encoding (no U+FFFD replacement characters)"
# Names GE resolves to numpy dtypes or pandas extension dtypes (nullable integers).
INT_TYPES = ["int64", "int32", "Int64Dtype", "Int32Dtype"]
NUMBER_TYPES = INT_TYPES + ["float64", "float32", "Float64Dtype"]


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


def _interaction_expectations(
    columns: list[str], item_ids: list[str], cfg: ValidationConfig, now: int
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
    for col in ("user_id", "item_id", "timestamp", "weight"):
        if col in present:
            add(f"{col}_not_null", f"'{col}' has no nulls", E.ExpectColumnValuesToNotBeNull(column=col))
    for col in ("user_id", "item_id"):
        if col in present:
            add(f"{col}_decodable", UNDECODABLE.format(col), E.ExpectColumnValuesToNotMatchRegex(column=col, regex="\ufffd"))
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
            E.ExpectColumnValuesToBeInSet(column="item_id", value_set=item_ids),
        )
    if "split" in present:
        add(
            "split_values",
            f"'split' is one of {', '.join(SPLITS)}",
            E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        )
    return out


def _item_expectations(columns: list[str]) -> list[Any]:
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
    if "text" in columns:
        add("text_not_null", "every item has text", E.ExpectColumnValuesToNotBeNull(column="text"))
        add(
            "text_not_blank",
            "item text is not empty or blank",
            E.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S"),
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
        if series.dtype.is_integer() and series.null_count():
            # numpy would turn an integer column with one null into floats, and the null into
            # a second, misleading type failure; pandas' nullable Int64 keeps it an integer.
            columns[series.name] = series.to_pandas(use_pyarrow_extension_array=True).astype("Int64")
        else:
            columns[series.name] = series.to_pandas()
    return pd.DataFrame(columns, index=pd.RangeIndex(df.height))


def _run_suites(
    raw: RawDataset, cfg: ValidationConfig, docs_dir: Path, now: int
) -> tuple[list[dict[str, Any]], Path]:
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
    source = ctx.data_sources.add_pandas("recforge")
    item_ids: list[str] = []
    if "item_id" in raw.items.columns:
        item_ids = raw.items["item_id"].drop_nulls().unique().sort().to_list()

    frames = {"interactions": raw.interactions, "items": raw.items}
    expectations = {
        "interactions": _interaction_expectations(raw.interactions.columns, item_ids, cfg, now),
        "items": _item_expectations(raw.items.columns),
    }
    validation_defs = []
    for name, exps in expectations.items():
        suite = gx.ExpectationSuite(name=name)
        for exp in exps:
            suite.add_expectation(exp)
        suite = ctx.suites.add(suite)
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        validation_defs.append(
            ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        )

    results: list[dict[str, Any]] = []
    for vd, (name, frame) in zip(validation_defs, frames.items()):
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_checkpoint",
                validation_definitions=[vd],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                result_format={
                    "result_format": "SUMMARY",
                    "partial_unexpected_count": max(cfg.sample_size, 1),
                },
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": _to_pandas(frame)})
        for suite_result in run.run_results.values():
            for r in suite_result.results:
                cfg_meta = r.expectation_config.meta or {}
                exc = r.exception_info or {}
                results.append(
                    {
                        "suite": name,
                        "check": cfg_meta.get("check", r.expectation_config.type),
                        "description": cfg_meta.get("description", r.expectation_config.type),
                        "expectation": r.expectation_config.type,
                        "kwargs": _small_kwargs(r.expectation_config.kwargs),
                        "success": bool(r.success),
                        "unexpected_count": r.result.get("unexpected_count"),
                        "unexpected_percent": r.result.get("unexpected_percent"),
                        "observed": _jsonable(r.result.get("observed_value")),
                        "examples": _jsonable(r.result.get("partial_unexpected_list") or [])[: cfg.sample_size],
                        "error": exc.get("exception_message") if exc.get("raised_exception") else None,
                    }
                )
    return results, docs_dir / "index.html"


def _small_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Expectation arguments for the summary, minus the (possibly huge) item id value set."""
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


def _type_examples(df: pl.DataFrame, column: str, n: int) -> list[Any]:
    """Example values of a column that failed its type check (GE reports only the type)."""
    if column not in df.columns:
        return []
    values = df[column].drop_nulls().unique(maintain_order=True).head(n).to_list()
    return [str(v) for v in values]


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

    raw = load_dataset(source, seed)
    log.info("loaded %s: %d interactions, %d items", raw.description, raw.interactions.height, raw.items.height)
    results, docs_index = _run_suites(raw, cfg, out_dir / "data_docs", now)

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
    if success:
        inter, items = normalize(raw)
        data_dir.mkdir(parents=True, exist_ok=True)
        inter.write_parquet(data_dir / "interactions.parquet")
        items.write_parquet(data_dir / "items.parquet")
        fingerprint = fingerprint_files([data_dir / "interactions.parquet", data_dir / "items.parquet"])
        (data_dir / "dataset.json").write_text(
            json.dumps(
                {"source": raw.source, "description": raw.description, "fingerprint": fingerprint,
                 "n_interactions": inter.height, "n_items": items.height,
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
        "n_interactions": raw.interactions.height,
        "n_items": raw.items.height,
        "fingerprint": fingerprint,
        "failed_checks": [f.check for f in failures],
        "checks": results,
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return ValidationResult(
        success=success,
        source=raw.source,
        n_interactions=raw.interactions.height,
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
