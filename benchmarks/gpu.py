"""The GPU paths of training, measured against the CPU path: one prepared command for a GPU machine.

    python -m benchmarks.gpu export --out artifacts/gpu-input       # here: datasets -> a small folder
    python -m benchmarks.gpu run --input artifacts/gpu-input --out gpu.json [--cpu-reference cpu.json]
    python -m benchmarks.gpu run --input artifacts/gpu-input --device cpu --epochs 2 --out cpu.json
    make bench-gpu                                                   # both, on a machine with a GPU

`export` runs the pipeline's own stages (validation, features, item text embeddings) on
MovieLens-100K and Amazon-Scientific and keeps what training reads: each dataset's sequence
file, its text embeddings, its item texts and its resolved settings, plus the text encoder's
configuration and tokenizer and the texts of the encoder benchmark; a few MB. With
`--encoder-weights` the encoder's pretrained weights travel too, in fp16 (43 MiB for MiniLM, under
the 64 MiB a lent machine takes): what fine-tuning its top layer (`bert.text_encoder.finetune_layers`)
starts from. The tower computes in fp32 from them. `run` needs only that folder and what a
bare GPU machine has (PyTorch, Lightning, transformers, numpy, scipy, pandas): it imports the
training stage and nothing of polars, implicit, faiss, MLflow, Prefect or Great Expectations
(the smoke test runs it with those imports blocked).

What `run` measures, each through the product's own code (`components.bert.train.run_stage`,
`SeqRecModule`, `SequenceDataModule`, `encode_texts`):
- train: fine-tuning (from random weights, no cloze pre-training) of each dataset's recommender
  as its preset configures it, in `32-true` (TF32 matrix products) and `bf16-mixed`: training
  throughput (median over epochs after the first, validation excluded), peak GPU memory, epochs
  and wall time to the best validation NDCG@10, test NDCG@10 of the refitted model;
- large_model: a model the CPU cannot afford (hidden 256, 4 layers, max_len 200, full softmax,
  batch 512) on Amazon, both precisions (`--seeds` seeds each), against the default model;
- sweep: the large model's training throughput (fixed steps) by batch size, with the encoder
  eager, compiled (`bert.trainer.compile`) and compiled with CUDA graphs
  (`compile_mode=reduce-overhead`), both precisions (`--variants`, `--sweep-batches`);
- xl_model: a model with 8x the large one's work per token (hidden 512, 8 layers), trained in
  both precisions, and its fixed-step throughput;
- profile: torch.profiler over a few of the large model's steps at the smallest and largest of
  those batch sizes, eager and compiled: host operators, kernels and GPU-busy time per step, the
  costliest kernels;
- sampled_softmax: training throughput on a synthetic catalogue of 1M items (id embeddings),
  sampled softmax in both precisions, and the full softmax beside it (or the memory it lacks);
- text_encoder: the MiniLM architecture (random weights: speed, not quality) embedding 100k
  item texts through `encode_texts`;
- ddp: the same strategy settings users set (`bert.trainer.strategy=ddp`), one device, with the
  replica check, against the plain single-device run.

Everything goes into one JSON, written again after each section (a run cut short still leaves
what it measured; no run starts after `--budget-seconds`; a failing path is recorded with its
traceback and the others go on), with a plot beside it. `--update` adds the sections run now to
an earlier run's JSON of the same device (a machine lent for minutes at a time: the sections
split over calls); a section this call skips or fails keeps the earlier call's result.
`merge` puts a CPU run beside a GPU run. The input folder holds resolved settings: export it
again after the settings' schema changes.
`--smoke` shrinks every section to seconds on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shutil
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import datasets, machine, names_of, write_json

log = logging.getLogger("benchmarks.gpu")

DATASETS = ("movielens-100k", "amazon-scientific")
PRECISIONS = ("32-true", "bf16-mixed")
LARGE_DATASET = "amazon-scientific"
# The model a GPU affords and the CPU does not (the example), at batch 512. Learning rate
# 3e-4: at the preset's 1e-3 the first GPU run diverged as the warm-up reached the peak rate
# (validation NDCG@10 0.054 after epoch 1, 0.003 after epoch 2).
LARGE = ["bert.hidden_size=256", "bert.num_layers=4", "bert.num_heads=4", "bert.intermediate_size=1024",
         "bert.max_len=200", "bert.loss=full", "bert.batch_size=512", "bert.finetune.lr=0.0003"]
# A model whose steps are bound by the GPU's arithmetic rather than by the host queueing them
# (hidden 512, 8 layers: 8x the large model's work per token), the size at which precision can
# matter; fewer epochs, and no refit, to fit the machine's minutes.
XL = ["bert.hidden_size=512", "bert.num_layers=8", "bert.num_heads=8", "bert.intermediate_size=2048",
      "bert.max_len=200", "bert.loss=full", "bert.batch_size=512", "bert.finetune.lr=0.0002",
      "bert.finetune.max_epochs=40", "bert.finetune.patience=8", "bert.refit=continue", "bert.refit_epochs=0"]
LARGE_SWEEP_BATCHES = (512, 2048)
# How the encoder runs in the throughput sweep and the profile (settings of every run there).
COMPILE_VARIANTS = {
    "eager": ("bert.trainer.compile=false",),
    "compiled": ("bert.trainer.compile=true",),
    "compiled+cudagraphs": ("bert.trainer.compile=true", "bert.trainer.compile_mode=reduce-overhead"),
}
ENCODER_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Where an export keeps the encoder, and its weights' file name (what `from_pretrained` reads).
ENCODER_DIR = "text-encoder"
ENCODER_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each section runs (`--smoke` swaps in the small one)."""

    catalogue_items: int = 1_000_000
    catalogue_users: int = 100_000
    # 128: the full softmax beside it needs its [tokens x 1M] logits in fp32 several times over.
    catalogue_batch: int = 128
    catalogue_model: tuple[str, ...] = ("bert.hidden_size=128", "bert.num_layers=2", "bert.num_heads=2",
                                        "bert.intermediate_size=512", "bert.max_len=50", "bert.num_negatives=1024")
    throughput_steps: int = 40
    warmup_steps: int = 8
    texts: int = 100_000
    text_batch: int = 256
    ddp_epochs: int = 3
    large: tuple[str, ...] = tuple(LARGE)
    xl: tuple[str, ...] = tuple(XL)
    sweep_batches: tuple[int, ...] = LARGE_SWEEP_BATCHES
    variants: tuple[str, ...] = tuple(COMPILE_VARIANTS)


