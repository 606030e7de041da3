"""Feature building on Spark (`data.engine: spark`): `features.feature_table`, step for step.

Code assignment, de-duplication, k-core, the splits and id indexing run as Spark jobs; only the
final table comes back to this process, where the file writer both engines share
(`features.build_features`) turns it into the feature files.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from components.config import FeaturesConfig, SparkConfig
from components.feature_table import (NUMERIC_ID, FeatureTable, check_split_settings, check_temporal_fractions,
                                      no_interactions_left)
from components.spark import session, write_parts

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

log = logging.getLogger(__name__)


def _dense_index(df: DataFrame, order: list[Column], name: str) -> tuple[DataFrame, int]:
    """`df` plus `name`: 0..n-1 in `order`, without moving the table to one partition: a
    range-partitioned sort, then each partition's offset from the row counts before it; and n."""
    from pyspark.sql import functions as F

    # monotonically_increasing_id is (partition << 33) + the row's place in its partition.
    ranked = (df.orderBy(*order).withColumn("__part", F.spark_partition_id())
              .withColumn("__pos", F.monotonically_increasing_id() - F.shiftleft(F.col("__part").cast("long"), 33))
              .localCheckpoint())  # the sort's range bounds are sampled: fix one outcome
    offsets, total = [], 0
    for row in sorted(ranked.groupBy("__part").count().collect()):
        offsets.append((row["__part"], total))
        total += row["count"]
    starts = ranked.sparkSession.createDataFrame(offsets or [(0, 0)], "__part int, __start long")
    indexed = ranked.join(F.broadcast(starts), "__part").withColumn(name, F.col("__start") + F.col("__pos"))
    return indexed.drop("__part", "__pos", "__start"), total


def _codes(df: DataFrame, column: str) -> DataFrame:
    """`column`'s distinct ids with their code (`code`), in the default engine's id order
    (`features.code_ids`): numerically when every id is a number, then by text."""
    from pyspark.sql import functions as F

    ids = df.select(column).distinct()
    every_numeric = ids.agg(F.min(F.col(column).rlike(NUMERIC_ID).cast("int"))).first()[0] == 1
    order = ([F.col(column).cast("long"), F.col(column)] if every_numeric else [F.col(column)])
    return _dense_index(ids, order, "code")[0]


