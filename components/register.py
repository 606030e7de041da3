"""MLflow tracking, model registration and the champion/challenger promotion gate.

The only module that talks to MLflow; the training components never do.

- `log_training_run`: one MLflow run per pipeline run, with a nested run per stage: every
  parameter (flattened), per-epoch training curves, evaluation metrics for every model and K,
  compression sizes/latencies/choice, artifacts (plots, GE Data Docs, `bundle.json`), the dataset
  fingerprint, the git commit and the package versions.
- `register_bundle`: logs `sequence.onnx` with `mlflow.onnx.log_model` and the whole bundle as
  run artifacts (`bundle/`, what the service downloads), registers a new version of
  `registry.model_name`, gives it the alias `challenger`, then runs the gate.
- `gate` (like TFX's blessing): data validation passed, the bundle's latency within budget, and
  validation NDCG@10 and Recall@10 at least `min_relative_improvement` above the champion's; with
  no champion yet, NDCG@10 above popularity's. A pass moves `champion`; the decision and its
  reason go to the version's tags and description either way.
- `rollback`: `python -m components.register rollback --to-version N` moves `champion` back.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import Params, RegistryConfig, flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri(cfg: RegistryConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(cfg: RegistryConfig):
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


# --------------------------------------------------------------------------------------------
# The gate: a pure function
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    checks: dict[str, bool]


def gate(
    challenger: dict[str, float], champion: dict[str, float] | None, popularity: dict[str, float],
    validation_passed: bool, latency_ms: float, cfg: RegistryConfig,
) -> GateDecision:
    """Metrics are validation `ndcg@10` and `recall@10`."""
    checks: dict[str, bool] = {"data_validation": validation_passed, "latency": latency_ms <= cfg.latency_budget_ms}
    reasons = [
        "data validation passed" if validation_passed else "data validation FAILED",
        f"p50 latency {latency_ms:.2f} ms {'<=' if checks['latency'] else '>'} budget {cfg.latency_budget_ms:g} ms",
    ]
    if champion is None:
        checks["beats_popularity"] = challenger["ndcg@10"] > popularity["ndcg@10"]
        reasons.append(f"no champion yet: NDCG@10 {challenger['ndcg@10']:.4f} "
                       f"{'>' if checks['beats_popularity'] else '<='} popularity {popularity['ndcg@10']:.4f}")
    else:
        factor = 1 + cfg.min_relative_improvement
        for key in ("ndcg@10", "recall@10"):
            ok = challenger[key] >= champion[key] * factor
            checks[key] = ok
            reasons.append(f"{key} {challenger[key]:.4f} {'>=' if ok else '<'} champion {champion[key]:.4f}"
                           + (f" x {factor:g}" if cfg.min_relative_improvement else ""))
    promote = all(checks.values())
    return GateDecision(promote, ("PROMOTED: " if promote else "NOT PROMOTED: ") + "; ".join(reasons), checks)


# --------------------------------------------------------------------------------------------
# Tracking
# --------------------------------------------------------------------------------------------


def git_commit(repo: Path = Path(".")) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _numeric(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in flatten(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _safe_key(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; "@" is not among them.
    return key.replace("@", "_at_")


def log_training_run(artifacts: Path, params: Params, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Log a finished pipeline run (its `artifacts/` folder); returns the MLflow run id."""
    import mlflow

    from components.export import package_versions

    _client(params.registry)
    uri = tracking_uri(params.registry)
    if mlflow.get_experiment_by_name(params.registry.experiment) is None and uri.startswith("sqlite:///"):
        # Without a server, artifacts go beside the database (not into ./mlruns).
        store = Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
        mlflow.create_experiment(params.registry.experiment, artifact_location=store.as_uri())
    mlflow.set_experiment(params.registry.experiment)
    validation = _read_json(artifacts / "validation" / "summary.json") or {}
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({
            "git_commit": git_commit() or "unknown",
            "dataset": params.data.source,
            "dataset_fingerprint": validation.get("fingerprint", "unknown"),
            **{f"version.{k}": v for k, v in package_versions().items()},
            **(tags or {}),
        })
        flat = {k: str(v)[:6000] for k, v in flatten(params.to_dict()).items()}
        items = list(flat.items())
        for lo in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[lo : lo + 100]))

        with mlflow.start_run(run_name="validate", nested=True):
            mlflow.log_metrics({"n_interactions": validation.get("n_interactions", 0),
                                "failed_checks": len(validation.get("failed_checks", [])),
                                "passed": float(bool(validation.get("success")))})
            if (artifacts / "validation" / "data_docs").exists():
                mlflow.log_artifacts(str(artifacts / "validation" / "data_docs"), "data_docs")
        with mlflow.start_run(run_name="features", nested=True):
            mlflow.log_metrics(_numeric(_read_json(artifacts / "features" / "stats.json") or {}))
        with mlflow.start_run(run_name="bert", nested=True):
            for csv_path in (artifacts / "bert" / "pretrain" / "metrics.csv", artifacts / "bert" / "metrics.csv"):
                if csv_path.exists():
                    with csv_path.open() as f:
                        for row in csv.DictReader(f):
                            step = int(row["epoch"])
                            mlflow.log_metrics({f"{row['stage']}.{k}": float(v) for k, v in row.items()
                                                if k not in ("stage", "epoch") and v not in ("", None)}, step=step)
            mlflow.log_metrics(_numeric(_read_json(artifacts / "bert" / "training.json") or {}, "finetune."))
            if (artifacts / "bert" / "learning_curve.png").exists():
                mlflow.log_artifact(str(artifacts / "bert" / "learning_curve.png"))
        compress = _read_json(artifacts / "compress" / "report.json")
        if compress:
            with mlflow.start_run(run_name="compress", nested=True):
                for variant, row in compress["sequence"]["quality_valid"].items():
                    mlflow.log_metrics({_safe_key(f"{variant}.{k}"): v for k, v in _numeric(row).items()})
                if compress.get("text_encoder"):
                    for variant, row in compress["text_encoder"]["variants"].items():
                        mlflow.log_metrics(_numeric(row, f"text.{variant}."))
                mlflow.set_tags({"sequence_variant": compress["sequence"]["variant"],
                                 "sequence_reason": compress["sequence"]["reason"]})
                mlflow.log_dict(compress, "compress_report.json")
        with mlflow.start_run(run_name="evaluate", nested=True):
            for split, name in (("test", "metrics.json"), ("valid", "metrics_valid.json")):
                for model, row in (_read_json(artifacts / "eval" / name) or {}).items():
                    mlflow.log_metrics({_safe_key(f"{split}.{model}.{k}"): v for k, v in _numeric(row).items()})
            if (artifacts / "eval" / "recall_at_k.png").exists():
                mlflow.log_artifact(str(artifacts / "eval" / "recall_at_k.png"))
        # Headline metrics on the parent run, so the runs table compares them at a glance.
        test = _read_json(artifacts / "eval" / "metrics.json") or {}
        valid = _read_json(artifacts / "eval" / "metrics_valid.json") or {}
        for model in test:
            mlflow.log_metrics({f"test_ndcg_at_10.{model}": test[model]["ndcg@10"],
                                f"valid_ndcg_at_10.{model}": valid.get(model, {}).get("ndcg@10", float("nan"))})
        if (artifacts / "bundle" / "bundle.json").exists():
            mlflow.log_artifact(str(artifacts / "bundle" / "bundle.json"))
        return run.info.run_id


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterResult:
    version: int
    promoted: bool
    reason: str
    model_uri: str
    champion_version: int | None


