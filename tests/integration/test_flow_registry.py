"""The training flow against a real Prefect server (test harness) and a real MLflow server:
registration, the promotion gate, caching, a failed validation, rollback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    folder = tmp_path_factory.mktemp("services")
    with mlflow_server(folder / "mlflow") as uri, prefect_test_harness(server_startup_timeout=120):
        yield uri, folder


def test_flow_registers_gates_caches_and_rolls_back(services, tmp_path):
    from mlflow import MlflowClient

    from flows.training import training

    uri, folder = services
    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    base = [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
            f"bert.text_encoder.cache_dir={tmp_path / 'cache'}", f"registry.tracking_uri={uri}",
            "registry.model_name=test-model", "registry.latency_budget_ms=1000",
            # Enough training for the tiny model to beat popularity clearly (seconds on this data).
            "bert.pretrain.enabled=false", "bert.finetune.max_epochs=40", "bert.finetune.patience=40",
            "bert.finetune.lr=0.005", "bert.dropout=0.1"]
    art = str(tmp_path / "artifacts")
    params_file = str(REPO / "params.yaml")

    first = training(base, params_file, art)
    assert first["version"] == 1 and first["promoted"], first["reason"]
    assert "no champion yet" in first["reason"] and "> popularity" in first["reason"]
    client = MlflowClient(uri, uri)
    assert client.get_model_version_by_alias("test-model", "champion").version == "1"
    v1 = client.get_model_version("test-model", "1")
    assert v1.tags["gate"] == "passed" and float(v1.tags["valid_ndcg_at_10"]) > 0
    # The run holds the nested stage runs, the curves and the bundle.
    run = client.get_run(first["run_id"])
    assert "test_ndcg_at_10.bert" in run.data.metrics and run.data.params["mf.factors"] == "16"
    assert {a.path for a in client.list_artifacts(first["run_id"], "bundle")} >= {"bundle/bundle.json", "bundle/sequence.onnx"}

    # Same data, same settings: every step after validation is a cache hit.
    second = training(base, params_file, art)
    assert all(second["cached"][s] for s in ("features", "train_mf", "finetune_bert", "compress", "export"))
    assert second["version"] == 2

    # A deliberately worse model (no pre-training, one epoch at a tiny learning rate): registered,
    # not promoted; the champion stays.
    worse = training([*base, "bert.finetune.max_epochs=1", "bert.finetune.lr=1e-7",
                      "bert.refit_epochs=0", "compress.prune.heads=0", "compress.prune.ffn=0"], params_file, art)
    assert worse["version"] == 3 and not worse["promoted"], worse["reason"]
    assert worse["cached"]["features"] and not worse["cached"]["finetune_bert"]
    champion = client.get_model_version_by_alias("test-model", "champion").version
    assert champion in ("1", "2")
    v3 = client.get_model_version("test-model", "3")
    assert v3.tags["gate"] == "failed" and "NOT PROMOTED" in v3.description
    assert client.get_model_version_by_alias("test-model", "challenger").version == "3"

    # Corrupted data: the flow fails at validation, nothing is registered, the champion stays.
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"u{u % 30},i{u % 17},{1_600_000_000 + u}" for u in range(300)] + ["u1,ghost,-5"]
    (raw / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    (raw / "items.csv").write_text("item_id,title\n" + "\n".join(f"i{i},Item {i}" for i in range(17)) + "\n")
    with pytest.raises(Exception, match="validate"):
        training([*base, "data.source=files", f"data.path={raw}"], params_file, art)
    assert client.get_model_version_by_alias("test-model", "champion").version == champion
    assert len(client.search_model_versions("name='test-model'")) == 3

    # Rollback through the CLI.
    proc = subprocess.run(
        [sys.executable, "-m", "components.register", "--set", f"registry.tracking_uri={uri}",
         "--set", "registry.model_name=test-model", "rollback", "--to-version", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert client.get_model_version_by_alias("test-model", "champion").version == "1"


def test_prefect_yaml_deployment_runs_through_a_worker(services, tmp_path):
    """`prefect deploy` of prefect.yaml against the real server, its cron, a run triggered through
    the API and executed by a process worker."""
    import os

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    uri, _ = services
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RECFORGE_HOME": str(REPO)}

    def prefect(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    prefect("work-pool", "create", "recforge-process", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--all")
    listed = prefect("deployment", "ls").stdout
    assert "nightly-retrain" in listed
    inspect = prefect("deployment", "inspect", "training/nightly-retrain").stdout
    assert "0 2 * * *" in inspect

    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    overrides = [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
                 f"bert.text_encoder.cache_dir={tmp_path / 'cache'}", f"registry.tracking_uri={uri}",
                 "registry.model_name=deployed-model", "registry.latency_budget_ms=1000"]
    run = run_deployment("training/nightly-retrain", timeout=0,
                         parameters={"overrides": overrides, "artifacts": str(tmp_path / "artifacts")})
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "recforge-process", "--run-once"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    assert (tmp_path / "artifacts" / "bundle" / "bundle.json").exists()
