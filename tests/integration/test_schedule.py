"""The nightly schedule as users get it: `prefect deploy` of prefect.yaml against a real Prefect
server, a process worker, and a flow run that the server's scheduler created (nobody triggered
it). It caught SQLAlchemy 2.1 breaking Prefect 3.8.8's scheduler, which made every scheduled
run silently never exist."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY
from tests.prefect_server import prefect_server, stop

pytestmark = pytest.mark.integration


def prefect(env: dict[str, str], *args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def deployment_runs(api: str, name: str):
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ.pop("PREFECT_API_URL", None)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))


def deployment_limit(api: str, name: str) -> tuple[int | None, str | None]:
    import os

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ.pop("PREFECT_API_URL", None)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        d = client.read_deployment_by_name(name)
        limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else None
        return limit, d.concurrency_options.collision_strategy.value if d.concurrency_options else None


def test_the_nightly_deployment_runs_on_its_schedule(tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == "nightly-retrain")
    assert deployment["schedules"][0]["cron"] == "0 2 * * *"
    # The same deployment every minute, on tiny settings, writing under tmp_path.
    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    deployment["schedules"] = [{"cron": "* * * * *", "timezone": "UTC"}]
    deployment["parameters"] = {
        **deployment["parameters"],
        "artifacts": str(tmp_path / "artifacts"),
        "overrides": [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
                      f"bert.text_encoder.cache_dir={tmp_path / 'cache'}",
                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "gate.latency_budget_ms=1000"],
    }
    monitor = next(d for d in spec["deployments"] if d["name"] == "hourly-monitor")
    assert monitor["schedules"][0]["cron"] == "15 * * * *"
    monitor["schedules"] = []  # deployed (and checked) here, but not run: it has no service to watch
    hourly = next(d for d in spec["deployments"] if d["name"] == "hourly-incremental")
    assert hourly["schedules"][0]["cron"] == "45 * * * *"
    # Every minute too, on the same registry and an empty event store: its scheduled runs find no
    # champion, or no new events, and say so.
    hourly["schedules"] = [{"cron": "* * * * *", "timezone": "UTC"}]
    hourly["parameters"] = {**hourly["parameters"], "artifacts": str(tmp_path / "artifacts"),
                            "overrides": [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                          f"online.db={tmp_path / 'events.db'}"]}
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    with prefect_server(tmp_path / "prefect", scheduler_loop_seconds=5) as (api, env):
        env.pop("RECFORGE_HOME", None)
        prefect(env, "work-pool", "create", "recforge-process", "--type", "process")

        # RECFORGE_HOME naming something that is not a checkout: refused at deploy time, with a
        # message, instead of a deployment whose every run crashes.
        refused = prefect({**env, "RECFORGE_HOME": str(tmp_path)}, "--no-prompt", "deploy", "--all",
                          "--prefect-file", str(prefect_file), check=False)
        assert refused.returncode != 0
        assert "is not a RecForge checkout" in refused.stdout + refused.stderr

        # Deployed from the checkout, RECFORGE_HOME unset: runs execute in this checkout.
        prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
        assert deployment_limit(api, "training/nightly-retrain") == (1, "CANCEL_NEW")
        assert deployment_limit(api, "monitor/hourly-monitor") == (1, "CANCEL_NEW")
        assert deployment_limit(api, "incremental/hourly-incremental") == (1, "CANCEL_NEW")
        log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "recforge-process"],
                                  cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 420
            done = hourly_done = None
            while time.time() < deadline and (done is None or hourly_done is None):
                runs = deployment_runs(api, "nightly-retrain")
                hourly_runs = deployment_runs(api, "hourly-incremental")
                bad = [r for r in runs + hourly_runs if r.state and r.state.type.value in ("FAILED", "CRASHED")]
                assert not bad, f"{bad[0].state}\n{(tmp_path / 'worker.log').read_text()[-4000:]}"
                # Minute runs outlast a minute: the deployment's limit keeps them from sharing
                # the artifacts folder (it was two runs at once that broke an export).
                running = [r for r in runs if r.state and r.state.type.value == "RUNNING"]
                assert len(running) <= 1, f"{len(running)} runs at once"
                done = next((r for r in runs if r.state and r.state.is_completed()), None)
                hourly_done = next((r for r in hourly_runs if r.state and r.state.is_completed()), None)
                time.sleep(3)
        finally:
            stop(worker)
            log.close()
        server_log = (tmp_path / "prefect" / "server.log").read_text()
    assert done is not None, f"no scheduled run completed:\n{server_log[-3000:]}\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
    assert done.auto_scheduled, "the run must come from the schedule, not from a trigger"
    assert hourly_done is not None and hourly_done.auto_scheduled, "no scheduled incremental run completed"
    assert "Can't evaluate bulk DML" not in server_log
    assert (tmp_path / "artifacts" / "bundle" / "bundle.json").exists()
