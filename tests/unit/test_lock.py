"""The artifacts folder's lock (flows/lock.py): one pipeline run at a time, held by another
process the way a deployment's flow run holds it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.lock import LOCK_FILE, FolderBusy, folder_lock, holder_of

REPO = Path(__file__).resolve().parents[2]


def hold(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the folder's lock as the `training` flow, for `seconds`."""
    code = (f"import time\nfrom flows.lock import folder_lock\n"
            f"with folder_lock({str(folder)!r}, 'training', 0):\n"
            f"    print('held', flush=True)\n    time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_with_the_holder_named(tmp_path):
    holder = hold(tmp_path, 60)
    try:
        with pytest.raises(FolderBusy, match=f"training run \\(pid {holder.pid}") as busy:
            with folder_lock(tmp_path, "incremental", 0):
                pytest.fail("entered a folder another process holds")
        assert busy.value.holder["pid"] == holder.pid
        start = time.monotonic()
        with pytest.raises(FolderBusy, match="waited 1 s"):
            with folder_lock(tmp_path, "incremental", 1):
                pass
        assert time.monotonic() - start >= 1.0
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_run_enters_when_the_holder_finishes(tmp_path):
    holder = hold(tmp_path, 1.5)
    start = time.monotonic()
    with folder_lock(tmp_path, "training", 30):
        waited = time.monotonic() - start
        assert holder_of(tmp_path)["flow"] == "training" and holder_of(tmp_path)["pid"] != holder.pid
    assert 0.5 < waited < 30
    holder.wait()


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    holder = hold(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # The record of the dead holder is still there; the lock is not.
    assert holder_of(tmp_path)["pid"] == holder.pid
    with folder_lock(tmp_path, "incremental", 0):
        assert holder_of(tmp_path)["flow"] == "incremental"
    assert (tmp_path / LOCK_FILE).exists()


def test_the_same_process_cannot_enter_twice(tmp_path):
    """A flow run inside another must lock another folder (the incremental flow's full retrain
    locks its own root), or it would wait for its parent."""
    with folder_lock(tmp_path, "incremental", 0):
        with pytest.raises(FolderBusy):
            with folder_lock(tmp_path, "training", 0):
                pass
        with folder_lock(tmp_path / "incremental" / "root", "training", 0):
            pass
