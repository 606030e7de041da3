"""Recommendation quality, model by model, on the built-in and the real datasets.

    python -m benchmarks.quality --dataset movielens-100k --models popularity,mf --out q.json

The pipeline (`components/pipeline.py`) trains the models on the dataset's preset
(`presets/<dataset>.yaml`) plus any `--set` overrides; evaluation is the evaluate stage's own
code (full ranking, the fused model's weight tuned on validation). Ablations (`bert-*`) train in
folders of their own. Prints a markdown table and writes `{dataset: {model: {"recall@10",
"ndcg@10", "mrr@10", "coverage@10", "train_seconds", ...}}}`, with each model's test NDCG@10 as
a ratio to MF's and its paired-bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks.common import datasets, names_of, settings_by_dataset, write_json
from components import pipeline
from components.cli import add_params_arguments, run_main
from components.config import Params, apply_overrides, params_from_dict
from components.evaluate import evaluate, load_models, per_user_ndcg
from components.factors import FILE_NAME, FactorModel
from components.pipeline import Artifacts
from components.sequences import Sequences, load_sequences

log = logging.getLogger("benchmarks.quality")

HEADLINE = ("recall@10", "ndcg@10", "mrr@10", "coverage@10")
REFERENCE = "mf"  # the baseline the quality targets are ratios to
# The models the pipeline trains, by the stage that trains them.
TRAINED_BY = {"mf": "train_mf", "bert": "finetune_bert"}
# Ablations: the BERT recommender with these overrides on top of the dataset's settings.
ABLATIONS = {
    # Cloze pre-training is off by default (params.yaml says why); this row turns it on.
    "bert-cloze": ["bert.pretrain.enabled=true"],
    "bert-id-only": ["bert.mode=id"],
}
DERIVED = ("popularity", "fused")


def _train_seconds(name: str, results: dict) -> tuple[float, dict[str, float]]:
    if name == "mf":
        return results["train_mf"].train_seconds, {}
    pre, fine = results["pretrain_bert"], results["finetune_bert"]
    return pre.train_seconds + fine.train_seconds, {
        "sequences_per_second": fine.sequences_per_second, "pretrain_seconds": pre.train_seconds,
        "finetune_seconds": fine.train_seconds, "finetune_epochs": float(fine.epochs_run),
        "text_embedding_seconds": results["item_text_embeddings"].seconds,
    }


def run_dataset(dataset: str, models: list[str], params: Params, work: Path) -> dict[str, dict[str, float]]:
    art = Artifacts(work)
    trained = [m for m in models if m in TRAINED_BY]
    if "fused" in models:
        trained += [m for m in params.fusion.models if m not in trained]
    outcomes = pipeline.run(params, art, until=[TRAINED_BY[m] for m in trained] or "features")
    results = {name: o.result for name, o in outcomes.items()}
    base = [m for m in models if m in TRAINED_BY or m in DERIVED]
    seqs = load_sequences(art.features)
    factor_models = load_models(base, {"mf": art.mf / FILE_NAME, "bert": art.bert / FILE_NAME}, art.features,
                                params.evaluation, params.fusion, art.eval, seqs)
    seconds = {m: _train_seconds(m, results) for m in trained}
    if "popularity" in models:
        seconds["popularity"] = (0.0, {})
    if "fused" in models:
        parts = [seconds[m][0] for m in params.fusion.models]
        weight = json.loads((art.eval / "fusion.json").read_text())["weight"]
        seconds["fused"] = (sum(parts), {"fusion_weight": weight})
    for name in (m for m in models if m in ABLATIONS):
        log.info("%s: training %s", dataset, name)
        variant = params_from_dict(apply_overrides(params.to_dict(), ABLATIONS[name]))
        v_art = Artifacts(work / name)
        v_results = {n: o.result for n, o in pipeline.run(variant, v_art, until="finetune_bert").items()}
        factor_models[name] = FactorModel.load(v_art.bert / FILE_NAME)
        seconds[name] = _train_seconds("bert", v_results)
    ev = evaluate(art.features, {n: factor_models[n] for n in models}, art.eval, params.evaluation, seqs=seqs)
    rows = {}
    for name in models:
        row = {k: ev.test[name][k] for k in HEADLINE}
        row.update({f"valid_{k}": ev.valid[name][k] for k in ("ndcg@10", "recall@10")})
        row["train_seconds"], extra = seconds[name]
        row.update(extra)
        rows[name] = row
    if REFERENCE in factor_models:
        _add_ratios_to_reference(rows, factor_models, seqs, params)
    return rows


def _add_ratios_to_reference(rows: dict[str, dict[str, float]], models: dict, seqs: Sequences, params: Params) -> None:
    """Test NDCG@10 of each model as a ratio to MF's, with a paired-bootstrap 95% interval: a
    target such as "bert >= MF" is met with confidence only when the interval's low end clears it."""
    from components.metrics import paired_bootstrap_ratio

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
    known = [*DERIVED, *TRAINED_BY, *ABLATIONS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--dataset", default="synthetic", help=f"comma-separated: {', '.join(datasets())}")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder (one dataset only)")
    parser.add_argument("--models", default="popularity,mf", help=f"comma-separated: {', '.join(known)}")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    models = names_of(parser, "--models", args.models, known)
    settings = settings_by_dataset(parser, args)

    results: dict[str, dict[str, dict[str, float]]] = {}
    for dataset, params in settings.items():
        results[dataset] = run_dataset(dataset, models, params, args.workdir / dataset)
    print(table(results))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    run_main(main)
