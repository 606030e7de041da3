"""Training stages of the sequence recommender: `pretrain` (cloze) and `finetune` (next item).

Both run PyTorch Lightning with strategy, devices, nodes and precision from params (DDP over
gloo on CPU and NCCL on GPU; `precision: auto` is fp32, with TF32 matrix products on a GPU, see
`resolve_precision`), AdamW (fused into one kernel on a GPU) with warm-up and linear decay, gradient clipping and a fixed seed. Each epoch
ends with full-ranking validation NDCG@10, which drives early stopping and best-checkpoint
selection. `last.ckpt` is written every epoch into the stage's checkpoint folder, beside a resume
marker holding the stage's run key (the pipeline's hash of its inputs, settings and code): a run
killed mid-training and started again with the same key resumes from it; a different key, or a
marker missing because the run completed, starts from scratch. The per-epoch log travels inside
the checkpoints, so a resumed run rewrites it whole even when the file was deleted in between (DVC
removes a stage's outputs before running it).

Fine-tuning starts from the pre-trained weights when the pretrain stage ran. The model selected
on validation is then refitted on training + validation sequences (everything before the test
item, as a deployed model would be updated): `refit: continue` trains it `refit_epochs` more
epochs; `refit: retrain` trains again from the stage's starting weights for the selected number
of epochs. Validation factors come from the selected model, test factors and the deployable
model from the refitted one.

Outputs (finetune, under `artifacts/bert/`): `model/` (config.json + model.safetensors, the
deployable network), `selected_model/` (the model selected on validation, before the refit),
`item_embeddings.npy`, `factors.npz` (for evaluation), `learning_curve.png` (both stages),
`training.json`; the per-epoch log goes to the file the pipeline names (`metrics/`), the
checkpoints (best.ckpt, last.ckpt) to the stage's checkpoint folder.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl_
import torch

from components.bert.data import SequenceDataModule
from components.bert.model import SeqRecConfig, SeqRecModel, left_pad, load_model, padded_length, save_model
from components.bert.module import SeqRecModule, count_parameters
from components.config import BertRecConfig, MissingInput, StageConfig, TrainerConfig
from components.factors import FILE_NAME, FactorModel
from components.sequences import load_sequences

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    stage: str
    out_dir: Path
    model_dir: Path | None
    best_epoch: int | None
    best_val_ndcg10: float | None
    epochs_run: int
    train_seconds: float
    sequences_per_second: float
    resumed: bool
    skipped: bool = False

    def metrics(self) -> dict[str, float | int | None]:
        return {"best_epoch": self.best_epoch, "best_val_ndcg10": self.best_val_ndcg10, "epochs_run": self.epochs_run,
                "train_seconds": self.train_seconds, "sequences_per_second": self.sequences_per_second}

    def describe(self) -> str:
        if self.skipped:
            used = " (the pre-trained model is the recommender)" if self.model_dir else ""
            return f"{self.stage}: skipped (bert.{self.stage}.enabled is false){used}"
        best = f"{self.best_val_ndcg10:.4f}" if self.best_val_ndcg10 is not None else "n/a"
        return (f"{self.stage}: best validation NDCG@10 {best} at epoch {self.best_epoch} "
                f"({self.epochs_run} epochs, {self.train_seconds:.0f} s, {self.sequences_per_second:.0f} sequences/s)"
                f"{', resumed' if self.resumed else ''} -> {self.model_dir}")


# --------------------------------------------------------------------------------------------
# Lightning wiring
# --------------------------------------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """`auto` is `32-true` everywhere: on CPUs without AMX bf16 autocast is several times slower
    than fp32, and on an H100 (benchmarks/gpu.py) the models RecForge trains ran at 0.79-1.04x
    TF32's throughput in bf16-mixed (test NDCG@10 -5 % to +3 %, one seed each): their steps wait
    on the host launching kernels, and autocast adds a quarter more of them. `bf16-mixed` stays
    available (it takes a third less GPU memory)."""
    return "32-true" if precision == "auto" else precision


def interactive() -> bool:
    """A progress bar only on a terminal: in a log (the flow's task log, CI) its carriage
    returns are noise, and the per-epoch lines say the same."""
    return sys.stdout.isatty()


def trainer_kwargs(cfg: TrainerConfig) -> dict:
    strategy = cfg.strategy
    if strategy == "auto" and (cfg.devices > 1 or cfg.num_nodes > 1):
        strategy = "ddp"
    return {
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "strategy": strategy,
        "precision": resolve_precision(cfg.precision),
    }


class EpochLog(pl_.Callback):
    """One CSV row per epoch (loss, validation metrics, lr, time, throughput) and one log line,
    rank 0 only. The rows are saved in every checkpoint (`state_dict`), so a resumed run
    rewrites the whole log from the checkpoint it resumes: epochs the checkpoint does not hold
    (trained again) and a row torn by a kill go, and a deleted file comes back."""

    FIELDS = ["stage", "epoch", "train_loss", "val_ndcg10", "val_recall10", "lr", "epoch_seconds", "sequences_per_second",
              "train_sequences_per_second"]

    def __init__(self, path: Path, stage: str, n_sequences: int):
        self.path, self.stage, self.n_sequences = path, stage, n_sequences
        self.rows: list[list] = []
        self._start = 0.0
        self._trained: float | None = None  # seconds of training batches in this epoch
        # Epochs already done when this process started training (read off the restored
        # checkpoint); None until the first epoch starts.
        self.resumed_after: int | None = None
        write_epoch_log(path, [])

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [list(r) for r in state.get("rows", [])]

    def on_train_epoch_start(self, trainer, module) -> None:
        if self.resumed_after is None:
            self.resumed_after = trainer.current_epoch
            self.rows = [r for r in self.rows if int(r[1]) <= trainer.current_epoch]
            if trainer.is_global_zero:
                write_epoch_log(self.path, self.rows)
        _sync(module)
        self._start = time.perf_counter()
        self._trained = None

    def on_validation_epoch_start(self, trainer, module) -> None:
        # Validation runs inside the training epoch: the training batches end here.
        if not trainer.sanity_checking and self._trained is None:
            _sync(module)
            self._trained = time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer, module) -> None:
        _sync(module)
        seconds = time.perf_counter() - self._start
        trained = self._trained if self._trained is not None else seconds
        m = trainer.callback_metrics
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row = [
            self.stage, trainer.current_epoch + 1,
            float(m.get("train_loss", float("nan"))), float(m.get("val_ndcg10", float("nan"))),
            float(m.get("val_recall10", float("nan"))), lr, seconds,
            # Throughput of the whole epoch, validation included, and of its training batches.
            self.n_sequences / seconds if seconds > 0 else float("nan"),
            self.n_sequences / trained if trained > 0 else float("nan"),
        ]
        # Every rank keeps the rows (each saves its callback state); rank 0 writes and logs.
        self.rows.append(row)
        if not trainer.is_global_zero:
            return
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(row)
        log.info("%s epoch %d/%d: loss %.4f, validation NDCG@10 %.4f, Recall@10 %.4f, %.1f s (%.0f sequences/s)",
                 self.stage, row[1], trainer.max_epochs, row[2], row[3], row[4], seconds, row[7])


def _sync(module) -> None:
    """GPU work is queued asynchronously: a clock read without waiting for it measures the queue."""
    device = getattr(module, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def write_epoch_log(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([EpochLog.FIELDS, *rows])


class ReplicaCheck(pl_.Callback):
    """After the first optimiser step, hash every parameter on every rank and compare: DDP
    replicas must hold bit-identical weights. Written to `path` by rank 0."""

    def __init__(self, path: Path):
        self.path = path
        self.done = False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.done:
            return
        self.done = True
        digest = hashlib.sha256()
        for name, p in sorted(module.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        mine = torch.tensor(list(digest.digest()), dtype=torch.int64, device=module.device)
        gathered = trainer.strategy.all_gather(mine)
        if gathered.ndim == 1:
            gathered = gathered[None]
        hashes = [bytes(int(x) for x in row.tolist()).hex() for row in gathered]
        if trainer.is_global_zero:
            dist = torch.distributed
            backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
            self.path.write_text(json.dumps({
                "step": int(trainer.global_step), "world_size": trainer.world_size, "backend": backend,
                "parameter_sha256_per_rank": hashes, "identical": len(set(hashes)) == 1,
            }, indent=2))
            if len(set(hashes)) != 1:
                log.error("DDP replicas diverged after the first step: %s", hashes)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def model_config(cfg: BertRecConfig, n_items: int, text_dim: int, inference: str) -> SeqRecConfig:
    from components.bert.text_embeddings import resolve_encoder_path

    tower = cfg.text_encoder.finetune_layers > 0 and "text" in cfg.mode
    return SeqRecConfig(
        n_items=n_items, mode=cfg.mode, text_dim=text_dim if "text" in cfg.mode else 0,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_len=cfg.max_len, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, positions=cfg.positions,
        residual=cfg.residual,
        inference=inference, similarity=cfg.similarity, temperature=cfg.temperature,
        text_whitening=cfg.text_whitening and "text" in cfg.mode,
        text_adaptor=cfg.text_adaptor, text_experts=cfg.text_experts,
        text_encoder_path=str(resolve_encoder_path(cfg.text_encoder.path)) if tower else None,
        text_finetune_layers=cfg.text_encoder.finetune_layers if tower else 0,
        text_max_length=cfg.text_encoder.max_length, text_cache_frozen=cfg.text_encoder.cache_frozen,
    )


def loss_settings(cfg: BertRecConfig) -> dict:
    """What the sequence model is trained to minimise, as `SeqRecModule` takes it: one place for
    every trainer (the training stages, the pruned model's recovery, the incremental update),
    so none of them trains on another loss than the one configured."""
    return dict(weight_decay=cfg.weight_decay, loss=cfg.loss, num_negatives=cfg.num_negatives,
                negative_sampling=cfg.negative_sampling, recency_half_life=cfg.recency_half_life,
                recency_boost=cfg.recency_boost)


def build_module(
    cfg: BertRecConfig, stage: StageConfig, objective: str, mcfg: SeqRecConfig,
    text_features: torch.Tensor | None, texts: list[str] | None, item_counts: np.ndarray,
) -> SeqRecModule:
    module = SeqRecModule(
        dataclasses.asdict(mcfg), objective=objective, lr=stage.lr, warmup_fraction=cfg.warmup_fraction,
        item_counts=item_counts, text_features=text_features, texts=texts, **loss_settings(cfg),
    )
    module.compile_setting, module.compile_mode = cfg.trainer.compile, cfg.trainer.compile_mode
    module.packed_dropout_setting = cfg.trainer.packed_dropout
    return module


@torch.no_grad()
def user_vectors(model: SeqRecModel, histories: list[np.ndarray], batch_size: int = 512) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    table = model.item_representations()
    out = []
    for lo in range(0, len(histories), batch_size):
        batch = histories[lo : lo + batch_size]
        items = left_pad(batch, padded_length(batch, model.cfg.max_len)).to(device)
        out.append(model.user_vectors(items, table).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.hidden_size), np.float32)


def plot_learning_curve(csv_paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in csv_paths:
        if path.exists():
            with path.open() as f:
                rows += list(csv.DictReader(f))
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for stage in ("pretrain", "finetune"):
        stage_rows = [r for r in rows if r["stage"] == stage]
        if not stage_rows:
            continue
        x = [offset + int(r["epoch"]) for r in stage_rows]
        ax1.plot(x, [float(r["train_loss"]) for r in stage_rows], marker="o", markersize=2, label=stage)
        ax2.plot(x, [float(r["val_ndcg10"]) for r in stage_rows], marker="o", markersize=2, label=stage)
        offset = x[-1]
    ax1.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax2.set(xlabel="epoch", ylabel="validation NDCG@10", title="Validation NDCG@10 (full ranking)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _load_inputs(features_dir: Path, text_dir: Path, cfg: BertRecConfig):
    """Item text embeddings (text modes: the frozen features, or the whitening statistics of
    the text tower) and item texts (text tower)."""
    text_features, texts, text_dim = None, None, 0
    if "text" in cfg.mode:
        emb = np.load(text_dir / "embeddings.npy")
        text_dim = emb.shape[1]
        text_features = torch.from_numpy(emb)
        if cfg.text_encoder.finetune_layers > 0:
            texts = item_texts(features_dir)
    return text_features, texts, text_dim


# The item texts alone, as a JSON list in item-index order: what `benchmarks.gpu export` writes
# for a machine without polars, read back here in place of the features' items table.
ITEM_TEXTS = "item_texts.json"


def item_texts(features_dir: Path) -> list[str]:
    """Item texts in item-index order, for the text tower."""
    plain = features_dir / ITEM_TEXTS
    if plain.is_file():
        return json.loads(plain.read_text())
    # Here, not at the top: the training path runs where polars is not installed (a GPU machine
    # with PyTorch alone, benchmarks/gpu.py).
    import polars as pl

    return pl.read_parquet(features_dir / "items.parquet").sort("item_idx")["text"].fill_null("").to_list()


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def run_stage(
    stage_name: str, features_dir: Path, text_dir: Path, out_dir: Path, checkpoint_dir: Path, epochs_file: Path,
    cfg: BertRecConfig, seed: int, eval_batch_size: int, init_from: Path | None = None,
    earlier_curve: Path | None = None, run_key: str | None = None, callbacks: list | None = None,
) -> StageResult:
    """Train one stage (`pretrain` or `finetune`) into `out_dir`; see the module docstring.
    Without a `run_key` the stage never resumes. `callbacks`: more Lightning callbacks (a
    tuner's pruning reads each epoch's validation score)."""
    stage = cfg.pretrain if stage_name == "pretrain" else cfg.finetune
    objective = "cloze" if stage_name == "pretrain" else "next"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not stage.enabled:
        _write_skipped(stage_name, out_dir, epochs_file)
        return StageResult(stage_name, out_dir, None, None, None, 0, 0.0, 0.0, False, skipped=True)
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    if torch.cuda.is_available():
        # fp32 matrix products on the tensor cores (TF32): what `32-true` means on a GPU here.
        torch.set_float32_matmul_precision("high")

    pl_.seed_everything(seed, workers=True, verbose=False)
    text_features, texts, text_dim = _load_inputs(features_dir, text_dir, cfg)
    dm = SequenceDataModule(features_dir, cfg.max_len, cfg.batch_size, objective, cfg.mask_prob,
                            eval_batch_size=eval_batch_size, bucket_batches=cfg.bucket_batches)
    dm.setup()
    mcfg = model_config(cfg, dm.n_items, text_dim, inference="cloze" if objective == "cloze" else "causal")
    module = build_module(cfg, stage, objective, mcfg, text_features, texts, dm.item_counts)
    if init_from is not None:
        loaded = load_model(init_from)
        missing, unexpected = module.model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.startswith("text_tower")]:
            raise ValueError(f"pre-trained weights do not match the model: missing {missing}, unexpected {unexpected}")
        log.info("fine-tuning from the pre-trained weights in %s", init_from)

    retrain = stage_name == "finetune" and cfg.refit == "retrain"
    # What `refit: retrain` starts from (pre-trained or fresh weights), before any epoch ran.
    start_state = copy.deepcopy(module.model.state_dict()) if retrain else None
    resume = resume_point(checkpoint_dir, run_key)
    total, trainable = count_parameters(module)
    log.info("%s: %d parameters (%d trainable), %d training sequences, %s",
             stage_name, total, trainable, len(dm.train_sequences),
             f"resuming from {resume}" if resume else "from scratch")

    # Saved at the end of each training epoch (validation has run by then), after the epoch's
    # log row: the checkpoint and the log it carries describe the same epochs.
    checkpoint = pl_.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val_ndcg10", mode="max", save_top_k=1,
        save_on_train_epoch_end=True,
    )
    # Not `save_last=True`: Lightning refreshes that only when the best checkpoint changes, so a
    # run killed after a few epochs without improvement would lose all of them. An unmonitored
    # top-1 checkpoint is rewritten every epoch.
    latest = pl_.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    epoch_log = EpochLog(epochs_file, stage_name, len(dm.train_sequences))
    callbacks = [
        checkpoint, latest,
        pl_.callbacks.EarlyStopping(monitor="val_ndcg10", mode="max", patience=stage.patience),
        epoch_log, *(callbacks or []),
    ]
    if cfg.trainer.check_replicas:
        callbacks.append(ReplicaCheck(out_dir / "replica_check.json"))
    trainer = pl_.Trainer(
        max_epochs=stage.max_epochs, gradient_clip_val=cfg.grad_clip or None, callbacks=callbacks,
        logger=False, default_root_dir=str(out_dir), num_sanity_val_steps=0,
        enable_model_summary=False, enable_progress_bar=interactive(), **trainer_kwargs(cfg.trainer),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    train_seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return StageResult(stage_name, out_dir, None, None, None, trainer.current_epoch, train_seconds, 0.0, resume is not None)

    best = torch.load(checkpoint.best_model_path or latest.best_model_path, map_location="cpu", weights_only=False)
    module.load_state_dict(best["state_dict"])
    best_epoch = int(best["epoch"]) + 1
    best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
    epochs_run = trainer.current_epoch
    seqs_per_s = len(dm.train_sequences) * epochs_run / train_seconds if train_seconds > 0 else 0.0
    # A copy: the refit trains `module` in place, and the validation factors must come from the
    # model that never saw the validation targets.
    selected = copy.deepcopy(module.model).cpu()

    final, refit_epochs = selected, 0
    if retrain:
        pl_.seed_everything(seed, workers=True, verbose=False)
        fresh = build_module(cfg, stage, objective, mcfg, text_features, texts, dm.item_counts)
        fresh.model.load_state_dict(start_state)
        refit_epochs = best_epoch
        final = _refit(fresh, refit_epochs, features_dir, cfg)
    elif stage_name == "finetune" and cfg.refit_epochs > 0:
        refit_epochs = cfg.refit_epochs
        final = _refit(module, refit_epochs, features_dir, cfg)

    model_dir = out_dir / "model"
    save_model(final, model_dir)
    if stage_name == "finetune":
        # The model validation metrics describe (the refitted one has seen validation targets):
        # compression measures its variants on this one.
        save_model(selected, out_dir / "selected_model")
        _write_factors(selected, final, features_dir, out_dir, device=trainer.strategy.root_device)
    curves = ([earlier_curve] if earlier_curve else []) + [epochs_file]
    plot_learning_curve(curves, out_dir / "learning_curve.png")
    summary = {
        "stage": stage_name, "best_epoch": best_epoch, "best_val_ndcg10": best_score, "epochs_run": epochs_run,
        "train_seconds": train_seconds, "sequences_per_second": seqs_per_s, "resumed": resume is not None,
        "resumed_after_epoch": epoch_log.resumed_after if epoch_log.resumed_after is not None else epochs_run,
        "refit": cfg.refit if refit_epochs else None, "refit_epochs": refit_epochs,
        "parameters": total, "trainable_parameters": trainable, "training_sequences": len(dm.train_sequences),
        **trainer_kwargs(cfg.trainer), "initialized_from": str(init_from) if init_from else None,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    # Done: the checkpoints stay for inspection, but nothing may resume from them.
    (checkpoint_dir / RESUME_MARKER).unlink(missing_ok=True)
    return StageResult(stage_name, out_dir, model_dir, best_epoch, best_score, epochs_run, train_seconds, seqs_per_s,
                       resume is not None)


RESUME_MARKER = "resume.json"


def resume_point(checkpoint_dir: Path, run_key: str | None) -> Path | None:
    """`last.ckpt` when an unfinished run with this exact key left it; otherwise the folder is
    emptied and, with a key, marked for this run (so a kill can resume it)."""
    marker = checkpoint_dir / RESUME_MARKER
    last = checkpoint_dir / "last.ckpt"
    if run_key is not None and marker.exists() and last.exists():
        try:
            recorded = json.loads(marker.read_text()).get("run_key")
        except json.JSONDecodeError:  # torn by a kill while being written
            recorded = None
        if recorded == run_key:
            return last
        log.info("checkpoints in %s belong to another run (inputs, settings or code changed): starting over",
                 checkpoint_dir)
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True)
    if run_key is not None:
        marker.write_text(json.dumps({"run_key": run_key}))
    return None


def _write_skipped(stage_name: str, out_dir: Path, epochs_file: Path) -> None:
    """A skipped stage still leaves its declared outputs (DVC), empty and marked as skipped;
    a stale model from an earlier run must not look like this run's."""
    model_dir = out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    (model_dir / "SKIPPED").write_text(f"bert.{stage_name}.enabled is false\n")
    (out_dir / "training.json").write_text(json.dumps({"stage": stage_name, "skipped": True}, indent=2))
    write_epoch_log(epochs_file, [])


def _refit(module: SeqRecModule, epochs: int, features_dir: Path, cfg: BertRecConfig) -> SeqRecModel:
    """Train `module` `epochs` epochs on training + validation sequences."""
    dm = SequenceDataModule(features_dir, cfg.max_len, cfg.batch_size, "next", train_until="test", validate=False,
                            bucket_batches=cfg.bucket_batches)
    trainer = pl_.Trainer(
        max_epochs=epochs, gradient_clip_val=cfg.grad_clip or None, logger=False,
        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
        enable_progress_bar=interactive(),
        **{**trainer_kwargs(cfg.trainer), "devices": 1, "num_nodes": 1, "strategy": "auto"},
    )
    log.info("refit (%s): %d epochs on training + validation sequences", cfg.refit, epochs)
    trainer.fit(module, datamodule=dm)
    return module.model.cpu()


def _write_factors(selected: SeqRecModel, final: SeqRecModel, features_dir: Path, out_dir: Path,
                   device: torch.device | str = "cpu") -> None:
    """Validation factors from the selected model, test factors from the final one, computed on
    the device that trained them (every user's history through the encoder)."""
    seqs = load_sequences(features_dir)
    items, users = {}, {}
    for split, model in (("valid", selected), ("test", final)):
        model.to(device)
        with torch.no_grad():
            items[split] = model.eval().output_items(model.item_representations()).float().cpu().numpy()
        users[split] = user_vectors(model, seqs.histories(split, model.cfg.max_len))
        model.cpu()
    FactorModel(items=items, users=users).save(out_dir / FILE_NAME)
    np.save(out_dir / "item_embeddings.npy", items["test"])


def _use_pretrained(pretrain_dir: Path, pretrain_curve: Path, features_dir: Path, out_dir: Path,
                    epochs_file: Path) -> StageResult:
    """Fine-tuning skipped: the cloze model is the recommender (user vector read at a MASK)."""
    model = load_model(pretrain_dir / "model")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, out_dir / "model")
    save_model(model, out_dir / "selected_model")
    _write_factors(model, model, features_dir, out_dir)
    write_epoch_log(epochs_file, [])
    plot_learning_curve([pretrain_curve], out_dir / "learning_curve.png")
    (out_dir / "training.json").write_text(json.dumps({"stage": "finetune", "skipped": True,
                                                        "model": "pre-trained (cloze)"}, indent=2))
    return StageResult("finetune", out_dir, out_dir / "model", None, None, 0, 0.0, 0.0, False, skipped=True)


def pretrain(features_dir: Path, text_dir: Path, out_dir: Path, checkpoint_dir: Path, epochs_file: Path,
             cfg: BertRecConfig, seed: int, eval_batch_size: int, run_key: str | None = None) -> StageResult:
    """Cloze pre-training (masked items, bidirectional attention)."""
    return run_stage("pretrain", features_dir, text_dir, out_dir, checkpoint_dir, epochs_file, cfg, seed,
                     eval_batch_size, run_key=run_key)


def finetune(features_dir: Path, text_dir: Path, pretrain_dir: Path, pretrain_curve: Path, out_dir: Path,
             checkpoint_dir: Path, epochs_file: Path, cfg: BertRecConfig, seed: int, eval_batch_size: int,
             run_key: str | None = None) -> StageResult:
    """Next-item fine-tuning, from the pre-trained weights when that stage ran."""
    pretrained = cfg.pretrain.enabled and (pretrain_dir / "model" / "config.json").exists()
    if cfg.pretrain.enabled and not pretrained:
        raise MissingInput(f"{pretrain_dir}/model not found: run the pretrain stage first (or disable it)")
    if not cfg.finetune.enabled:  # pre-training is on then: the settings refuse both off
        return _use_pretrained(pretrain_dir, pretrain_curve, features_dir, out_dir, epochs_file)
    return run_stage(
        "finetune", features_dir, text_dir, out_dir, checkpoint_dir, epochs_file, cfg, seed, eval_batch_size,
        init_from=pretrain_dir / "model" if pretrained else None,
        earlier_curve=pretrain_curve if pretrained else None, run_key=run_key,
    )
