"""The `training` Prefect flow: the pipeline of `components/pipeline.py`, then MLflow tracking,
registration and the promotion gate.

One task per stage, submitted together: each waits only for the stages that write its inputs, so
MF runs while the text embeddings and the BERT stages do. A stage runs in the flow's process
(its log lines go to its task's log) unless the declaration gives it its own process (the
Lightning stages), whose output is streamed to the task log line by line as it is printed. A
stage whose inputs, settings and code are unchanged since it last ran in this artifacts folder
is skipped (`force=True` reruns everything). Settings are read once: `params.yaml`, the preset
files, then the `--set` overrides.

    python -m flows.training --set bert.finetune.max_epochs=5
    python -m flows.training --params-overrides presets/movielens-100k.yaml
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from components import pipeline
from components.cli import quiet_libraries
from components.config import DEFAULT_PARAMS, Params, load_params
from components.pipeline import Artifacts
from flows.lock import folder_lock

REPO = pipeline.REPO


class _InRunOnly(logging.Filter):
    """Records emitted inside a flow or task run (outside one, Prefect's API handler has no
    run to attach them to)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def forward_component_logs() -> None:
    """The components' own log lines (stages running in this process) go to the log of the task
    that emits them, in the Prefect UI, as they are written."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("components")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_InRunOnly())
        logger.addHandler(handler)


@task(cache_policy=NO_CACHE)
def run_stage(name: str, params: Params, artifacts: str, force: bool) -> pipeline.Outcome:
    """One stage of the declaration; skipped when up to date."""
    return pipeline.run_stage(pipeline.STAGE[name], params, Artifacts(artifacts), force, emit=get_run_logger().info)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(results: dict[str, Any], params: Params, artifacts: str, run_name: str | None,
             tags: dict[str, str], version_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log to MLflow, register the bundle, apply the gate (I/O against the tracking server)."""
    from flows.promotion import register_bundle
    from flows.tracking import log_training_run

    art = Artifacts(artifacts)
    run_id = log_training_run(results, art, params, run_name, tags={"orchestrator": "prefect", **tags})
    res = register_bundle(results, art, params, run_id, version_tags)
    return {"run_id": run_id, "version": res.version, "promoted": res.promoted, "reason": res.reason,
            "model_uri": res.model_uri, "champion_version": res.champion_version, "new_version": res.new_version}


@task(cache_policy=NO_CACHE)
def record_in_dvc(artifacts: str) -> str:
    """A run of the workspace's own settings into its `artifacts/` leaves what `dvc repro` would:
    `dvc.lock` and the DVC cache updated, so `dvc status` stays clean and `dvc checkout` can
    bring these outputs back."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"dvc commit failed (the run itself succeeded): {proc.stderr.strip()[-500:]}"
    return "recorded in dvc.lock (dvc commit)"


def _in_dvc_workspace(artifacts: str, params_file: str, overrides: list[str], params_overrides: list[str]) -> bool:
    return (not overrides and not params_overrides and Path(params_file).resolve() == (REPO / DEFAULT_PARAMS)
            and Path(artifacts).resolve() == (REPO / pipeline.DVC_ROOT).resolve()
            and (REPO / "dvc.yaml").exists() and (REPO / ".dvc").is_dir())


def flow_run_tags() -> tuple[str | None, dict[str, str]]:
    """The Prefect flow run's name and a link to it, for the MLflow run."""
    from prefect.runtime import flow_run

    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    url = flow_run.ui_url
    if url:
        tags["prefect.flow_run_url"] = str(url)
    return flow_run.name, tags