SMOKE = Sizes(catalogue_items=5_000, catalogue_users=600, catalogue_batch=64, throughput_steps=4, warmup_steps=2,
              catalogue_model=("bert.hidden_size=16", "bert.num_layers=1", "bert.num_heads=2",
                               "bert.intermediate_size=32", "bert.max_len=12", "bert.num_negatives=64"),
              texts=300, text_batch=64, ddp_epochs=1,
              large=("bert.hidden_size=32", "bert.num_layers=2", "bert.num_heads=2", "bert.intermediate_size=64",
                     "bert.max_len=16", "bert.loss=full", "bert.batch_size=64"),
              xl=("bert.hidden_size=32", "bert.num_layers=3", "bert.num_heads=2", "bert.intermediate_size=64",
                  "bert.max_len=16", "bert.loss=full", "bert.batch_size=64", "bert.refit=continue", "bert.refit_epochs=0"),
              sweep_batches=(32, 64),
              # CUDA graphs are a GPU's; compiling on the CPU costs the smoke run half a minute.
              variants=("eager", "compiled"))
SMOKE_OVERRIDES = ["bert.finetune.max_epochs=2", "bert.finetune.patience=1", "bert.refit_epochs=1",
                   "bert.trainer.num_threads=1"]


# --------------------------------------------------------------------------------------------
# export (the CPU machine)
# --------------------------------------------------------------------------------------------


