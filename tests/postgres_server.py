"""A real PostgreSQL server for tests: `initdb` into a temporary folder and `pg_ctl start` on a
free localhost port (as the `postgres` user when the tests run as root: the server refuses
root). `make install` installs Debian's package where it can; elsewhere the tests skip, except
in CI (`CI=true`), where a missing server is a failure."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mlflow_server import free_port

HOW = "install PostgreSQL (Debian: apt-get install postgresql; macOS: brew install postgresql)"


def bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_postgres() -> Path:
    where = bin_dir()
    if where is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is missing on CI: {HOW} (make install does it as root)")
        pytest.skip(f"PostgreSQL is not installed: {HOW}")
    return where


@contextmanager
def postgres_server():
    """Yields a `postgresql://` URL to an empty database `recforge`."""
    binaries = require_postgres()
    # Not under pytest's tmp_path: its folders are private to root, and the server runs as
    # `postgres` when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="recforge-pg-"))
    data, sockets, log = folder / "data", folder / "sockets", folder / "server.log"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in (folder, sockets):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    port = free_port()
    run(str(binaries / "initdb"), "-D", str(data), "-U", "recforge", "-A", "trust", "--no-sync", "-E", "UTF8")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "recforge", "recforge")
        yield f"postgresql://recforge@127.0.0.1:{port}/recforge"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
