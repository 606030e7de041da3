"""The Spark engine (`data.engine: spark`): validation's data and feature building on a Spark
session, for data that outgrows one machine.

The same steps as the default engine, in Spark's DataFrame API. Here: the session, reading the source
(a Parquet source natively, with the schema the default engine agrees on; the sources read whole
are handed over as Parquet) and what Great Expectations' Spark datasource validates. Feature
building: `components/spark_features.py`. `tests/integration/test_spark.py` holds the two
engines to identical outputs and verdicts, on clean and on corrupted input.

Needs Java 17 or later (`make install` installs Debian's `default-jre-headless` where it can).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from components.config import DataConfig, SparkConfig
from components.datasets import RawDataset, column_mapping, parquet_source

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

JAVA_HELP = ("`apt-get install default-jre-headless` on Debian/Ubuntu (as root; `make install` does it), "
             "`brew install openjdk@17` on macOS, or point JAVA_HOME at a JDK 17+")
LOG4J = Path(__file__).with_name("spark-log4j2.properties")


class SparkUnavailable(RuntimeError):
    """Spark cannot start here (no Java, too old a Java, no pyspark)."""

    exit_code = 2


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
    builder = (SparkSession.builder.master(cfg.master).appName("recforge")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.session.timeZone", "UTC")
               # Warnings and errors only: Spark's INFO lines would bury the pipeline's own.
               .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{LOG4J}"))
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
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
        return T.TimestampType()
    if dtype == pl.Date:
        return T.DateType()
    return T.StringType()


def _from_polars(spark: SparkSession, frame: pl.DataFrame | pl.LazyFrame, scratch: Path) -> DataFrame:
    """A table read by the default loaders, handed to Spark as Parquet (no pandas in between)."""
    from pyspark.sql import types as T

    if not frame.collect_schema().names():  # an empty file: no columns (validation says so)
        return spark.createDataFrame([], T.StructType([]))
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "table.parquet"
    frame.lazy().sink_parquet(path)
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

    spark = session(source.spark)
    inter = read_interactions(spark, source, raw, scratch)
    items = _from_polars(spark, raw.items, scratch / "items")
    checked = inter
    if "item_id" in inter.columns:
        known = items.select(F.col("item_id").cast("string").alias("__known")) if "item_id" in items.columns else \
            spark.createDataFrame([], "__known string")  # no item ids at all (its own check fails)
        known = known.where(F.col("__known").isNotNull()).distinct()
        # The item id where the items table lacks it (a null id is the not-null check's).
        checked = (inter.join(known, inter["item_id"] == known["__known"], "left")
                   .withColumn(unknown_column, F.when(F.col("__known").isNull(), F.col("item_id"))).drop("__known"))
    return inter, checked, items


def write_snapshot(inter: DataFrame, path: Path, scratch: Path) -> None:
    """The validated interactions in the canonical types (`datasets.normalize`'s) as the one
    Parquet file the later stages read: Spark writes parts, streamed here into one file."""
    from pyspark.sql import functions as F

    cols = [F.col("user_id").cast("string"), F.col("item_id").cast("string"), F.col("timestamp").cast("long")]
    if "weight" in inter.columns:
        cols.append(F.col("weight").cast("double"))
    if "split" in inter.columns:
        cols.append(F.col("split").cast("string"))
    parts = scratch / "snapshot"
    inter.select(cols).write.mode("overwrite").parquet(str(parts))
    files = sorted(f for f in parts.glob("*.parquet") if not f.name.startswith(("_", ".")))
    try:
        pl.scan_parquet(files, glob=False).sink_parquet(path)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