def export(out: Path, datasets: list[str], params_path: Path, overrides: list[str], work: Path,
           override_files: list[Path] = (), encoder_weights: bool = False) -> dict[str, Any]:
    """Run validation, features and text embeddings for each dataset and keep what training
    reads in `out` (see the module docstring)."""
    from benchmarks.common import dataset_params
    from components import pipeline
    from components.bert.text_embeddings import resolve_encoder_path
    from components.bert.train import ITEM_TEXTS, item_texts
    from components.pipeline import Artifacts

    # Every dataset's settings checked before the old export goes.
    settings = {d: dataset_params(params_path, d, overrides=overrides, override_files=override_files) for d in datasets}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    texts: list[str] = []
    encoder = None
    for dataset, params in settings.items():
        art = Artifacts(work / dataset)
        log.info("%s: validation, features and text embeddings", dataset)
        pipeline.run(params, art, until="item_text_embeddings")
        folder = out / dataset
        folder.mkdir()
        for name in ("sequences.npz", "stats.json"):
            shutil.copy2(art.features / name, folder / name)
        shutil.copy2(art.text_embeddings / "embeddings.npy", folder / "embeddings.npy")
        (folder / "params.json").write_text(json.dumps(params.to_dict(), indent=2))
        catalogue = item_texts(art.features)
        (folder / ITEM_TEXTS).write_text(json.dumps(catalogue))
        texts += [t for t in catalogue if t]
        encoder = resolve_encoder_path(params.bert.text_encoder.path)
    target = out / ENCODER_DIR
    target.mkdir()
    for name in ENCODER_FILES:
        if (encoder / name).exists():
            shutil.copy2(encoder / name, target / name)
    if encoder_weights:
        from safetensors.torch import save_file
        from transformers import AutoModel

        weights = AutoModel.from_pretrained(encoder).state_dict()
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
                  str(target / ENCODER_WEIGHTS))
    (out / "texts.json").write_text(json.dumps(texts))
    manifest = {"datasets": datasets, "texts": len(texts), "encoder": encoder.name,
                "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("exported %s (%.1f MiB)", out, manifest["bytes"] / 2**20)
    return manifest


# --------------------------------------------------------------------------------------------
# run (the GPU machine): helpers
# --------------------------------------------------------------------------------------------


def _device_name(accelerator: str) -> str:
    import torch

    if accelerator == "gpu":
        props = torch.cuda.get_device_properties(0)
        return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"CPU ({machine()['cpus']} cores); torch {torch.__version__}"


def exported_params(folder: Path, overrides: list[str], override_files: list[Path] = ()):
    """The resolved settings `export` wrote for one dataset's folder, with partial settings files
    (presets) and then `overrides` laid over them; a ValueError when the folder holds no export."""
    from components.config import apply_overrides, merge_file, params_from_dict

    written = folder / "params.json"
    if not written.is_file():
        raise ValueError(f"{folder}: no export here ({written.name} missing): `python -m benchmarks.gpu export` writes one")
    raw = json.loads(written.read_text())
    # The encoder the export carries, not the path it was read from on the exporting machine.
    encoder = folder.parent / ENCODER_DIR
    weights = (encoder / ENCODER_WEIGHTS).is_file()
    if weights:
        raw["bert"]["text_encoder"]["path"] = str(encoder)
    for file in override_files:
        raw = merge_file(raw, file)
    params = params_from_dict(apply_overrides(raw, overrides))
    if params.bert.text_encoder.finetune_layers > 0 and not weights:
        raise ValueError(f"{folder.parent}: bert.text_encoder.finetune_layers needs the encoder's weights, which "
                         "this export does not hold: export again with --encoder-weights")
    return params


def _reset_memory(accelerator: str) -> None:
    import torch

    # Every run compiles anew: dynamo keeps at most 8 compiled versions of `encode` per process,
    # and the runs of one benchmark would otherwise use them up and fall back to eager unseen.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if accelerator == "gpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _release_memory(accelerator: str) -> None:
    import gc

    import torch

    gc.collect()
    if accelerator == "gpu":
        torch.cuda.empty_cache()


def _peak_memory_mb(accelerator: str) -> float | None:
    import torch

    if accelerator == "gpu":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None  # a process-wide RSS peak would describe every run before this one too


def _graphs() -> dict[str, int]:
    """What dynamo compiled since `_reset_memory`: graphs, and breaks (0 for a whole encoder)."""
    import torch

    counters = torch._dynamo.utils.counters
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def _median_after_first(values: list[float]) -> float:
    """The first epoch (or steps) pays kernel selection and the allocator's growth."""
    values = [v for v in values if v == v]
    return statistics.median(values[1:] if len(values) > 1 else values) if values else float("nan")


def train_once(input_dir: Path, dataset: str, accelerator: str, precision: str, overrides: list[str],
               work: Path, name: str) -> dict[str, Any]:
    """One fine-tuning stage, as the pipeline runs it, and its test NDCG@10."""
    from components.bert.train import run_stage
    from components.evaluate import per_user_ndcg
    from components.factors import FILE_NAME, FactorModel
    from components.sequences import load_sequences

    folder = input_dir / dataset
    params = exported_params(folder, [f"bert.trainer.accelerator={accelerator}", f"bert.trainer.precision={precision}",
                              *overrides])
    cfg = params.bert
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    _reset_memory(accelerator)
    start = time.perf_counter()
    result = run_stage("finetune", folder, folder, out, out / "checkpoints", out / "epochs.csv", cfg, params.seed,
                       params.evaluation.batch_size)
    seconds = time.perf_counter() - start
    with (out / "epochs.csv").open() as f:
        rows = list(csv.DictReader(f))
    seqs = load_sequences(folder)
    test_ndcg = per_user_ndcg(FactorModel.load(out / FILE_NAME), seqs, "test", 10, params.evaluation.batch_size)
    summary = json.loads((out / "training.json").read_text())
    best = result.best_epoch or 0
    compiled = cfg.trainer.compile
    row = {
        "sequences_per_second": round(_median_after_first([float(r["train_sequences_per_second"]) for r in rows]), 1),
        "epoch_sequences_per_second": round(_median_after_first([float(r["sequences_per_second"]) for r in rows]), 1),
        "peak_memory_mb": _peak_memory_mb(accelerator),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds_to_best": round(sum(float(r["epoch_seconds"]) for r in rows[:best]), 2),
        # The first epoch pays the compilation (and kernel selection); the throughput above leaves it out.
        "first_epoch_seconds": round(float(rows[0]["epoch_seconds"]), 2) if rows else None,
        "median_epoch_seconds": round(_median_after_first([float(r["epoch_seconds"]) for r in rows]), 3),
        "compiled": compiled, "compile_mode": cfg.trainer.compile_mode if compiled else None, **_graphs(),
        "stage_seconds": round(seconds, 2),
        "best_val_ndcg10": result.best_val_ndcg10,
        "test_ndcg10": float(test_ndcg.mean()),
        "test_users": int(test_ndcg.size),
        "refit": summary.get("refit"), "refit_epochs": summary.get("refit_epochs"),
        "parameters": summary.get("parameters"),
        "model": {k: getattr(cfg, k) for k in ("mode", "hidden_size", "num_layers", "num_heads", "max_len",
                                                 "batch_size", "bucket_batches", "loss")},
        "training_sequences": summary.get("training_sequences"),
    }
    replica = out / "replica_check.json"
    if replica.exists():
        row["replica_check"] = json.loads(replica.read_text())
    log.info("%s %s %s: %.0f sequences/s, best validation NDCG@10 %.4f at epoch %s of %d, test NDCG@10 %.4f, "
             "peak %s MB, %.0f s", dataset, name, precision, row["sequences_per_second"], row["best_val_ndcg10"] or 0,
             row["best_epoch"], row["epochs_run"], row["test_ndcg10"], row["peak_memory_mb"], seconds)
    return row


def _step_timer(warmup: int):
    import pytorch_lightning as pl
    import torch

    class StepTimer(pl.Callback):
        """Seconds of the training steps after `warmup` of them (the device drained at both ends)."""

        def __init__(self):
            self.start = None
            self.steps = 0
            self.seconds = 0.0
            self.sequences = 0  # counted: an epoch's last batch is smaller

        def _sync(self, module):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup:
                self._sync(module)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.start is not None:
                self.sequences += int(batch[0].shape[0])

        def on_train_end(self, trainer, module):
            self._sync(module)
            if self.start is not None:
                self.seconds = time.perf_counter() - self.start
                self.steps = trainer.global_step - warmup

    return StepTimer()


def throughput(features_dir: Path, params, accelerator: str, steps: int, warmup: int,
               profile: bool = False, embeddings: Path | None = None) -> dict[str, Any]:
    """Training throughput of the product's module and data module for a fixed number of steps
    (no validation): sequences/s and peak memory; with `profile`, where the steps' time goes.
    `embeddings`: the item text embeddings (default: `embeddings.npy` in `features_dir`)."""
    import pytorch_lightning as pl
    import torch

    from components.bert.data import SequenceDataModule
    from components.bert.train import build_module, item_texts, model_config, trainer_kwargs

    cfg = params.bert
    pl.seed_everything(params.seed, verbose=False)
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")
    text_features = None
    if "text" in cfg.mode:
        text_features = torch.from_numpy(np.load(embeddings or features_dir / "embeddings.npy"))
    dm = SequenceDataModule(features_dir, cfg.max_len, cfg.batch_size, "next", validate=False,
                            bucket_batches=cfg.bucket_batches)
    dm.setup()
    mcfg = model_config(cfg, dm.n_items, 0 if text_features is None else text_features.shape[1], "causal")
    texts = item_texts(features_dir) if mcfg.text_finetune_layers > 0 else None
    module = build_module(cfg, cfg.finetune, "next", mcfg, text_features, texts, dm.item_counts)
    timer = _step_timer(warmup)
    profiler = _step_profiler(warmup) if profile else None
    _reset_memory(accelerator)
    trainer = pl.Trainer(max_steps=warmup + steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=cfg.grad_clip or None,
                         callbacks=[timer] + ([profiler] if profiler else []), **trainer_kwargs(cfg.trainer))
    trainer.fit(module, datamodule=dm)
    if not timer.steps:
        raise RuntimeError(f"only {trainer.global_step} steps ran: too few sequences for {warmup + steps} batches")
    out = {"sequences_per_second": round(timer.sequences / timer.seconds, 1),
           "step_ms": round(1000 * timer.seconds / timer.steps, 2), "steps": timer.steps,
           "peak_memory_mb": _peak_memory_mb(accelerator), "batch_size": cfg.batch_size, **_graphs()}
    tower = module.model.text_tower
    if tower is not None and tower.cache_seconds is not None:
        out["text_cache_seconds"] = round(tower.cache_seconds, 2)  # once, inside the warm-up
    if profiler:
        out["profile"] = profiler.summary(timer.steps)
    return out


def _step_profiler(warmup: int):
    """torch.profiler over the timed steps: per step, the operators the host dispatched, the
    GPU kernels launched and the time the GPU was busy, and the kernels that took the most."""
    import pytorch_lightning as pl
    from torch.profiler import ProfilerActivity, profile

    class StepProfiler(pl.Callback):
        def __init__(self):
            self.prof = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup and self.prof is None:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if module.device.type == "cuda" else [])
                self.prof = profile(activities=activities)
                self.prof.__enter__()

        def on_train_end(self, trainer, module):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)

        def summary(self, steps: int) -> dict[str, Any]:
            events = self.prof.events()
            ops = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
            # Kernels only: a user annotation (the optimizer's step range) spans the GPU's idle
            # gaps too, and counted as busy it hid that the step waits on the host.
            kernels = [e for e in events if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)
                       and "#" not in e.name]
            busy = sum(e.time_range.elapsed_us() for e in kernels)
            by_name: dict[str, float] = {}
            for e in kernels:
                by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
            return {"aten_ops_per_step": round(len(ops) / steps), "kernels_per_step": round(len(kernels) / steps),
                    "gpu_busy_ms_per_step": round(busy / 1000 / steps, 2),
                    "top_kernels_ms_per_step": {name[:120]: round(us / 1000 / steps, 3) for name, us in top}}

    return StepProfiler()


