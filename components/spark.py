"""The Spark engine (`data.engine: spark`): validation's data and feature building on a Spark
session, for data that outgrows one machine.

The same steps as the default engine, in Spark's DataFrame API. Here: the session, reading the source
(a Parquet source natively, with the schema the default engine agrees on; the sources read whole
are handed over as Parquet) and what Great Expectations' Spark datasource validates. Feature
building: `components/spark_features.py`. `tests/integration/test_spark.py` holds the two
engines to identical outputs and verdicts, on clean and on corrupted input.

Needs Java 17 or later (`make install` installs Debian's `openjdk-17-jre-headless` where it can).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import polars as pl

from components.config import DataConfig, SparkConfig
from components.datasets import DataSourceError, RawDataset, column_mapping, parquet_source

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

JAVA_HELP = ("`apt-get install openjdk-17-jre-headless` on Debian/Ubuntu (as root; `make install` does it), "
             "`brew install openjdk@17` on macOS, or point JAVA_HOME at a JDK 17+")
LOG4J = Path(__file__).with_name("spark-log4j2.properties")


class SparkUnavailable(RuntimeError):
    """Spark cannot start here (no Java, too old a Java, no pyspark, a setting it refuses)."""

    exit_code = 2


class SparkOutputMissing(RuntimeError):
    """What Spark wrote cannot be read back here in full (a cluster writing elsewhere)."""

    exit_code = 2


def _spark_errors() -> tuple[type[BaseException], ...]:
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    return PySparkException, Py4JJavaError


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "java_exception", None) or exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


@contextlib.contextmanager
def reading_source() -> Iterator[None]:
    """Spark reads the source here: what it cannot read is the source's error (exit 2, one
    line), not a Java stack trace."""
    try:
        yield
    except _spark_errors() as exc:
        raise DataSourceError(f"Spark cannot read the interactions: {_first_line(exc)}") from exc


def write_parts(frame: DataFrame, folder: Path, expected_rows: int) -> list[Path]:
    """`frame` written by Spark as Parquet parts in `folder`, read back here: the part files,
    refused unless they hold all `expected_rows` rows (with a cluster master, executors write on
    their own disks unless `folder` is on storage they and this machine share)."""
    frame.write.mode("overwrite").parquet(str(folder))
    files = sorted(f for f in folder.glob("*.parquet") if not f.name.startswith(("_", ".")))
    found = pl.scan_parquet(files, glob=False).select(pl.len()).collect().item() if files else 0
    if found != expected_rows:
        raise SparkOutputMissing(f"Spark wrote {expected_rows} rows to {folder} but {found} can be read here: with a "
                                 f"cluster master, the artifacts folder must be on storage the executors and this "
                                 f"machine share")
    return files


def java_version() -> int | None:
    """The major version of the Java Spark would start (JAVA_HOME's, else the PATH's), or None."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def session(cfg: SparkConfig) -> SparkSession:
    """The process's Spark session (started on first use, then shared by the stages)."""
    version = java_version()
    if version is None or version < 17:
        found = "no Java found" if version is None else f"found Java {version}"
        raise SparkUnavailable(f"data.engine=spark needs Java 17 or later ({found}): {JAVA_HELP}")
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise SparkUnavailable("data.engine=spark needs pyspark: pip install -e '.[spark]'") from exc
    if cfg.master.startswith("local"):
        # Otherwise Spark warns that the host name resolves to a loopback address.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.master(cfg.master).appName("recforge")
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    # After the user's settings: dates and zone-less datetimes become epoch seconds in UTC, as
    # the default engine computes them.
    builder = (builder.config("spark.ui.showConsoleProgress", "false").config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.legacy.parquet.nanosAsLong", "true")  # see `_spark_type`
               # Warnings and errors only: Spark's INFO lines would bury the pipeline's own.
               .config("spark.driver.extraJavaOptions",
                       f"-Dlog4j2.configurationFile=file:{LOG4J} {cfg.conf.get('spark.driver.extraJavaOptions', '')}"))
    try:
        spark = builder.getOrCreate()
    except _spark_errors() as exc:
        raise SparkUnavailable(f"Spark did not start with data.spark ({cfg.master}): {_first_line(exc)}") from exc
    spark.sparkContext.setLogLevel("WARN")
    return spark


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _spark_type(dtype: pl.DataType) -> Any:
    from pyspark.sql import types as T

    if dtype.is_integer():
        return T.LongType()  # every width is read as the widest, as the default engine does
    if dtype.is_float():
        return T.DoubleType()
    if isinstance(dtype, pl.Decimal):
        return T.DecimalType(dtype.precision or 38, dtype.scale or 0)
    if dtype == pl.Boolean:
        return T.BooleanType()
    if isinstance(dtype, pl.Datetime):
        # Spark has no nanosecond timestamp: read as the integer it is (`nanosAsLong`).
        return T.LongType() if dtype.time_unit == "ns" else T.TimestampType()
    if dtype == pl.Date:
        return T.DateType()
    return T.StringType()


