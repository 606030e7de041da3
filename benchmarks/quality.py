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
REFERENCE = "mf"  # the baseline the quality targets are ratios to


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


def _bert_variant(*overrides: str) -> Callable[[Params, Path], Trained]:
    """The BERT recommender with `overrides` on top of the dataset's settings (ablations)."""

    def train(params: Params, work: Path) -> Trained:
        from components.bert.text_embeddings import embed_item_texts
        from components.bert.train import finetune, pretrain
        from components.config import apply_overrides, params_from_dict

        p = params_from_dict(apply_overrides(params.to_dict(), list(overrides))) if overrides else params
        name = "bert" + "".join(f"-{o}" for o in overrides).replace("=", "_").replace(".", "_")
        out = work / name
        start = time.perf_counter()
        if "text" in p.bert.mode:
            embed_item_texts(work / "features", work / "text_embeddings", p.bert.text_encoder)
        embed_seconds = time.perf_counter() - start
        pre = pretrain(work / "features", work / "text_embeddings", out / "pretrain", p)
        fine = finetune(work / "features", work / "text_embeddings", out / "pretrain", out, p)
        train_seconds = pre.train_seconds + fine.train_seconds
        extra = {
            "sequences_per_second": fine.sequences_per_second,
            "pretrain_seconds": pre.train_seconds,
            "finetune_seconds": fine.train_seconds,
            "finetune_epochs": float(fine.epochs_run),
            "text_embedding_seconds": embed_seconds,
        }
        return Trained(FactorModel.load(out / "factors.npz"), train_seconds, extra)

    return train


MODELS: dict[str, Callable[[Params, Path], Trained]] = {
    "popularity": _popularity,
    "mf": _mf,
    "bert": _bert_variant(),
    "bert-no-pretrain": _bert_variant("bert.pretrain.enabled=false"),
    "bert-id-only": _bert_variant("bert.mode=id"),
}
# `fused` is built from the trained models named in `fusion.models`, weight tuned on validation.
DERIVED = ("fused",)


def run_dataset(dataset: str, models: list[str], params: Params, work: Path) -> dict[str, dict[str, float]]:
    result = validate(params, work / "validation", work / "data")
    if not result.success:
        raise ValidationFailed(report(result))
    build_features(work / "data", work / "features", params.features)
    trained = {}
    needed = [m for m in models if m not in DERIVED]
    if "fused" in models:
        needed += [m for m in params.fusion.models if m not in needed]
    for name in needed:
        log.info("%s: training %s", dataset, name)
        trained[name] = MODELS[name](params, work)
    factor_models = {n: t.model for n, t in trained.items()}
    if "fused" in models:
        from components.fusion import tune
        from components.evaluate import evaluate_split
        from components.features import load_sequences as _load
        import numpy as np

        seqs = _load(work / "features")
        counts = np.diff(seqs.history_matrix("valid").indptr)
        no_head = np.zeros(seqs.n_items, dtype=bool)
        k = params.evaluation.ks[0]
        start = time.perf_counter()
        fusion = tune(
            *(factor_models[m] for m in params.fusion.models),
            lambda fm: evaluate_split(fm, seqs, "valid", params.evaluation, counts, no_head)[0][f"ndcg@{k}"],
            params.fusion.grid_size,
        )
        factor_models["fused"] = fusion.model
        parts = [trained[m] for m in params.fusion.models]
        trained["fused"] = Trained(
            fusion.model, sum(p.train_seconds for p in parts) + time.perf_counter() - start,
            {"fusion_weight": fusion.weight},
        )
    ev = evaluate(work / "features", {n: factor_models[n] for n in models}, work / "eval", params.evaluation)
    rows = {}
    for name in models:
        t = trained[name]
        row = {k: ev.test[name][k] for k in HEADLINE}
        row.update({f"valid_{k}": ev.valid[name][k] for k in ("ndcg@10", "recall@10")})
        row["train_seconds"] = t.train_seconds
        row.update(t.extra)
        rows[name] = row
    if REFERENCE in factor_models:
        _add_ratios_to_reference(rows, factor_models, work, params)
    return rows


def _add_ratios_to_reference(rows: dict[str, dict[str, float]], models: dict, work: Path, params: Params) -> None:
    """Test NDCG@10 of each model as a ratio to MF's, with a paired-bootstrap 95% interval: a
    target such as "bert >= MF" is met with confidence only when the interval's low end clears it."""
    from components.evaluate import per_user_ndcg
    from components.metrics import paired_bootstrap_ratio

    seqs = load_sequences(work / "features")
    k, batch = 10, params.evaluation.batch_size
    reference = per_user_ndcg(models[REFERENCE], seqs, "test", k, batch)
    for name, row in rows.items():
        if name == REFERENCE:
            continue
        ratio, low, high = paired_bootstrap_ratio(per_user_ndcg(models[name], seqs, "test", k, batch), reference,
                                                  seed=params.seed)
        row.update({"ndcg@10_vs_mf": ratio, "ndcg@10_vs_mf_ci95_low": low, "ndcg@10_vs_mf_ci95_high": high})


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    cols = [*HEADLINE, "train_seconds", "sequences_per_second"]
    lines = ["| dataset | model | " + " | ".join(cols) + " | ndcg@10 / MF [95% CI] |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for dataset, rows in results.items():
        for model, row in rows.items():
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append("" if v is None else f"{v:.4f}" if c in HEADLINE else f"{v:.0f}")
            if "ndcg@10_vs_mf" in row:
                cells.append(f"{row['ndcg@10_vs_mf']:.3f} [{row['ndcg@10_vs_mf_ci95_low']:.3f}, "
                             f"{row['ndcg@10_vs_mf_ci95_high']:.3f}]")
            else:
                cells.append("")
            lines.append(f"| {dataset} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser)
    parser.add_argument("--dataset", default="synthetic", help=f"comma-separated: {', '.join(PRESETS)}")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder (one dataset only)")
    parser.add_argument("--models", default="popularity,mf", help=f"comma-separated: {', '.join([*MODELS, *DERIVED])}")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS and m not in DERIVED]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join([*MODELS, *DERIVED])}")
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
