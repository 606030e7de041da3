"""Fine-tuning speed of the sequence recommender, recipe by recipe, side by side in one run.

    python -m benchmarks.training_speed --dataset movielens-100k,amazon-scientific --out X.json

For each dataset the pipeline's own validation, features and item text embeddings run first
(cached in `--workdir`); then the product's training module and data module
(`benchmarks.gpu.throughput`: `SeqRecModule`, `SequenceDataModule`, no validation) take one
warm-up epoch and `--epochs` timed epochs under each variant of `--variants` (or
`--warmup-steps` and `--steps` steps: the text-tower variants take many seconds a step). The variants are
interleaved `--repeats` times and each keeps its median, so a drift in the machine's speed
falls on all of them alike. Speed-ups are ratios to the first variant. What a variant does to
quality is not measured here: that takes whole trainings on several seeds (`benchmarks.quality`
on the inner split; benchmarks/README.md "CPU fine-tuning speed").
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import datasets, names_of, save, settings_by_dataset
from components.cli import add_params_arguments, run_main

log = logging.getLogger("benchmarks.training_speed")

# Each variant: the overrides it lays over the dataset's settings (`bert` is the dataset's own
# section, for settings defined relative to it).
def _recipe(packed: bool, buckets: int, compiled: bool = False, attention_dropout: float | None = None):
    """Overrides of one variant; `attention_dropout` None: the dataset's `dropout`, as before the
    two were separate settings."""
    def overrides(bert) -> list[str]:
        rate = bert.dropout if attention_dropout is None else attention_dropout
        return [f"bert.attention_dropout={rate}", f"bert.bucket_batches={buckets}",
                f"bert.trainer.packed_dropout={str(packed).lower()}", f"bert.trainer.compile={str(compiled).lower()}"]
    return overrides


VARIANTS: dict[str, Callable[[Any], list[str]]] = {
    # The recipe before this benchmark: torch's dropout, on the attention weights at the rate of
    # the rest, every batch padded to its longest history drawn from a plain shuffle.
    "before": _recipe(packed=False, buckets=0),
    "packed-dropout": _recipe(packed=True, buckets=0),
    "buckets": _recipe(packed=False, buckets=4),
    "packed+buckets": _recipe(packed=True, buckets=4),
    # Compiled, the encoder's dropout is drawn in the generated code (packing applies to eager only).
    "buckets+compile": _recipe(packed=False, buckets=4, compiled=True),
    # No dropout on the attention weights at all (what is learned changes: rejected on quality).
    "no-attention-dropout+buckets": _recipe(packed=False, buckets=4, attention_dropout=0.0),
}
# Training recipes: the variants run by default.
RECIPES = list(VARIANTS)


def _text(finetune_layers: int, cached: bool = True):
    """Overrides for items with text (text+id where the dataset uses ids alone): the text
    encoder frozen, or its top layers fine-tuned with the frozen ones recomputed every step or
    cached once."""
    def overrides(bert) -> list[str]:
        mode = bert.mode if "text" in bert.mode else "text+id"
        return [f"bert.mode={mode}", f"bert.text_encoder.finetune_layers={finetune_layers}",
                f"bert.text_encoder.cache_frozen={str(cached).lower()}"]
    return overrides


VARIANTS["text-tower"] = _text(1, cached=False)
VARIANTS["text-tower-cached"] = _text(1, cached=True)
# What the tower costs: the same items with the frozen embeddings alone.
VARIANTS["text-frozen"] = _text(0)


def _batches_per_epoch(features: Path, params) -> int:
    from components.bert.data import SequenceDataModule

    dm = SequenceDataModule(features, params.bert.max_len, params.bert.batch_size, "next", validate=False)
    dm.setup()
    return math.ceil(len(dm.train_sequences) / params.bert.batch_size)


def measure(dataset: str, params, variants: list[str], epochs: int, repeats: int, work: Path,
            steps: int | None = None, warmup: int | None = None) -> dict[str, Any]:
    """`steps` / `warmup`: timed and warm-up steps per variant (default: `epochs` epochs after
    one epoch)."""
    from benchmarks.gpu import throughput
    from components import pipeline
    from components.config import apply_overrides, params_from_dict
    from components.pipeline import Artifacts

    art = Artifacts(work / dataset)
    pipeline.run(params, art, until="item_text_embeddings")
    batches = _batches_per_epoch(art.features, params)
    steps = epochs * batches if steps is None else steps
    warmup = batches if warmup is None else warmup
    settings = {name: VARIANTS[name](params.bert) for name in variants}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name in variants:
            # On the CPU even where a GPU is there: the product's CPU path is what this measures.
            variant = params_from_dict(apply_overrides(params.to_dict(), [*settings[name], "bert.trainer.accelerator=cpu"]))
            row = throughput(art.features, variant, "cpu", steps=steps, warmup=warmup,
                             embeddings=art.text_embeddings / "embeddings.npy")
            runs[name].append(row)
            log.info("%s %s (%d/%d): %.0f sequences/s, %.0f ms a step", dataset, name, repeat + 1, repeats,
                     row["sequences_per_second"], row["step_ms"])
    first = variants[0]
    rows: dict[str, Any] = {}
    for name in variants:
        speeds = [r["sequences_per_second"] for r in runs[name]]
        rows[name] = {"overrides": settings[name], "sequences_per_second": round(statistics.median(speeds), 1),
                      "runs_sequences_per_second": speeds,
                      "step_ms": round(statistics.median(r["step_ms"] for r in runs[name]), 2),
                      "graphs": runs[name][-1]["graphs"], "graph_breaks": runs[name][-1]["graph_breaks"]}
        if "text_cache_seconds" in runs[name][-1]:
            rows[name]["text_cache_seconds"] = [r["text_cache_seconds"] for r in runs[name]]
    for name in variants:
        rows[name][f"speedup_vs_{first}"] = round(rows[name]["sequences_per_second"] / rows[first]["sequences_per_second"], 3)
    return {"batches_per_epoch": batches, "timed_steps": steps, "warmup_steps": warmup,
            "model": {k: getattr(params.bert, k) for k in ("mode", "hidden_size", "num_layers", "max_len",
                                                             "batch_size", "dropout", "loss")},
            "variants": rows}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], names):
        rows = out["datasets"][dataset]["variants"]
        labels = list(rows)
        speeds = [rows[v]["sequences_per_second"] for v in labels]
        bars = ax.barh(labels, speeds, color="tab:blue")
        for bar, v in zip(bars, labels):
            ratio = next(value for key, value in rows[v].items() if key.startswith("speedup_vs_"))
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratio:.2f}x", va="center")
        ax.invert_yaxis()
        ax.set_xlabel("training sequences / s")
        ax.set_title(f"{dataset} (max_len {out['datasets'][dataset]['model']['max_len']})")
        ax.set_xlim(0, max(speeds) * 1.25)
    fig.suptitle(f"Fine-tuning throughput, {out['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--dataset", default="movielens-100k", help=f"comma-separated: {', '.join(datasets())}")
    parser.add_argument("--variants", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant, after one warm-up epoch")
    parser.add_argument("--steps", type=int, help="timed steps per variant instead of --epochs epochs")
    parser.add_argument("--warmup-steps", type=int, help="warm-up steps per variant (default: one epoch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/training-speed"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    variants = names_of(parser, "--variants", args.variants, VARIANTS)
    if min(args.epochs, args.repeats, *(n for n in (args.steps, args.warmup_steps) if n is not None)) < 1:
        parser.error("--epochs, --repeats, --steps and --warmup-steps must be at least 1")

    import torch

    out: dict[str, Any] = {
        "command": "python -m benchmarks.training_speed " + " ".join(sys.argv[1:]),
        "device": f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}",
        "epochs": args.epochs, "repeats": args.repeats, "datasets": {},
    }
    settings = settings_by_dataset(parser, args)
    for dataset, params in settings.items():
        out["datasets"][dataset] = measure(dataset, params, variants, args.epochs, args.repeats, args.workdir,
                                           args.steps, args.warmup_steps)
    save(out, args.out, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
