"""A real Prefect server for tests: `prefect server start` in a subprocess on a free localhost
port, its own PREFECT_HOME and SQLite database in a temporary folder, all services on (the
scheduler included)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from tests.mlflow_server import free_port, wait_healthy


def prefect_env(folder: Path, api_url: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def prefect_server(folder: Path, scheduler_loop_seconds: int = 60):
    """Yields (api_url, env for clients); the server's log is `folder/server.log`.

    `scheduler_loop_seconds`: how often the scheduler service looks for schedules to fill."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**prefect_env(folder),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(scheduler_loop_seconds)}
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_healthy(f"{api}/health", proc, folder / "server.log")
        yield api, prefect_env(folder, api)
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with `start_new_session=True` and everything it started."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
