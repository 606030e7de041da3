"""The training flow against a real Prefect server (test harness) and a real MLflow server:
registration, the promotion gate, skipping what is up to date, a failed validation, rollback,
live task logs, concurrent branches, and how runs read in MLflow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration


def task_runs(flow_run_id):
    """{task name: task run} of one flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def task_log_lines(task_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def test_flow_registers_gates_caches_and_rolls_back(services, tmp_path):
    from mlflow import MlflowClient

    from flows.training import training

    uri, folder = services
    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    base = [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
            f"bert.text_encoder.cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}",
            "tracking.model_name=test-model", "gate.latency_budget_ms=1000",
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
    assert "test.bert.ndcg_at_10" in run.data.metrics and run.data.params["mf.factors"] == "16"
    assert {a.path for a in client.list_artifacts(first["run_id"], "bundle")} >= {"bundle/bundle.json", "bundle/sequence.onnx"}
    check_mlflow_run(client, run, first)
    check_live_logs_and_overlap(run.data.tags["prefect.flow_run_id"])

    # Same data, same settings: every stage is up to date, the bundle is byte for byte the
    # champion's, and no new version is registered.
    second = training(base, params_file, art)
    assert all(second["cached"].values()), second["cached"]
    assert second["version"] == 1 and not second["new_version"] and "UNCHANGED" in second["reason"]
    assert len(client.search_model_versions("name='test-model'")) == 1

    # A deliberately worse model (no pre-training, one epoch at a tiny learning rate): registered,
    # not promoted; the champion stays.
    worse = training([*base, "bert.finetune.max_epochs=1", "bert.finetune.lr=1e-7",
                      "bert.refit_epochs=0", "compress.prune.heads=0", "compress.prune.ffn=0"], params_file, art)
    assert worse["version"] == 2 and not worse["promoted"], worse["reason"]
    assert worse["cached"]["features"] and not worse["cached"]["finetune_bert"]
    champion = client.get_model_version_by_alias("test-model", "champion").version
    assert champion == "1"
    v2 = client.get_model_version("test-model", "2")
    assert v2.tags["gate"] == "failed" and "NOT PROMOTED" in v2.description
    assert client.get_model_version_by_alias("test-model", "challenger").version == "2"

    # Corrupted data: the flow fails at validation, nothing is registered, the champion stays.
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"u{u % 30},i{u % 17},{1_600_000_000 + u}" for u in range(300)] + ["u1,ghost,-5"]
    (raw / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    (raw / "items.csv").write_text("item_id,title\n" + "\n".join(f"i{i},Item {i}" for i in range(17)) + "\n")
    with pytest.raises(Exception, match="VALIDATION FAILED"):
        training([*base, "data.source=files", f"data.path={raw}"], params_file, art)
    assert client.get_model_version_by_alias("test-model", "champion").version == champion
    assert len(client.search_model_versions("name='test-model'")) == 2

    # Rollback through the CLI. While a run holds the folder (a retrain could move the alias
    # over the manual move), it is refused by name and nothing moves; then it goes through.
    from flows.lock import folder_lock

    rollback_cli = [sys.executable, "-m", "flows.promotion", "--set", f"tracking.uri={uri}",
                    "--set", "tracking.model_name=test-model", "rollback", "--to-version", "2", "--artifacts", art]
    with folder_lock(art, "training", 0):
        proc = subprocess.run(rollback_cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is in use by the training run" in proc.stderr, proc.stderr[-2000:]
    assert client.get_model_version_by_alias("test-model", "champion").version == champion
    proc = subprocess.run(rollback_cli, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert client.get_model_version_by_alias("test-model", "champion").version == "2"
    # A version the registry does not hold: named with the ones it does, nothing moved.
    proc = subprocess.run([*rollback_cli[:-3], "99", "--artifacts", art], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "test-model has no version 99 to roll back to (its versions are 1, 2)" in proc.stderr
    assert client.get_model_version_by_alias("test-model", "champion").version == "2"


def check_mlflow_run(client, run, result) -> None:
    """How a run reads in MLflow: one metric scheme, settings as params only, plots and the
    table on the parent run, the Prefect flow run's name and link, an ONNX model with a
    signature and an input example."""
    import re

    from mlflow.models import get_model_info

    scheme = re.compile(r"^(test|valid|train|data|serving)\.[a-z0-9_]+\.[a-z0-9_]+$")
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    names = set(run.data.metrics) | {m for child in children for m in child.data.metrics}
    assert names and all(scheme.match(n) for n in names), sorted(n for n in names if not scheme.match(n))
    # Settings the training summary used to log as metrics.
    settings = {"devices", "num_nodes", "refit_epochs", "max_epochs", "patience", "factors", "hidden_size", "max_len"}
    assert not {m.rsplit(".", 1)[-1] for m in names} & settings, "a setting logged as a metric"
    assert {"bert.trainer.devices", "mf.factors"} <= set(run.data.params)
    assert "valid.bert_finetune.ndcg_at_10" in {m for child in children for m in child.data.metrics}
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "metrics_table.json", "bundle"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/recall_at_k.png",
                                                                                  "plots/learning_curve.png"}
    flow_run_name = run.data.tags["prefect.flow_run_name"]
    assert run.info.run_name == flow_run_name
    assert run.data.tags["prefect.flow_run_url"].endswith(f"/flow-run/{run.data.tags['prefect.flow_run_id']}")
    info = get_model_info(f"runs:/{run.info.run_id}/sequence")
    inputs = {spec.name for spec in info.signature.inputs.inputs}
    assert inputs == {"items", "mask", "exclude"} and info.saved_input_example_info is not None


def check_live_logs_and_overlap(flow_run_id) -> None:
    """The fine-tune's per-epoch lines are in its task's log, in order; MF ran while the BERT
    branch did."""
    import re

    runs = task_runs(flow_run_id)
    lines = [m for m in task_log_lines(runs["finetune_bert"].id) if re.search(r"finetune epoch \d+/\d+:", m)]
    epochs = [int(re.search(r"finetune epoch (\d+)/", m).group(1)) for m in lines]
    assert len(epochs) >= 5 and epochs == list(range(1, len(epochs) + 1)), lines[:5]
    mf = runs["train_mf"]
    bert_start = min(runs[n].start_time for n in ("item_text_embeddings", "pretrain_bert", "finetune_bert"))
    bert_end = max(runs[n].end_time for n in ("item_text_embeddings", "pretrain_bert", "finetune_bert"))
    assert mf.start_time < bert_end and bert_start < mf.end_time, "MF and the BERT branch did not overlap"