def _version_metrics(version) -> dict[str, float] | None:
    tags = version.tags
    if "valid_ndcg_at_10" not in tags:
        return None
    return {"ndcg@10": float(tags["valid_ndcg_at_10"]), "recall@10": float(tags["valid_recall_at_10"])}


def current_champion(params: Params):
    from mlflow.exceptions import MlflowException

    client = _client(params.registry)
    try:
        return client.get_model_version_by_alias(params.registry.model_name, CHAMPION)
    except MlflowException:
        return None


def register_bundle(artifacts: Path, params: Params, run_id: str) -> RegisterResult:
    """Register the bundle of `artifacts/bundle` under `run_id`, then apply the gate."""
    import mlflow
    import onnx

    client = _client(params.registry)
    bundle = artifacts / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    compress = json.loads((artifacts / "compress" / "report.json").read_text())
    validation = _read_json(artifacts / "validation" / "summary.json") or {}
    popularity = (_read_json(artifacts / "eval" / "metrics_valid.json") or {}).get("popularity", {"ndcg@10": 0.0})
    chosen = compress["sequence"]["variant"]
    quality = compress["sequence"]["quality_valid"][chosen]
    challenger = {"ndcg@10": quality["ndcg@10"], "recall@10": quality["recall@10"]}
    latency = quality["latency_b1"]["p50_ms"]

    name = params.registry.model_name
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(bundle / manifest["sequence"]["file"])), name="sequence",
                                     save_as_external_data=False)
        mlflow.log_artifacts(str(bundle), "bundle")  # the side files the service needs
    version = mlflow.register_model(info.model_uri, name, tags={"run_id": run_id})
    number = int(version.version)
    client.set_registered_model_alias(name, CHALLENGER, number)

    champion = current_champion(params)
    champion_metrics = _version_metrics(champion) if champion is not None else None
    decision = gate(challenger, champion_metrics, popularity, bool(validation.get("success")), latency, params.registry)
    for key, value in {
        "valid_ndcg_at_10": challenger["ndcg@10"], "valid_recall_at_10": challenger["recall@10"],
        "latency_p50_ms_b1": latency, "variant": chosen, "bundle_artifact": f"runs:/{run_id}/bundle",
        "gate": "passed" if decision.promote else "failed", "gate_reason": decision.reason,
        "compared_to": f"version {champion.version}" if champion is not None else "popularity",
        "dataset_fingerprint": validation.get("fingerprint", "unknown"),
    }.items():
        client.set_model_version_tag(name, str(number), key, str(value))
    client.update_model_version(name, str(number), description=decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, number)
    champ = current_champion(params)
    return RegisterResult(number, decision.promote, decision.reason, f"models:/{name}/{number}",
                          int(champ.version) if champ is not None else None)


