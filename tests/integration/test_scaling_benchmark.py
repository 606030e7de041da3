"""`python -m benchmarks.scaling` on two tiny sizes: every data stage in its own process on a
Parquet `files` source, its time and own peak memory, the growth between sizes, and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_scaling_benchmark_measures_every_stage_per_size(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--sizes", "4000,8000", "--engine", "default",
           "--max-users", "50", "--corrupt", "--chunk", "3000", "--set", "validation.batch_rows=1500",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["default"]) == {"4000", "8000"}
    for n, row in result["default"].items():
        corrupted = row.pop("validate_corrupted")
        assert list(row) == ["validate", "features", "train_mf", "evaluate"]
        for stage, measured in row.items():
            assert measured["seconds"] > 0 and measured["peak_rss_mb"] > 50, (n, stage, measured)
        # The corrupted copy (validated in batches of 1,500 rows) is refused by exactly the
        # planted checks, with every planted row counted.
        planted, failed = corrupted["planted"], corrupted["failed_checks"]
        assert corrupted["success"] is False
        assert set(failed) == {"item_id_known", "timestamp_not_too_old", "duplicate_rows"}, failed
        assert failed["item_id_known"]["unexpected_count"] == planted["unknown_items"]
        assert all(e.startswith("unknown-") for e in failed["item_id_known"]["examples"])
        assert failed["timestamp_not_too_old"]["unexpected_count"] == planted["negative_timestamps"]
        # GE counts every row of a duplicated group: the repeat and the row it repeats.
        assert failed["duplicate_rows"]["unexpected_count"] >= 2 * planted["repeated_rows"]
        # Generated 3,000 interactions at a time: several Parquet files of one folder source.
        parts = -(-int(n) // 3000)
        assert result["generation"][n]["files"] == parts
        assert result["generation"][n]["users"] == max(100, int(n) // 20) // parts * parts
        assert result["generation"][n]["items"] == max(50, int(n) // 100)
    assert result["growth"]["4000->8000"]["size_ratio"] == 2.0 and "evaluate" in result["growth"]["4000->8000"]
    # What was run is recorded beside what it measured.
    assert result["settings"]["overrides"] == ["validation.batch_rows=1500"] and result["settings"]["max_users"] == 50
    assert result["settings"]["command"].startswith("python -m benchmarks.scaling --sizes 4000,8000")
    # The evaluation scored the requested sample of users, from the generated source.
    metrics = json.loads((tmp_path / "work" / "default" / "8000" / "eval" / "metrics.json").read_text())
    assert metrics["mf"]["n_users"] == 50 and metrics["mf"]["n_users_eligible"] > 300
    assert out.with_suffix(".png").stat().st_size > 10_000

    # A second call scores what the first trained, on the source it generated.
    again = tmp_path / "again.json"
    proc = subprocess.run([*cmd[:-2], "--out", str(again), "--sizes", "8000", "--stages", "evaluate", "--reuse"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads(again.read_text())
    assert second["generation"]["8000"]["reused"] is True and "reusing the source" in proc.stdout
    assert second["generation"]["8000"]["interactions"] == result["generation"]["8000"]["interactions"]
    assert second["default"]["8000"]["evaluate"]["seconds"] > 0


def test_scaling_benchmark_runs_both_engines_side_by_side(tmp_path):
    """`--engine default,spark`: the same source through both engines' data stages, Spark's
    memory with its JVM's, and the corrupted copy refused alike."""
    from tests.integration.test_spark import require_spark

    require_spark()
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--sizes", "4000", "--engine", "default,spark",
                           "--stages", "validate,features", "--corrupt", "--set", "data.spark.master=local[2]",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    default, spark = result["default"]["4000"], result["spark"]["4000"]
    for stage in ("validate", "features"):
        assert default[stage]["seconds"] > 0 and "jvm_peak_rss_mb" not in default[stage]
        assert spark[stage]["jvm_peak_rss_mb"] > 100 and spark[stage]["peak_rss_mb"] > spark[stage]["jvm_peak_rss_mb"]
    refused = [{check: got["unexpected_count"] for check, got in r["validate_corrupted"]["failed_checks"].items()}
               for r in (default, spark)]  # the same counts (each engine picks its own examples)
    assert refused[0] == refused[1] and set(refused[1]) == {"item_id_known", "timestamp_not_too_old", "duplicate_rows"}
    assert result["parity"]["4000"] == {"same_verdicts": True, "same_verdicts_corrupted": True,
                                        "same_snapshot_rows": True, "differing_feature_files": []}


def test_scaling_benchmark_refuses_bad_arguments(tmp_path):
    for args, message in ((["--sizes", "10"], "at least 1000"), (["--stages", "validate,train"], "unknown stages: train"),
                          (["--engine", "default,duckdb"], "unknown engines duckdb")):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", *args, "--out", str(tmp_path / "x.json")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
