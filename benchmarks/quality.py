"""Recommendation quality, model by model, on the built-in and the real datasets.

    python -m benchmarks.quality --dataset movielens-100k --models popularity,mf --out q.json

Runs the real components (validation, features, training, full-ranking evaluation) with the
dataset's preset (benchmarks/presets.py) plus any `--set` overrides, prints a markdown table and
writes `{dataset: {model: {"recall@10", "ndcg@10", "mrr@10", "coverage@10", "train_seconds", ...}}}`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.presets import PRESETS, overrides_for
from components.cli import add_params_arguments, run_main
from components.config import Params, load_params
from components.evaluate import FactorModel, evaluate, popularity_model
from components.features import build_features, load_sequences
from components.train_mf import train_mf
from components.validate import ValidationFailed, report, validate

log = logging.getLogger("benchmarks.quality")

HEADLINE = ("recall@10", "ndcg@10", "mrr@10", "coverage@10")


@dataclass(frozen=True)
class Trained:
    model: FactorModel
    train_seconds: float
    extra: dict[str, float]


def _popularity(params: Params, work: Path) -> Trained:
    seqs = load_sequences(work / "features")
    start = time.perf_counter()
    model = popularity_model(seqs.history_matrix("valid"), seqs.n_users)
    return Trained(model, time.perf_counter() - start, {})


def _mf(params: Params, work: Path) -> Trained:
    result = train_mf(work / "features", work / "mf", params.mf, params.seed)
    return Trained(FactorModel.load(result.factors_path), result.train_seconds, {})


MODELS: dict[str, Callable[[Params, Path], Trained]] = {"popularity": _popularity, "mf": _mf}


def run_dataset(dataset: str, models: list[str], params: Params, work: Path) -> dict[str, dict[str, float]]:
    result = validate(params, work / "validation", work / "data")
    if not result.success:
        raise ValidationFailed(report(result))
    build_features(work / "data", work / "features", params.features)
    trained = {}
    for name in models:
        log.info("%s: training %s", dataset, name)
        trained[name] = MODELS[name](params, work)
    ev = evaluate(work / "features", {n: t.model for n, t in trained.items()}, work / "eval", params.evaluation)
    rows = {}
    for name, t in trained.items():
        row = {k: ev.test[name][k] for k in HEADLINE}
        row.update({f"valid_{k}": ev.valid[name][k] for k in ("ndcg@10", "recall@10")})
        row["train_seconds"] = t.train_seconds
        row.update(t.extra)
        rows[name] = row
    return rows


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    cols = [*HEADLINE, "train_seconds"]
    lines = ["| dataset | model | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for dataset, rows in results.items():
        for model, row in rows.items():
            cells = [f"{row[c]:.4f}" if c != "train_seconds" else f"{row[c]:.1f}" for c in cols]
            lines.append(f"| {dataset} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser)
    parser.add_argument("--dataset", default="synthetic", help=f"comma-separated: {', '.join(PRESETS)}")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder (one dataset only)")
    parser.add_argument("--models", default="popularity,mf", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.data_dir and len(datasets) > 1:
        parser.error("--data-dir needs a single --dataset")

    results: dict[str, dict[str, dict[str, float]]] = {}
    for dataset in datasets:
        params = load_params(args.params, overrides_for(dataset, args.data_dir) + args.overrides)
        results[dataset] = run_dataset(dataset, models, params, args.workdir / dataset)
    print(table(results))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    run_main(main)
