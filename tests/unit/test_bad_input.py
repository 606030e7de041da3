"""Bad input to the entry points: a one-line error and exit 2, never a traceback, and nothing
created or started. Each case was found by trying the commands by hand (2026-11-29)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from components.config import ParamsError, load_params
from serving.store import EventStore, not_a_store
from tests.conftest import REPO


def refused(*args: str, timeout: int = 120) -> str:
    """Run `python -m ARGS`: it must exit 2 without a traceback; its stderr."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    return proc.stderr


def test_unreadable_params_files_are_named_on_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases = [(bad, r"bad.yaml: not valid YAML \(expected the node content, but found '<stream end>' at line 2, column 1\)"),
             (binary, r"binary.yaml: not UTF-8 text \(invalid start byte at byte 0\)"),
             (tmp_path, r"a folder, not a params file")]
    for path, message in cases:
        with pytest.raises(ParamsError, match=message):
            load_params(path)
        with pytest.raises(ParamsError, match=message):
            load_params(REPO / "params.yaml", [], [path])
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", ["mf.factors=[1"])
    assert "\n" not in str(err.value) and "expected ',' or ']'" in str(err.value)


def test_a_store_reader_opens_the_services_store_and_nothing_else(tmp_path):
    """Opening a store creates its tables: a reader checks first, so a mistyped path, an empty
    file or another database is refused, and left as it was."""
    junk, empty, other = tmp_path / "junk.db", tmp_path / "empty.db", tmp_path / "other.db"
    junk.write_bytes(b"junk")
    empty.touch()
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE x (a)")
    assert not_a_store(tmp_path / "none.db") == f"{tmp_path / 'none.db'} does not exist"
    assert "is a folder" in not_a_store(tmp_path)
    assert "is not a SQLite database" in not_a_store(junk)
    assert not_a_store(empty).endswith("holds no events table: not the service's event store (it is empty)")
    assert not_a_store(other).endswith("holds no events table: not the service's event store")
    assert empty.stat().st_size == 0
    store = EventStore(tmp_path / "events.db")
    assert not_a_store(tmp_path / "events.db") is None  # while the service holds it open
    store.close()
    assert not_a_store(tmp_path / "events.db") is None and not_a_store("postgresql://h/db") is None
    assert "holds no events table" in refused("serving.online", "--db", str(empty))
    assert "is not a SQLite database" in refused("serving.store", "export", "--db", str(junk), "--out",
                                                 str(tmp_path / "o.csv"))
    assert f"no folder {tmp_path / 'no'} to write it in" in refused(
        "serving.store", "export", "--db", str(tmp_path / "events.db"), "--out", str(tmp_path / "no" / "o.csv"))
    assert empty.stat().st_size == 0


def test_arguments_refused_before_any_work(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.touch()
    assert f"argument --artifacts: {a_file} is not a folder (a file)" in refused(
        "components.train_mf", "--artifacts", str(a_file))
    assert "argument --until: invalid choice: 'bogus'" in refused("components.pipeline", "run", "--until", "bogus")
    assert "--dataset: unknown bogus; choose from synthetic" in refused(
        "benchmarks.quality", "--dataset", "synthetic,bogus", "--out", str(tmp_path / "q.json"))
    assert "--dataset: unknown (none given)" in refused("benchmarks.quality", "--dataset", "", "--out", str(tmp_path / "q.json"))
    assert "--space: search space file not found" in refused(
        "benchmarks.tune", "--space", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "t.json"))
    assert not (tmp_path / "q.json").exists() and not (tmp_path / "t.json").exists()
    assert "--bundle " + str(tmp_path) + ": not a bundle (no bundle.json)" in refused("serving.app", "--bundle", str(tmp_path))
    missing = tmp_path / "missing"
    assert "no such folder" in refused("flows.incremental", "--artifacts", str(missing))
    assert not missing.exists()  # the flow's folder lock never made it
    assert "--since: 'bogus' is not a time" in refused(
        "flows.promotion", "online", "--since", "bogus", "--artifacts", str(tmp_path))
    assert "--datasets: unknown bogus" in refused("benchmarks.gpu", "export", "--datasets", "movielens-100k,bogus",
                                                  "--out", str(missing))
    assert not missing.exists()


def test_the_schedule_refuses_a_bad_cron_or_bad_settings_before_serving():
    """It used to start serving either way: bad settings would have failed at 02:00."""
    assert "--cron 'bogus cron': not a cron schedule" in refused("flows.schedule", "--cron", "bogus cron")
    assert "unknown key mf.factorz" in refused("flows.schedule", "--set", "mf.factorz=3")
