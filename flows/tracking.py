"""MLflow tracking of a pipeline run: what the training flow logs, and how it is named.

Metric names follow one scheme, `<scope>.<subject>.<measure>`, with `@k` written `_at_k`
(MLflow's names have no "@"):

| scope | subject | examples |
|---|---|---|
| `test`, `valid` | a model (`popularity`, `mf`, `bert`, `fused`) or a compressed variant | `test.bert.ndcg_at_10`, `valid.onnx_int8.recall_at_10`, `test.bert.short_history_ndcg_at_10` |
| `train` | a training stage (`mf`, `bert_pretrain`, `bert_finetune`) | `train.bert_finetune.loss` (per epoch), `train.bert_finetune.seconds` |
| `data` | `validation`, `features` | `data.features.n_users`, `data.validation.failed_checks` |
| `serving` | a compressed variant or the bundle | `serving.onnx_int8.size_mb`, `serving.onnx_int8.latency_p50_ms` |

Settings are params only (`params.yaml` flattened: `bert.max_len`), never metrics. The parent
run holds the headline metrics, the plots and the metrics table; one nested run per stage holds
its details. The run is named after the Prefect flow run and tagged with its URL.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from typing import Any

from components.config import Params, TrackingConfig, flatten
from components.pipeline import Artifacts

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
STAGE_CURVES = {"pretrain_bert": ("bert_pretrain", "pretrain_epochs"), "finetune_bert": ("bert_finetune", "finetune_epochs")}


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client(cfg: TrackingConfig):
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def metric_name(scope: str, subject: str, measure: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; "@" is not among them.
    return f"{scope}.{subject}.{measure.replace('@', '_at_').replace('/', '_')}"


def git_commit(repo: Path = Path(".")) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _numbers(scope: str, subject: str, values: dict[str, Any]) -> dict[str, float]:
    return {metric_name(scope, subject, k): float(v) for k, v in flatten(values).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def model_metrics(split: str, rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every model's metrics of one split (`test.bert.ndcg_at_10`)."""
    return {k: v for model, row in rows.items() for k, v in _numbers(split, model, row).items()}


def metrics_table(results: dict[str, Any]) -> dict[str, list]:
    """The headline metrics, one row per model and split (MLflow's table view)."""
    ev = results["evaluate"]
    columns: dict[str, list] = {"split": [], "model": []}
    for split, rows in (("test", ev.test), ("valid", ev.valid)):
        for model, row in rows.items():
            columns["split"].append(split)
            columns["model"].append(model)
            for k in ev.ks:
                for m in ("ndcg", "recall", "mrr", "coverage"):
                    columns.setdefault(f"{m}@{k}", []).append(row.get(f"{m}@{k}"))
    return columns


def use_experiment(cfg: TrackingConfig) -> None:
    """Point MLflow at the tracking server and the experiment, creating it when missing."""
    import mlflow

    client(cfg)
    uri = tracking_uri(cfg)
    if mlflow.get_experiment_by_name(cfg.experiment) is None and uri.startswith("sqlite:///"):
        # Without a server, artifacts go beside the database (not into ./mlruns).
        store = Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
        mlflow.create_experiment(cfg.experiment, artifact_location=store.as_uri())
    mlflow.set_experiment(cfg.experiment)