def synthetic_catalogue(folder: Path, n_items: int, n_users: int, seed: int = 0) -> dict[str, int]:
    """Sequences over a power-law catalogue of `n_items` (the sequence file the features stage
    writes): 5-60 items per user, the last one test, the one before validation."""
    from components.sequences import SPLIT_CODES, write_sequences

    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 61, size=n_users)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=int(indptr[-1]), p=popularity / popularity.sum()).astype(np.int64)
    split = np.full(items.size, SPLIT_CODES["train"], dtype=np.int8)
    split[indptr[1:] - 1] = SPLIT_CODES["test"]
    split[indptr[1:] - 2] = SPLIT_CODES["valid"]
    folder.mkdir(parents=True, exist_ok=True)
    write_sequences(folder, indptr, items, np.arange(items.size, dtype=np.int64),
                    np.ones(items.size, np.float32), split)
    (folder / "stats.json").write_text(json.dumps({"n_items": n_items, "n_users": n_users,
                                                   "n_interactions": int(items.size)}))
    return {"items": n_items, "users": n_users, "interactions": int(items.size)}


# --------------------------------------------------------------------------------------------
# run: the sections
# --------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.accelerator = "gpu" if args.device == "gpu" else "cpu"
        if self.accelerator == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("--device gpu, but PyTorch sees no GPU here (use --device cpu)")
        self.sizes = SMOKE if args.smoke else Sizes()
        self.overrides = [*(SMOKE_OVERRIDES if args.smoke else []), *args.overrides]
        if args.epochs:
            self.overrides.append(f"bert.finetune.max_epochs={args.epochs}")
        self.precisions = args.precisions.split(",")
        self.sweep_batches = (self.sizes.sweep_batches if args.sweep_batches is None
                              else [int(b) for b in args.sweep_batches.split(",") if b])
        self.variants = self.sizes.variants if args.variants is None else [v for v in args.variants.split(",") if v]
        unknown = set(self.variants) - set(COMPILE_VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(COMPILE_VARIANTS)}")
        manifest = json.loads((args.input / "manifest.json").read_text())
        self.datasets = manifest["datasets"]
        self.work = args.work
        self.started = time.perf_counter()
        fresh = {"device": _device_name(self.accelerator), "multi_gpu": "not available: one GPU", "smoke": args.smoke}
        self.earlier = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
        for key in ("device", "smoke"):
            if self.earlier and self.earlier.get(key) != fresh[key]:
                raise ValueError(f"--update: {args.out} has {key} {self.earlier.get(key)!r}, this run "
                                 f"{fresh[key]!r}; write a new file (and `merge` a CPU run beside a GPU run)")
        self.out: dict[str, Any] = {**self.earlier, **fresh}
        self.out.setdefault("train", {})
        self.out.setdefault("seconds", {})
        # Each call (a run, and the `--update` runs added to it) with its settings and failures;
        # `errors` at the top are this call's, `section_call` says which call measured a section.
        self.call = len(self.out.get("calls", [])) + 1
        if self.out.get("errors"):
            self.out["calls"][-1]["errors"] = self.out.pop("errors")
        self.out.setdefault("calls", []).append({"sections": args.sections.split(","), "overrides": self.overrides,
                                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def time_left(self) -> bool:
        return time.perf_counter() - self.started < self.args.budget_seconds

    def save(self) -> None:
        self.out["seconds"][f"total, call {self.call}"] = round(time.perf_counter() - self.started, 1)
        self.out["machine"] = machine()
        write_json(self.args.out, self.out)

    def section(self, name: str, fn) -> None:
        # Under --update, what an earlier call measured stays unless this call measures it anew.
        kept = self.earlier.get(name) if "skipped" not in _rows(self.earlier.get(name)) else None
        if not self.time_left():
            if kept is None:
                self.out[name] = {"skipped": f"time budget of {self.args.budget_seconds:.0f} s spent"}
                self.out.setdefault("section_call", {})[name] = self.call
            log.warning("%s: skipped (time budget spent)%s", name, "; the earlier call's result stays" if kept else "")
            return
        start = time.perf_counter()
        log.info("== %s (%.0f s in)", name, start - self.started)
        if self.attempt(name, lambda: fn() or True) is None and kept is not None:
            self.out[name] = kept
            log.warning("%s failed; the earlier call's result stays", name)
        else:
            self.out.setdefault("section_call", {})[name] = self.call
            self.out["seconds"][name] = round(time.perf_counter() - start, 1)
        self.save()

    def attempt(self, label: str, fn):
        """fn(), or None with the error recorded: on a machine lent for minutes, one failing path
        must not cost the measurements of the others."""
        try:
            return fn()
        except Exception:
            log.exception("%s failed", label)
            self.out.setdefault("errors", {})[label] = traceback.format_exc()[-4000:]
            _release_memory(self.accelerator)
            return None

    # ---- train --------------------------------------------------------------------------

    def train(self) -> None:
        self.out["train"] = {}  # anew, also under --update
        for dataset in self.datasets:
            rows = self.out["train"].setdefault(dataset, {})
            for precision in self.precisions:
                if self.time_left():
                    row = self.attempt(f"train {dataset} {precision}", lambda: train_once(
                        self.args.input, dataset, self.accelerator, precision, self.overrides, self.work,
                        f"{dataset}-{precision}"))
                    if row:
                        rows[precision] = row
            self.save()

    def large_model(self) -> None:
        self._train_model("large_model", self.sizes.large)

    def xl_model(self) -> None:
        self._train_model("xl_model", self.sizes.xl)
        # Its throughput at its own batch size, eager (what compiling does is the sweep's question).
        dataset = self._large_dataset()
        batch = int(_setting(self.sizes.xl, "bert.batch_size"))
        rows = self.out["xl_model"]["throughput"] = {}
        for precision in self.precisions:
            if self.time_left():
                params = self._large_params(dataset, batch, precision, "eager", self.sizes.xl)
                row = self.attempt(f"xl_model throughput {precision}", lambda: throughput(
                    self.args.input / dataset, params, self.accelerator, self.sizes.throughput_steps // 2,
                    self.sizes.warmup_steps))
                if row:
                    rows[precision] = row
        _bf16_speedup(rows)

    def _large_dataset(self) -> str:
        return LARGE_DATASET if LARGE_DATASET in self.datasets else self.datasets[-1]

    def _train_model(self, key: str, settings: tuple[str, ...]) -> None:
        """Fine-tune a model the CPU cannot afford, both precisions (`--seeds` seeds each)."""
        dataset = self._large_dataset()
        out = self.out[key] = {"dataset": dataset, "overrides": list(settings)}
        for precision in self.precisions:
            runs = []
            for seed in range(self.args.seeds):
                if self.time_left():
                    row = self.attempt(f"{key} {precision} seed {seed}", lambda: train_once(
                        self.args.input, dataset, self.accelerator, precision,
                        [*self.overrides, *settings, f"seed={42 + seed}"], self.work, f"{key}-{precision}-{seed}"))
                    if row:
                        runs.append(row)
            if runs:
                out[precision] = runs[0] if len(runs) == 1 else {"runs": runs, **_mean_runs(runs)}
            self.save()
        if _bf16_speedup(out):
            fp32, bf16 = out["32-true"], out["bf16-mixed"]
            out["bf16_test_ndcg10_relative_difference"] = round(
                (bf16["test_ndcg10"] - fp32["test_ndcg10"]) / fp32["test_ndcg10"], 4)

    def sweep(self) -> None:
        """The large model's throughput by batch size and by how its encoder runs: where the step
        stops being bound by the host, and what compiling does to that."""
        dataset = self._large_dataset()
        sweep = self.out["sweep"] = {"dataset": dataset, "overrides": list(self.sizes.large)}
        for batch in self.sweep_batches:
            for variant in self.variants:
                rows = sweep.setdefault(str(batch), {}).setdefault(variant, {})
                for precision in self.precisions:
                    if not self.time_left():
                        break
                    params = self._large_params(dataset, batch, precision, variant)
                    row = self.attempt(f"sweep batch {batch} {variant} {precision}", lambda: throughput(
                        self.args.input / dataset, params, self.accelerator, self.sizes.throughput_steps // 2,
                        self.sizes.warmup_steps))
                    if row:
                        rows[precision] = row
                        log.info("large model, batch %d, %s, %s: %.0f sequences/s", batch, variant, precision,
                                 row["sequences_per_second"])
                _bf16_speedup(rows)
                self.save()

    def _large_params(self, dataset: str, batch: int, precision: str, variant: str, settings=None):
        return exported_params(self.args.input / dataset, [
            *self.overrides, *(settings or self.sizes.large), f"bert.batch_size={batch}", *COMPILE_VARIANTS[variant],
            f"bert.trainer.accelerator={self.accelerator}", f"bert.trainer.precision={precision}"])

    # ---- where a large-model step's time goes -------------------------------------------------

    def profile(self) -> None:
        dataset = self._large_dataset()
        out = self.out["profile"] = {"dataset": dataset, "overrides": list(self.sizes.large)}
        # Eager and compiled (a profile of replayed CUDA graphs shows the graphs, not their kernels).
        variants = [v for v in self.variants if v in ("eager", "compiled")]
        for batch in sorted({*self.sweep_batches[:1], *self.sweep_batches[-1:]}):  # the smallest and the largest
            for variant in variants:
                for precision in self.precisions:
                    if not self.time_left():
                        break
                    params = self._large_params(dataset, batch, precision, variant)
                    row = self.attempt(f"profile batch {batch} {variant} {precision}", lambda: throughput(
                        self.args.input / dataset, params, self.accelerator, max(2, self.sizes.throughput_steps // 8),
                        self.sizes.warmup_steps, profile=True))
                    if row:
                        out.setdefault(str(batch), {}).setdefault(variant, {})[precision] = row
                        log.info("profile, batch %d %s %s: %s", batch, variant, precision,
                                 {k: v for k, v in row["profile"].items() if k != "top_kernels_ms_per_step"})
                self.save()

    # ---- sampled softmax on a 1M-item catalogue -------------------------------------------

    def sampled_softmax(self) -> None:
        s = self.sizes
        folder = self.work / "catalogue"
        out = self.out["sampled_softmax"] = {"catalogue": synthetic_catalogue(folder, s.catalogue_items,
                                                                              s.catalogue_users)}
        model = ["bert.mode=id", *s.catalogue_model, f"bert.batch_size={s.catalogue_batch}"]
        base = [*self.overrides, *model, f"bert.trainer.accelerator={self.accelerator}"]
        out["model"] = model
        # A folder of settings: the exported datasets' own (any) with the catalogue's overrides.
        settings = self.args.input / self.datasets[-1]
        for loss, precision in [("sampled", p) for p in self.precisions] + [("full", self.precisions[-1])]:
            if not self.time_left():
                break
            params = exported_params(settings, [*base, f"bert.loss={loss}", f"bert.trainer.precision={precision}"])
            key = f"{loss} {precision}"
            try:
                out[key] = throughput(folder, params, self.accelerator, s.throughput_steps, s.warmup_steps)
            except Exception as exc:  # the full softmax over 1M items may not fit: that is the finding
                if "out of memory" not in str(exc).lower():
                    raise
                out[key] = {"out_of_memory": str(exc).splitlines()[0][:300]}
            _release_memory(self.accelerator)  # after the except clause: its traceback held the tensors
            log.info("catalogue of %d items, %s: %s", s.catalogue_items, key, out[key])
            self.save()
        for precision in self.precisions:
            full, sampled = out.get(f"full {precision}", {}), out.get(f"sampled {precision}", {})
            if "sequences_per_second" in full and "sequences_per_second" in sampled:
                out[f"sampled_over_full {precision}"] = round(
                    sampled["sequences_per_second"] / full["sequences_per_second"], 2)

    # ---- text encoder ---------------------------------------------------------------------

    def text_encoder(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModel

        from components.bert.text_embeddings import encode_texts

        s = self.sizes
        source = self.args.input / ENCODER_DIR
        encoder = self.work / "text-encoder-random"
        if encoder.exists():
            shutil.rmtree(encoder)
        shutil.copytree(source, encoder)
        # The architecture with random weights: the speed of the encoder, not its quality.
        AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(encoder)
        corpus = json.loads((self.args.input / "texts.json").read_text())
        texts = [corpus[i % len(corpus)] for i in range(s.texts)]
        params = exported_params(self.args.input / self.datasets[-1], self.overrides)
        max_length = params.bert.text_encoder.max_length
        device = "cuda" if self.accelerator == "gpu" else "cpu"
        # As the text-embedding stage runs: full fp32 (the training sections turned TF32 on).
        torch.set_float32_matmul_precision("highest")
        encode_texts(texts[: 2 * s.text_batch], encoder, max_length, s.text_batch, progress=False, device=device)
        start = time.perf_counter()
        vectors = encode_texts(texts, encoder, max_length, s.text_batch, progress=True, device=device)
        seconds = time.perf_counter() - start
        self.out["text_encoder"] = {
            "texts": len(texts), "distinct_texts": len(set(texts)), "max_length": max_length,
            "batch_size": s.text_batch, "dim": int(vectors.shape[1]), "seconds": round(seconds, 2),
            "items_per_second": round(len(texts) / seconds, 1), "weights": "random (MiniLM-L6 architecture)",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
        log.info("text encoder: %d texts in %.1f s (%.0f items/s)", len(texts), seconds, len(texts) / seconds)

    # ---- DDP ------------------------------------------------------------------------------

    def ddp(self) -> None:
        dataset = self._large_dataset()
        precision = self.precisions[-1]
        short = [*self.overrides, f"bert.finetune.max_epochs={self.sizes.ddp_epochs}", "bert.refit=continue",
                 "bert.refit_epochs=0"]
        plain = train_once(self.args.input, dataset, self.accelerator, precision, short, self.work, "single")
        if not self.time_left():
            self.out["ddp"] = {"single_device": plain, "skipped": "the DDP run: time budget spent"}
            return
        ddp = train_once(self.args.input, dataset, self.accelerator, precision,
                         [*short, "bert.trainer.strategy=ddp", "bert.trainer.devices=1",
                          "bert.trainer.check_replicas=true"], self.work, "ddp")
        self.out["ddp"] = {
            "dataset": dataset, "precision": precision, "devices": 1, "multi_gpu": "not available: one GPU",
            "single_device": plain, "ddp": ddp,
            "ddp_over_single": round(ddp["sequences_per_second"] / plain["sequences_per_second"], 2),
        }


def _bf16_speedup(rows: dict[str, Any]) -> bool:
    """rows["bf16_speedup"] (bf16-mixed over 32-true throughput) when both precisions ran."""
    if not all(p in rows for p in PRECISIONS):
        return False
    rows["bf16_speedup"] = round(rows["bf16-mixed"]["sequences_per_second"] / rows["32-true"]["sequences_per_second"], 2)
    return True


def _setting(overrides: tuple[str, ...], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def _mean_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("sequences_per_second", "test_ndcg10", "best_val_ndcg10", "peak_memory_mb", "seconds_to_best")
    return {k: statistics.mean(r[k] for r in runs) for k in keys if all(r.get(k) is not None for r in runs)}


# Most needed first: a run cut short by its budget keeps what matters most.
SECTIONS = ("large_model", "sweep", "xl_model", "profile", "train", "sampled_softmax", "text_encoder", "ddp")


def run(args: argparse.Namespace) -> dict[str, Any]:
    r = Run(args)
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        r.section(name, getattr(r, name))
    compare_to_default(r.out)
    if args.cpu_reference:
        attach_cpu(r.out, json.loads(args.cpu_reference.read_text()))
    r.save()
    plot(r.out, args.out.with_suffix(".png"))
    return r.out


CPU = "cpu 32-true"


def compare_to_default(out: dict[str, Any]) -> None:
    """Does scale improve quality? The larger models' test NDCG@10 against the dataset's own."""
    for key in ("large_model", "xl_model"):
        large = _rows(out.get(key))
        default = _rows(_rows(out.get("train")).get(large.get("dataset")))
        for precision in PRECISIONS:
            if "test_ndcg10" in _rows(large.get(precision)) and "test_ndcg10" in _rows(default.get(precision)):
                large.setdefault("vs_default_model", {})[precision] = {
                    "test_ndcg10_default": default[precision]["test_ndcg10"],
                    f"test_ndcg10_{key}": large[precision]["test_ndcg10"],
                    "best_val_ndcg10_default": default[precision]["best_val_ndcg10"],
                    f"best_val_ndcg10_{key}": large[precision]["best_val_ndcg10"],
                    "relative": round(large[precision]["test_ndcg10"] / default[precision]["test_ndcg10"] - 1, 4),
                }


def _rows(value: Any) -> dict[str, Any]:
    """A section's mapping, or an empty one where the section was skipped (a message there)."""
    return value if isinstance(value, dict) else {}


def attach_cpu(out: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """A CPU run's figures beside a GPU run's (`train[DATASET]["cpu 32-true"]`, the large
    model's likewise), with each GPU row's throughput as a multiple of the CPU's."""
    out["cpu_device"] = cpu.get("device")
    if not isinstance(out.get("train"), dict):
        out["train"] = {}
    pairs = [(out["train"].setdefault(d, {}), _rows(rows).get("32-true"))
             for d, rows in _rows(cpu.get("train")).items()]
    if isinstance(out.get("large_model"), dict):
        pairs.append((out["large_model"], _rows(cpu.get("large_model")).get("32-true")))
    for rows, reference in pairs:
        if "sequences_per_second" not in _rows(reference):
            continue
        rows[CPU] = reference
        for precision in PRECISIONS:
            if isinstance(rows.get(precision), dict) and "sequences_per_second" in rows[precision]:
                rows[precision]["speedup_vs_cpu"] = round(
                    rows[precision]["sequences_per_second"] / reference["sequences_per_second"], 1)
    return out


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def plot(out: dict[str, Any], path: Path) -> None:
    """Training throughput per dataset and precision (CPU beside), and test NDCG@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for dataset, rows in _rows(out.get("train")).items():
        for precision, row in _rows(rows).items():
            if "sequences_per_second" in _rows(row):
                bars.append((f"{dataset}\n{precision}", row["sequences_per_second"], row.get("test_ndcg10")))
    for key in ("large_model", "xl_model"):
        for precision in (CPU, *PRECISIONS):
            row = _rows(out.get(key)).get(precision)
            if "sequences_per_second" in _rows(row):
                bars.append((f"{key.replace('_', ' ')}\n{precision}", row["sequences_per_second"], row.get("test_ndcg10")))
    sweep = [(f"batch {batch}\n{variant}", rows) for batch, by_variant in _rows(out.get("sweep")).items()
             if batch.isdigit() for variant, rows in _rows(by_variant).items()]
    if "bf16_speedup" in _rows(_rows(out.get("xl_model")).get("throughput")):
        sweep.append(("xl model\neager", out["xl_model"]["throughput"]))
    if not bars and not sweep:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 4.8))
    labels = [b[0] for b in bars]
    colors = ["tab:gray" if "cpu" in label else "tab:blue" if "32-true" in label else "tab:orange" for label in labels]
    ax1.bar(labels, [b[1] or 0 for b in bars], color=colors)
    ax1.set(yscale="log", ylabel="training sequences / s (log)",
            title=f"Fine-tuning throughput (grey: CPU, blue: fp32/TF32, orange: bf16)\n{out['device']}")
    ax2.bar(labels, [b[2] or 0 for b in bars], color=colors)
    ax2.set(ylabel="test NDCG@10", title="Test NDCG@10 (CPU rows: epochs capped, throughput only)")
    # The large model's throughput by batch size and by how its encoder runs, both precisions.
    x = np.arange(len(sweep))
    for offset, precision, color in ((-0.2, "32-true", "tab:blue"), (0.2, "bf16-mixed", "tab:orange")):
        ax3.bar(x + offset, [_rows(rows.get(precision)).get("sequences_per_second", 0) for _, rows in sweep],
                width=0.4, color=color, label=precision)
    for i, (_, rows) in enumerate(sweep):
        if "bf16_speedup" in rows:
            ax3.annotate(f"{rows['bf16_speedup']:.2f}x", (i, 0), xytext=(0, 3), textcoords="offset points",
                         ha="center", fontsize=8)
    ax3.set_xticks(x, [label for label, _ in sweep])
    ax3.set(ylabel="training sequences / s", title="Large model: bf16 / fp32 by batch and encoder (x: bf16 speed-up)")
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main() -> int:
    from components.cli import add_params_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="run the data stages here and write the GPU machine's input folder")
    add_params_arguments(exp, artifacts=False)
    exp.add_argument("--out", type=Path, default=Path("artifacts/gpu-input"))
    exp.add_argument("--datasets", default=",".join(DATASETS))
    exp.add_argument("--work", type=Path, default=Path("artifacts/bench/gpu-export"))
    exp.add_argument("--encoder-weights", action="store_true",
                     help="carry the text encoder's weights (fp16), for fine-tuning its top layers there")
    r = sub.add_parser("run", help="measure training on this machine's GPU (or CPU) from an input folder")
    r.add_argument("--input", type=Path, default=Path("artifacts/gpu-input"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("artifacts/bench/gpu"))
    r.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    r.add_argument("--precisions", default=",".join(PRECISIONS))
    r.add_argument("--sections", default=",".join(SECTIONS))
    r.add_argument("--epochs", type=int, default=0, help="cap fine-tuning epochs (0: the datasets' own settings)")
    r.add_argument("--sweep-batches", help="batch sizes of the large model's throughput sweep, comma-separated "
                   "('' for none; default: 512,2048)")
    r.add_argument("--seeds", type=int, default=1, help="seeds per precision for the large model")
    r.add_argument("--variants", help=f"how the encoder runs in the sweep and profile, comma-separated, of "
                   f"{', '.join(COMPILE_VARIANTS)} (default: all)")
    r.add_argument("--update", action="store_true",
                   help="add the sections run now to --out's earlier run (same device) instead of starting anew")
    r.add_argument("--budget-seconds", type=float, default=420.0,
                   help="start no run after this many seconds (what ran is kept)")
    r.add_argument("--cpu-reference", type=Path, help="a CPU run's JSON, to stand beside this one")
    m = sub.add_parser("merge", help="put a CPU run's figures beside a GPU run's (as --cpu-reference does)")
    m.add_argument("--gpu", type=Path, required=True)
    m.add_argument("--cpu", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    r.add_argument("--smoke", action="store_true", help="every section shrunk to seconds (the test suite's run)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of every run (repeatable)")
    args = parser.parse_args()
    if args.command == "export":
        export(args.out, names_of(parser, "--datasets", args.datasets, datasets()), args.params, args.overrides, args.work, args.override_files,
               args.encoder_weights)
    elif args.command == "merge":
        out = attach_cpu(json.loads(args.gpu.read_text()), json.loads(args.cpu.read_text()))
        write_json(args.out, out)
        plot(out, args.out.with_suffix(".png"))
    else:
        errors = run(args).get("errors", {})
        if errors:
            log.error("failed: %s (tracebacks in %s)", ", ".join(errors), args.out)
            return 1
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