@flow(name="training", task_runner=ThreadPoolTaskRunner(max_workers=4))
def training(overrides: list[str] | None = None, params_file: str = "params.yaml", artifacts: str = "artifacts",
             force: bool = False, run_name: str | None = None,
             params_overrides: list[str] | None = None, version_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """`version_tags`: set on the registered version when it is registered (the incremental
    flow's lineage)."""
    overrides, params_overrides = list(overrides or []), list(params_overrides or [])
    params = load_params(params_file, overrides, [Path(f) for f in params_overrides])  # fails here, before any work
    quiet_libraries()
    forward_component_logs()
    # An incremental update in this folder finishes first (flows/lock.py).
    with folder_lock(artifacts, "training", params.incremental.lock_wait_seconds, get_run_logger()):
        return _train(params, overrides, params_file, artifacts, force, run_name, params_overrides, version_tags)


def _train(params: Params, overrides: list[str], params_file: str, artifacts: str, force: bool, run_name: str | None,
           params_overrides: list[str], version_tags: dict[str, str] | None) -> dict[str, Any]:
    futures: dict[str, Any] = {}
    for stage in pipeline.STAGES:
        futures[stage.name] = run_stage.with_options(
            name=stage.name, retries=stage.retries, retry_delay_seconds=2,
        ).submit(stage.name, params, artifacts, force, wait_for=[futures[u.name] for u in pipeline.upstream(stage)])
    # In declaration order: the first failed stage raises, and nothing that needs it has run.
    outcomes: dict[str, pipeline.Outcome] = {name: f.result() for name, f in futures.items()}
    results = {name: o.result for name, o in outcomes.items()}
    skipped = {name: o.skipped for name, o in outcomes.items()}

    flow_run_name, tags = flow_run_tags()
    result = register(results, params, artifacts, run_name or flow_run_name, tags, version_tags)
    logger = get_run_logger()
    if _in_dvc_workspace(artifacts, params_file, overrides, params_overrides):
        logger.info(record_in_dvc(artifacts))
    summary = summary_markdown(results["evaluate"].test, result, skipped)
    create_markdown_artifact(key="training-summary", markdown=summary,
                             description="Metrics and the promotion gate's decision")
    logger.info("gate: %s", result["reason"])
    return {**result, "cached": skipped}


def summary_markdown(metrics: dict[str, dict[str, float]], result: dict[str, Any], skipped: dict[str, bool]) -> str:
    lines = ["# RecForge training run", "", "| model | NDCG@10 | Recall@10 | MRR@10 | coverage@10 |", "|---|---|---|---|---|"]
    for model, row in metrics.items():
        lines.append(f"| {model} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} | {row['mrr@10']:.4f} | {row['coverage@10']:.4f} |")
    registered = "Registered" if result.get("new_version", True) else "Unchanged"
    lines += ["", f"{registered} **{result['model_uri']}** (MLflow run `{result['run_id']}`).", "",
              f"Gate: {result['reason']}", "", f"Champion: version {result['champion_version']}", "",
              "Skipped (up to date): " + (", ".join(n for n, c in skipped.items() if c) or "none")]
    return "\n".join(lines)


def main() -> int:
    import argparse

    from components.cli import add_params_arguments, run_main

    # Prefect's temporary server (no PREFECT_API_URL) runs on SQLite; its telemetry heartbeat
    # then logs "database is locked" tracebacks that say nothing about the run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(description="Run the training flow once.")
    add_params_arguments(parser)
    parser.add_argument("--force", action="store_true", help="rerun every stage, up to date or not")

    def run() -> int:
        args = parser.parse_args()
        # Bad settings: a one-line error here rather than a failed flow run's traceback.
        load_params(args.params, args.overrides, args.override_files)
        result = training(args.overrides, str(args.params), str(args.artifacts), args.force,
                          params_overrides=[str(f) for f in args.override_files])
        metrics = pipeline.load_result("evaluate", Artifacts(args.artifacts)).test
        print("\n" + summary_markdown(metrics, result, result["cached"]))
        verdict = "promoted to champion" if result["promoted"] else "not promoted"
        print(f"\nregistered model: {result['model_uri']} ({verdict})")
        return 0

    run_main(run)
    return 0


if __name__ == "__main__":
    main()
