"""The `training` Prefect flow: validate -> features -> MF -> item text embeddings -> pre-train
-> fine-tune -> compress -> export -> evaluate -> register.

Each task wraps one component and holds no logic; tasks pass the artifacts folder (paths), never
DataFrames. A task's cache key is the hash of its input files plus its params sections, so an
unchanged step is skipped (its outputs must still be on disk); `force=True` reruns everything.
The BERT stages run as their own processes (Lightning's DDP launcher re-executes the command
line). Flow parameters are params.yaml overrides in `--set` syntax.

    python -m flows.training --set bert.finetune.max_epochs=5
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from components.config import load_params


def _params(params_file: str, overrides: list[str]):
    return load_params(Path(params_file), overrides)


def _hash_paths(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.exists() else []
        for f in files:
            digest.update(str(f.relative_to(root.parent)).encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def _cache_key(inputs: list[str], sections: list[str]) -> Callable[[TaskRunContext, dict], str]:
    """Key = hash(input files, the components' code, params sections). (The flow refreshes
    the cache of a step whose outputs are gone, or of every step under `force`.)"""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        art = Path(parameters["artifacts"])
        params = _params(parameters["params_file"], parameters["overrides"]).to_dict()
        chosen = {s: params[s] for s in sections}
        # The code counts too (sources only: bytecode caches come and go).
        source = sorted((Path(__file__).resolve().parents[1] / "components").rglob("*.py"))
        return hashlib.sha256(json.dumps([
            context.task.name, _hash_paths([art / i for i in inputs]), _hash_paths(source), chosen,
        ], sort_keys=True, default=str).encode()).hexdigest()

    return key


def _component(module: str, artifacts: str, params_file: str, overrides: list[str], *extra: str) -> str:
    """`python -m components.<module>` as its own process; its output is the task's log."""
    cmd = [sys.executable, "-m", f"components.{module}", *extra, "--params", params_file, "--artifacts", artifacts]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"components.{module} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


STAGES: dict[str, dict[str, Any]] = {
    # name: component module, input paths, params sections, outputs (relative to artifacts/)
    "validate": {"module": "validate", "inputs": [], "sections": ["seed", "data", "validation"], "outputs": ["data"]},
    "features": {"module": "features", "inputs": ["data"], "sections": ["features"], "outputs": ["features"]},
    "train_mf": {"module": "train_mf", "inputs": ["features"], "sections": ["seed", "mf"], "outputs": ["mf/factors.npz"]},
    "item_text_embeddings": {"module": "bert.text_embeddings", "inputs": ["features/items.parquet"],
                             "sections": ["bert"], "outputs": ["text_embeddings/embeddings.npy"]},
    "pretrain_bert": {"module": "bert.pretrain", "inputs": ["features", "text_embeddings"], "sections": ["seed", "bert"],
                      "outputs": ["bert/pretrain/model"]},
    "finetune_bert": {"module": "bert.finetune", "inputs": ["features", "text_embeddings", "bert/pretrain/model"],
                      "sections": ["seed", "bert", "evaluation"], "outputs": ["bert/model", "bert/selected_model"]},
    "compress": {"module": "compress", "inputs": ["features", "bert/model", "bert/selected_model"],
                 "sections": ["seed", "bert", "compress", "export"], "outputs": ["compress/report.json"]},
    "export": {"module": "export", "inputs": ["features", "bert/model", "mf/factors.npz", "compress"],
               "sections": ["export"], "outputs": ["bundle/bundle.json"]},
    "evaluate": {"module": "evaluate", "inputs": ["features", "mf/factors.npz", "bert/factors.npz"],
                 "sections": ["evaluation", "fusion"], "outputs": ["eval/metrics.json"]},
}


def _make_task(name: str, spec: dict[str, Any]):
    def run(artifacts: str, params_file: str, overrides: list[str]) -> str:
        return _component(spec["module"], artifacts, params_file, overrides)

    run.__name__ = name
    # Validation re-reads the source every time: the data may have changed under the same path.
    key = None if name == "validate" else _cache_key(spec["inputs"], spec["sections"])
    return task(run, name=name, retries=1 if name in ("validate", "item_text_embeddings") else 0,
                retry_delay_seconds=2, cache_key_fn=key, persist_result=True)


TASKS = {name: _make_task(name, spec) for name, spec in STAGES.items()}


@task(name="register", retries=2, retry_delay_seconds=5)
def register(artifacts: str, params_file: str, overrides: list[str], run_name: str | None) -> dict[str, Any]:
    """Log to MLflow, register the bundle, apply the gate (I/O against the tracking server)."""
    from components.register import log_training_run, register_bundle

    params = _params(params_file, overrides)
    run_id = log_training_run(Path(artifacts), params, run_name, tags={"orchestrator": "prefect"})
    res = register_bundle(Path(artifacts), params, run_id)
    return {"run_id": run_id, "version": res.version, "promoted": res.promoted, "reason": res.reason,
            "model_uri": res.model_uri, "champion_version": res.champion_version}


@flow(name="training", log_prints=True)
def training(overrides: list[str] | None = None, params_file: str = "params.yaml", artifacts: str = "artifacts",
             force: bool = False, run_name: str | None = None) -> dict[str, Any]:
    overrides = list(overrides or [])
    _params(params_file, overrides)  # a bad setting fails here, before any work
    cached = {}
    for name, t in TASKS.items():
        missing = not all((Path(artifacts) / o).exists() for o in STAGES[name]["outputs"])
        if force or missing:  # run, and store the result under the step's key
            t = t.with_options(refresh_cache=True)
        state = t(artifacts, params_file, overrides, return_state=True)
        cached[name] = state.name == "Cached"
        state.result()  # raises when the step failed: nothing downstream runs
    result = register(artifacts, params_file, overrides, run_name)
    metrics = json.loads((Path(artifacts) / "eval" / "metrics.json").read_text())
    create_markdown_artifact(key="training-summary", markdown=summary_markdown(metrics, result, cached),
                             description="Metrics and the promotion gate's decision")
    print(summary_markdown(metrics, result, cached))
    return {**result, "cached": cached}


def summary_markdown(metrics: dict[str, dict[str, float]], result: dict[str, Any], cached: dict[str, bool]) -> str:
    lines = ["# RecForge training run", "", "| model | NDCG@10 | Recall@10 | MRR@10 | coverage@10 |", "|---|---|---|---|---|"]
    for model, row in metrics.items():
        lines.append(f"| {model} | {row['ndcg@10']:.4f} | {row['recall@10']:.4f} | {row['mrr@10']:.4f} | {row['coverage@10']:.4f} |")
    lines += ["", f"Registered **{result['model_uri']}** (MLflow run `{result['run_id']}`).", "",
              f"Gate: {result['reason']}", "", f"Champion: version {result['champion_version']}", "",
              "Skipped (cache hit): " + (", ".join(n for n, c in cached.items() if c) or "none")]
    return "\n".join(lines)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the training flow once.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--force", action="store_true", help="rerun every step, cached or not")
    args = parser.parse_args()
    result = training(args.overrides, args.params, args.artifacts, args.force)
    metrics = json.loads((Path(args.artifacts) / "eval" / "metrics.json").read_text())
    print("\n" + summary_markdown(metrics, result, result["cached"]))
    print(f"\nregistered model: {result['model_uri']} ({'promoted to champion' if result['promoted'] else 'not promoted'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