def log_training_run(results: dict[str, Any], art: Artifacts, params: Params, run_name: str | None = None,
                     tags: dict[str, str] | None = None) -> str:
    """Log a finished pipeline run from its stages' results; returns the MLflow run id."""
    import mlflow

    from components.export import package_versions

    use_experiment(params.tracking)
    validation = results["validate"]
    evaluation = results["evaluate"]
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({
            "git_commit": git_commit() or "unknown",
            "dataset": params.data.source,
            "dataset_fingerprint": validation.fingerprint or "unknown",
            **{f"version.{k}": v for k, v in package_versions().items()},
            **(tags or {}),
        })
        items = [(k, str(v)[:6000]) for k, v in flatten(params.to_dict()).items()]
        for lo in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[lo : lo + 100]))

        # The parent run: what a runs table compares, the plots, the table.
        mlflow.log_metrics({**model_metrics("test", evaluation.test), **model_metrics("valid", evaluation.valid)})
        mlflow.log_table(metrics_table(results), artifact_file="metrics_table.json")
        for plot in (art.bert / "learning_curve.png", art.eval / "recall_at_k.png"):
            if plot.exists():
                mlflow.log_artifact(str(plot), "plots")

        with mlflow.start_run(run_name="validate", nested=True):
            mlflow.log_metrics(_numbers("data", "validation", validation.metrics()))
            if (art.validation / "data_docs").exists():
                mlflow.log_artifacts(str(art.validation / "data_docs"), "data_docs")
        with mlflow.start_run(run_name="features", nested=True):
            mlflow.log_metrics(_numbers("data", "features", results["features"].metrics()))
        with mlflow.start_run(run_name="train_mf", nested=True):
            mlflow.log_metrics({metric_name("train", "mf", "seconds"): results["train_mf"].train_seconds})
        with mlflow.start_run(run_name="bert", nested=True):
            for stage, (subject, curve) in STAGE_CURVES.items():
                res = results[stage]
                if res.skipped:
                    continue
                mlflow.log_metrics({metric_name("train", subject, "seconds"): res.train_seconds,
                                    metric_name("train", subject, "epochs"): res.epochs_run,
                                    metric_name("train", subject, "best_epoch"): res.best_epoch or 0,
                                    metric_name("train", subject, "sequences_per_second"): res.sequences_per_second})
                _log_epochs(art.path(curve), subject)
            if (art.bert / "learning_curve.png").exists():
                mlflow.log_artifact(str(art.bert / "learning_curve.png"))
        compress = results["compress"]
        with mlflow.start_run(run_name="compress", nested=True):
            for variant, row in compress.quality_valid.items():
                mlflow.log_metrics({
                    metric_name("valid", variant, "ndcg@10"): row["ndcg@10"],
                    metric_name("valid", variant, "recall@10"): row["recall@10"],
                    metric_name("valid", variant, "top10_overlap"): row["top10_overlap"],
                    metric_name("serving", variant, "size_mb"): row["size_mb"],
                    metric_name("serving", variant, "latency_p50_ms"): row["latency_b1"]["p50_ms"],
                    metric_name("serving", variant, "latency_p99_ms"): row["latency_b1"]["p99_ms"],
                })
            mlflow.set_tags({"sequence_variant": compress.sequence_variant, "sequence_reason": compress.reason})
            if (art.compress / "report.json").exists():
                mlflow.log_artifact(str(art.compress / "report.json"))
        with mlflow.start_run(run_name="evaluate", nested=True):
            for split, path in (("test", evaluation.metrics_path), ("valid", evaluation.valid_metrics_path)):
                mlflow.log_metrics(model_metrics(split, evaluation.test if split == "test" else evaluation.valid))
                mlflow.log_artifact(str(path))
            for extra in (art.eval / "recall_at_k.png", art.eval / "fusion.json"):
                if extra.exists():
                    mlflow.log_artifact(str(extra))
        bundle = results["export"]
        mlflow.log_metrics({metric_name("serving", "bundle", "size_mb"): bundle.size_mb})
        mlflow.set_tag("bundle_sha256", bundle.bundle_sha256)
        return run.info.run_id


def _log_epochs(path: Path, subject: str) -> None:
    """The per-epoch log as step-indexed metrics (the curves in MLflow's charts)."""
    import mlflow

    if not path.exists():
        return
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(row["epoch"])
            values = {
                metric_name("train", subject, "loss"): row["train_loss"],
                metric_name("train", subject, "lr"): row["lr"],
                metric_name("train", subject, "epoch_seconds"): row["epoch_seconds"],
                metric_name("valid", subject, "ndcg@10"): row["val_ndcg10"],
                metric_name("valid", subject, "recall@10"): row["val_recall10"],
            }
            mlflow.log_metrics({k: float(v) for k, v in values.items() if v not in ("", None, "nan")}, step=step)
