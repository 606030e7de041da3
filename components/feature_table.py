"""What both feature engines share (`features.py`, the default; `spark_features.py`): the table
an engine hands the file writer, the id-order rule and the checks of the split settings."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from components.config import FeaturesConfig, ParamsError

# An id that sorts as a number: ASCII digits only, which both engines' casts read (\A and \z
# mean the same in Rust's and Java's regexes; Java's `$` also matches before a final newline).
NUMERIC_ID = r"\A[0-9]{1,18}\z"


@dataclass(frozen=True)
class FeatureTable:
    """What an engine hands the file writer: the filtered, split, indexed interactions sorted by
    (user_idx, timestamp, item_idx), and the two maps (index -> id)."""

    interactions: pl.DataFrame  # user_idx, item_idx, timestamp, weight, split
    user_map: pl.DataFrame  # user_idx, user_id
    item_map: pl.DataFrame  # item_idx, item_id
    n_raw: int
    n_dedup: int
    split_source: str

    def canonical(self) -> "FeatureTable":
        """The same table with the writer's column types and order (engines differ in them)."""
        frame = self.interactions.select(
            pl.col("user_idx").cast(pl.Int32), pl.col("item_idx").cast(pl.Int32), pl.col("timestamp").cast(pl.Int64),
            pl.col("weight").cast(pl.Float32), pl.col("split").cast(pl.Utf8),
        )
        users = self.user_map.select(pl.col("user_idx").cast(pl.Int32), pl.col("user_id").cast(pl.Utf8)).sort("user_idx")
        items = self.item_map.select(pl.col("item_idx").cast(pl.Int32), pl.col("item_id").cast(pl.Utf8)).sort("item_idx")
        return FeatureTable(frame, users, items, self.n_raw, self.n_dedup, self.split_source)


def check_split_settings(cfg: FeaturesConfig, has_split: bool) -> str:
    """The split the settings ask for given whether the source publishes one (its name), or the
    error for a combination that cannot work. The errors here are the settings' (ParamsError): a
    CLI prints them and exits 2, no traceback."""
    split_source = "source" if has_split else cfg.split
    if cfg.holdout == "inner" and split_source == "temporal":
        raise ParamsError(
            "features.holdout=inner needs a per-user split (leave_one_out or the source's); "
            "with split=temporal, move temporal_valid_fraction / temporal_test_fraction instead"
        )
    return split_source


def no_interactions_left(inner: bool = False) -> ParamsError:
    if inner:  # k-core may be off: dropping the test interactions alone can leave nothing
        return ParamsError("features.holdout=inner: nothing is left once the test interactions are dropped and "
                          "k-core filtering runs again; lower features.min_user_interactions / "
                          "features.min_item_interactions, or score on the test split")
    return ParamsError("k-core filtering removed every interaction; lower features.min_user_interactions / "
                      "features.min_item_interactions")


def check_temporal_fractions(valid_fraction: float, test_fraction: float) -> None:
    if not (0 < test_fraction < 1 and 0 <= valid_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ParamsError(f"features.temporal_test_fraction ({test_fraction}) must be in (0, 1), "
                          f"features.temporal_valid_fraction ({valid_fraction}) in [0, 1), and their sum below 1")
