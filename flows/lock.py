"""One pipeline run at a time on an artifacts folder.

The nightly `training` flow rewrites the folder's stages in place and moves the registry's
aliases; the hourly `incremental` flow reads the champion's folder, builds new roots under it,
prunes old ones and moves the same aliases. Their deployments' concurrency limits are separate
(one per deployment), so at 02:45 an update could read a champion folder that a retrain is
halfway through replacing. Both flows therefore hold an exclusive lock on
`<artifacts>/.pipeline.lock` for their whole run: the training flow waits for an update to finish
(`incremental.lock_wait_seconds`), the incremental flow skips its hour when a retrain holds it
(the next hour takes the same events).

The lock is an OS file lock (`flock`): the kernel drops it when the holding process ends, even
killed, so a crashed run never leaves the folder locked. The file records who holds it, for the
waiting run's message. A flow run inside another one (the incremental flow's full retrain, in a
root below the folder) locks its own root and so never waits for its parent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".pipeline.lock"
# How often a waiting run tries again.
POLL_SECONDS = 2.0


class FolderBusy(RuntimeError):
    """Another run holds the artifacts folder."""

    exit_code = 2  # the CLI prints the message, not a traceback

    def __init__(self, message: str, holder: dict[str, object]):
        super().__init__(message)
        self.holder = holder


def holder_of(artifacts: Path) -> dict[str, object]:
    """Who holds (or last held) the folder's lock: {flow, pid, host, since}; {} when unknown."""
    try:
        return json.loads((Path(artifacts) / LOCK_FILE).read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def describe(holder: dict[str, object]) -> str:
    if not holder:
        return "another run"
    return f"the {holder.get('flow', '?')} run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')})"


@contextmanager
def folder_lock(artifacts: Path | str, flow: str, wait_seconds: float,
                logger: logging.Logger | logging.LoggerAdapter = log) -> Iterator[None]:
    """Hold `<artifacts>/.pipeline.lock` exclusively; wait at most `wait_seconds` for the
    current holder (0: do not wait), then raise FolderBusy naming it. `logger` says that it waits
    (the flow run's logger, so that the wait shows in Prefect's UI)."""
    folder = Path(artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    # Opened without truncating: the holder's record stays readable until this run holds the lock.
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = holder_of(folder)
                if time.monotonic() >= deadline:
                    raise FolderBusy(f"{folder} is in use by {describe(holder)}"
                                     + (f"; waited {wait_seconds:.0f} s" if wait_seconds > 0 else ""), holder) from None
                if not announced:
                    logger.info("%s is in use by %s: waiting up to %.0f s", folder, describe(holder), wait_seconds)
                    announced = True
                time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        record = {"flow": flow, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