def _from_polars(spark: SparkSession, frame: pl.DataFrame | pl.LazyFrame, scratch: Path) -> DataFrame:
    """A table read by the default loaders, handed to Spark as Parquet (no pandas in between)."""
    from pyspark.sql import types as T

    schema = frame.collect_schema()
    if not schema.names():  # an empty file: no columns (validation says so)
        return spark.createDataFrame([], T.StructType([]))
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "table.parquet"
    # Spark reads no nanosecond timestamps; microseconds are what the default engine keeps.
    nanos = [c for c, t in schema.items() if isinstance(t, pl.Datetime) and t.time_unit == "ns"]
    frame.lazy().with_columns(pl.col(c).dt.cast_time_unit("us") for c in nanos).sink_parquet(path)
    return spark.read.parquet(str(path))


def read_interactions(spark: SparkSession, source: DataConfig, raw: RawDataset, scratch: Path) -> DataFrame:
    """The interactions in the RecForge schema (types as read, like `load_dataset`): a Parquet
    source read by Spark itself, every other source (read whole either way) from `raw`."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    layout = parquet_source(source)
    if layout is None:
        return _from_polars(spark, raw.interactions, scratch / "source")
    fields = [T.StructField(c, _spark_type(t)) for c, t in layout.schema.items() if c not in layout.id_keys]
    fields += [T.StructField(c, T.StringType()) for c in layout.id_keys]  # folder names as written
    df = (spark.read.schema(T.StructType(fields)).option("basePath", str(layout.base))
          .parquet(*[str(f) for f in layout.files]))
    renamed = {dst: src for dst, src in column_mapping(source).items() if src is not None and src in df.columns}
    ids = ("user_id", "item_id")
    cols = []
    for dst, src in renamed.items():
        col = F.col(f"`{src}`")
        if dst in ids:
            col = col.cast("string")
        elif dst == "timestamp" and isinstance(layout.schema.get(src), pl.Datetime) and \
                layout.schema[src].time_unit == "ns":
            col = F.expr(f"div(`{src}` - pmod(`{src}`, 1000000000), 1000000000)")  # floor, in integers
        elif dst == "timestamp" and isinstance(df.schema[src].dataType, (T.TimestampType, T.DateType)):
            col = F.unix_timestamp(col.cast("timestamp"))
        cols.append(col.alias(dst))
    return df.select(cols)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validation_frames(source: DataConfig, raw: RawDataset, unknown_column: str,
                      scratch: Path) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(interactions as read, the same plus `unknown_column`, items) as Spark DataFrames: what
    Great Expectations' Spark datasource validates (it caches them: each expectation is a job)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    spark = session(source.spark)
    inter = read_interactions(spark, source, raw, scratch)
    items = _from_polars(spark, raw.items, scratch / "items")
    # GE's pandas engine counts NaN as missing, its Spark engine does not: NaN made null here
    # gives the not-null checks the same verdict on both.
    checked = inter.select([F.when(F.isnan(c), None).otherwise(F.col(c)).alias(c)
                            if isinstance(inter.schema[c].dataType, (T.DoubleType, T.FloatType)) else F.col(c)
                            for c in inter.columns])
    if "item_id" in inter.columns:
        known = items.select(F.col("item_id").cast("string").alias("__known")) if "item_id" in items.columns else \
            spark.createDataFrame([], "__known string")  # no item ids at all (its own check fails)
        known = known.where(F.col("__known").isNotNull()).distinct()
        # The item id where the items table lacks it (a null id is the not-null check's).
        checked = (checked.join(known, checked["item_id"] == known["__known"], "left")
                   .withColumn(unknown_column, F.when(F.col("__known").isNull(), F.col("item_id"))).drop("__known"))
    return inter, checked, items


def write_snapshot(inter: DataFrame, n_rows: int, path: Path, scratch: Path) -> None:
    """The validated interactions (`n_rows`) in the canonical types (`datasets.normalize`'s) as
    the one Parquet file the later stages read: Spark writes parts, streamed here into one file."""
    from pyspark.sql import functions as F

    cols = [F.col("user_id").cast("string"), F.col("item_id").cast("string"), F.col("timestamp").cast("long")]
    if "weight" in inter.columns:
        cols.append(F.col("weight").cast("double"))
    if "split" in inter.columns:
        cols.append(F.col("split").cast("string"))
    parts = scratch / "snapshot"
    try:
        pl.scan_parquet(write_parts(inter.select(cols), parts, n_rows), glob=False).sink_parquet(path)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