def rollback(params: Params, to_version: int) -> str:
    client = _client(params.registry)
    name = params.registry.model_name
    client.get_model_version(name, str(to_version))  # fails clearly when it does not exist
    previous = current_champion(params)
    client.set_registered_model_alias(name, CHAMPION, to_version)
    note = f"champion rolled back to version {to_version}" + (f" (was {previous.version})" if previous else "")
    client.set_model_version_tag(name, str(to_version), "rollback", note)
    return note


def main() -> int:
    import argparse

    from components.cli import add_params_arguments, params_from_args

    parser = argparse.ArgumentParser(description="Log, register and gate the bundle; or roll the champion back.")
    add_params_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="log the run in artifacts/, register the bundle, apply the gate")
    reg.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    reg.add_argument("--run-name", default=None)
    back = sub.add_parser("rollback", help="move the champion alias to an earlier version")
    back.add_argument("--to-version", type=int, required=True)
    args = parser.parse_args()
    params = params_from_args(args)
    if args.command == "rollback":
        print(rollback(params, args.to_version))
        return 0
    run_id = log_training_run(args.artifacts, params, args.run_name)
    res = register_bundle(args.artifacts, params, run_id)
    print(f"registered {res.model_uri} (run {run_id}); {res.reason}")
    print(f"champion: version {res.champion_version}")
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