def _k_core(df: DataFrame, min_user: int, min_item: int) -> DataFrame:
    """`features.k_core`: items, then users, under their thresholds removed until stable."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if min_user <= 1 and min_item <= 1:
        return df
    n = df.count()
    while True:
        before = n
        for column, least in (("i", min_item), ("u", min_user)):
            if least > 1:
                df = (df.withColumn("__n", F.count(F.lit(1)).over(Window.partitionBy(column)))
                      .where(F.col("__n") >= least).drop("__n"))
        df = df.localCheckpoint()  # an ever longer plan otherwise, one filter pair a round
        n = df.count()
        if n == before:
            return df


def _quantile_higher(df: DataFrame, column: str, q: float) -> int:
    """The exact `q` quantile with "higher" interpolation, as Polars computes it."""
    from pyspark.sql import functions as F

    n = df.count()
    k = math.ceil((n - 1) * q)
    ranked = _dense_index(df.select(column), [F.col(column)], "__k")[0]
    return ranked.where(F.col("__k") == k).first()[column]


def feature_table(inter_path: Path, cfg: FeaturesConfig, spark_cfg: SparkConfig, scratch: Path) -> FeatureTable:
    """`features.feature_table` on Spark: the same table."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark = session(spark_cfg)
    snap = spark.read.parquet(str(inter_path))
    split_source = check_split_settings(cfg, "split" in snap.columns)
    users, items = _codes(snap, "user_id"), _codes(snap, "item_id")
    weight = F.col("weight").cast("float") if "weight" in snap.columns else F.lit(1.0).cast("float")
    df = (snap.join(users.withColumnRenamed("code", "u"), "user_id").join(items.withColumnRenamed("code", "i"), "item_id")
          .select("u", "i", "timestamp", weight.alias("weight"),
                  F.col("split") if "split" in snap.columns else F.lit(None).cast("string").alias("split")))
    n_raw = df.count()
    # De-duplication keeps the largest weight, then the first split name (`order_chronologically`).
    first = Window.partitionBy("u", "i", "timestamp").orderBy(F.col("weight").desc(), F.col("split").asc_nulls_last())
    df = df.withColumn("__n", F.row_number().over(first)).where(F.col("__n") == 1).drop("__n").localCheckpoint()
    n_dedup = df.count()
    df = _k_core(df, cfg.min_user_interactions, cfg.min_item_interactions)
    n_kept = df.count()
    if n_kept == 0:
        raise no_interactions_left()
    log.info("filtering: %d -> %d (exact duplicates) -> %d (k-core) interactions", n_raw, n_dedup, n_kept)

    per_user = Window.partitionBy("u")
    in_order = per_user.orderBy("timestamp", "i")
    if split_source == "leave_one_out":
        from_end = F.row_number().over(per_user.orderBy(F.col("timestamp").desc(), F.col("i").desc()))
        n = F.count(F.lit(1)).over(per_user)
        df = df.withColumn("split", F.when(n < 3, "train").when(from_end == 1, "test").when(from_end == 2, "valid")
                           .otherwise("train"))
    elif split_source == "temporal":
        check_temporal_fractions(cfg.temporal_valid_fraction, cfg.temporal_test_fraction)
        test_cut = _quantile_higher(df, "timestamp", 1 - cfg.temporal_test_fraction)
        valid_cut = _quantile_higher(df, "timestamp", 1 - cfg.temporal_test_fraction - cfg.temporal_valid_fraction)
        df = df.withColumn("split", F.when(F.col("timestamp") >= test_cut, "test")
                           .when(F.col("timestamp") >= valid_cut, "valid").otherwise("train"))
    if cfg.holdout == "inner":  # `features.inner_holdout`
        df = _k_core(df.where(F.col("split") != "test"), cfg.min_user_interactions, cfg.min_item_interactions)
        if df.count() == 0:
            raise no_interactions_left(inner=True)
        is_train = F.col("split") == "train"
        n_train = F.sum(is_train.cast("long")).over(per_user)
        seen = F.sum(is_train.cast("long")).over(in_order.rowsBetween(Window.unboundedPreceding, Window.currentRow))
        last_train = is_train & (seen == n_train)
        evaluated = F.max((F.col("split") == "valid").cast("int")).over(per_user) == 1
        is_valid = F.col("split") == "valid"
        df = df.withColumn("split", F.when(is_valid & (n_train >= 1), "test").when(is_valid, "train")
                           .when(last_train & evaluated & (n_train >= 2), "valid").otherwise(F.col("split")))

    df = df.localCheckpoint()
    n_rows = df.count()
    # Indices in code order among what is left (`features.index_ids`).
    user_idx, n_users = _dense_index(df.select("u").distinct(), [F.col("u")], "user_idx")
    item_idx, n_items = _dense_index(df.select("i").distinct(), [F.col("i")], "item_idx")
    out = df.join(user_idx, "u").join(item_idx, "i").select("user_idx", "item_idx", "timestamp", "weight", "split")
    user_map = user_idx.join(users, user_idx["u"] == users["code"]).select("user_idx", "user_id")
    item_map = item_idx.join(items, item_idx["i"] == items["code"]).select("item_idx", "item_id")
    frames = {}
    try:
        for name, frame, n in (("interactions", out, n_rows), ("user_map", user_map, n_users),
                               ("item_map", item_map, n_items)):
            frames[name] = pl.read_parquet(write_parts(frame, scratch / name, n))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    inter = frames["interactions"].sort("user_idx", "timestamp", "item_idx")
    return FeatureTable(inter, frames["user_map"], frames["item_map"], n_raw, n_dedup, split_source)
