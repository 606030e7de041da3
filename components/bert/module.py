"""The LightningModule: losses, full-ranking validation, optimiser and schedule.

Objectives (one shared step):
- `next`: next-item prediction with causal attention; every position predicts its next item.
- `cloze`: masked item modelling with bidirectional attention; masked positions predict their
  item (BERT4Rec). Its user vector (validation) is read at a MASK appended after the history.

Losses:
- `full`: softmax cross-entropy over every item (the default).
- `sampled`: softmax over the positive and `num_negatives` items drawn from a proposal Q (uniform
  or popularity^0.75), with the log-Q correction (each logit minus log Q(item)) that makes the
  sampled softmax an unbiased estimate of the full one, and accidental hits masked. Only the
  items involved get representations computed, so it scales to catalogues where the full softmax
  does not.
Either can weigh targets by recency (`recency_half_life` > 0): a target with k later items in its
sequence counts 1 + recency_boost * 0.5^(k / recency_half_life), MF's confidence factor
(`components.sequences.recency_factor`). The last interactions are the most like the event to
predict next (Petrov & Macdonald 2022 train on recency-sampled targets for the same reason).

No full-softmax step waits on the GPU (the sampled loss still does, in `torch.unique`): training
batches carry the flat indices of their target positions
(`components.bert.data.target_positions`, computed by the collate on the CPU), so the loss gathers
a known number of rows instead of boolean-indexing on the device.

Compilation (`compile_encoder`, `bert.trainer.compile`): the training steps' encoder call through
`torch.compile` with dynamic shapes, so batches padded to different widths share one graph. The
module keeps the compiled function beside the network, never inside it: the weights, their
checkpoints and the copies the stage keeps for export stay plain eager modules.

Validation: full ranking over every item with the user's history excluded (the foundation's
protocol and metric code), NDCG@10 and Recall@10, summed over all ranks under DDP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from components import metrics
from components.bert.data import target_positions
from components.bert.dropout import use_packed_dropout
from components.bert.model import SeqRecConfig, SeqRecModel
from components.sequences import recency_factor

EVAL_K = 10


class SeqRecModule(pl.LightningModule):
    def __init__(
        self,
        model_cfg: dict[str, Any],
        objective: str,
        lr: float,
        weight_decay: float,
        warmup_fraction: float,
        loss: str = "full",
        num_negatives: int = 256,
        negative_sampling: str = "popularity",
        item_counts: np.ndarray | None = None,
        text_features: torch.Tensor | None = None,
        texts: list[str] | None = None,
        recency_half_life: float = 0.0,
        recency_boost: float = 0.0,
    ):
        super().__init__()
        if objective not in ("next", "cloze"):
            raise ValueError("objective must be 'next' or 'cloze'")
        if loss not in ("full", "sampled"):
            raise ValueError("loss must be 'full' or 'sampled'")
        # Big tensors stay out of the hyperparameters (they are in the state dict).
        self.save_hyperparameters(ignore=["item_counts", "text_features", "texts"])
        self.model = SeqRecModel(SeqRecConfig(**model_cfg), text_features=text_features, texts=texts)
        self.objective = objective
        n_items = model_cfg["n_items"]
        counts = torch.ones(n_items) if item_counts is None else torch.as_tensor(item_counts, dtype=torch.float)
        proposal = (counts + 1.0) ** 0.75 if negative_sampling == "popularity" else torch.ones(n_items)
        self.register_buffer("proposal", proposal / proposal.sum(), persistent=False)
        self._eval_sums = torch.zeros(3, dtype=torch.float64)
        # `bert.trainer.compile` and `compile_mode` (set by `build_module`).
        self.compile_setting = False
        self.compile_mode = "default"
        self._compiled_encode = None
        # `bert.trainer.packed_dropout` (set by `build_module`): on a CPU only.
        self.packed_dropout_setting = False
        # The data module's `positions_per_batch` (length-bucketed batches): a batch's summed loss
        # is divided by it instead of by its own positions. None: the mean over the batch.
        self.loss_normaliser: float | None = None

    def compile_encoder(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Train through a compiled `SeqRecModel.encode` (see the module docstring)."""
        options = {"mode": mode} if mode and mode != "default" else {}
        self._compiled_encode = torch.compile(self.model.encode, dynamic=True, backend=backend, **options)

    def on_fit_start(self) -> None:
        data = self._trainer.datamodule if self._trainer is not None else None
        self.loss_normaliser = getattr(data, "positions_per_batch", None)
        if self.loss_normaliser is not None and self.hparams.recency_half_life > 0:
            # Bucketed batches divide their weighted sum by the average batch's total weight.
            self.loss_normaliser *= self._mean_weight([len(s) - 1 for s in data.train_sequences])
        # A compiled encoder draws its masks in the generated code (and dynamo breaks its graph
        # on the packed draws), so packing is for eager training only.
        if self.packed_dropout_setting and self.device.type == "cpu" and not self.compile_setting:
            use_packed_dropout(self.model.encoder)
        if self.compile_setting and self._compiled_encode is None:
            self.compile_encoder(mode=self.compile_mode)

    # ---- training ------------------------------------------------------------------------

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Loss over the target positions: their mean, or with `loss_normaliser` (bucketed
        batches) their sum divided by it; `positions` = `target_positions(targets)` as the collate
        made them (computed from `targets` when omitted: a device sync on a GPU)."""
        causal = self.objective == "next"
        if positions is None:
            positions = target_positions(targets)
        positives = targets.reshape(-1).index_select(0, positions)
        weights = None
        if self.hparams.recency_half_life > 0:
            # Positions are right-aligned: a target's column says how many later items its
            # sequence has.
            width = targets.shape[1]
            weights = recency_factor((width - 1 - positions % width).float(), self.hparams.recency_half_life,
                                     self.hparams.recency_boost)
        m = self.model
        encode = self._compiled_encode or m.encode

        def at_targets(hidden: torch.Tensor) -> torch.Tensor:
            return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)

        if self.hparams.loss == "full":
            table = m.item_representations()
            hidden = m.output_users(at_targets(encode(inputs, table, causal=causal)))
            return self._cross_entropy(hidden @ m.output_items(table).T, positives, weights)

        negatives = torch.multinomial(self.proposal, self.hparams.num_negatives, replacement=True)
        needed = torch.unique(torch.cat([inputs[inputs >= 0], positives, negatives]))
        lookup = torch.full((self.model.cfg.n_items,), -1, dtype=torch.long, device=inputs.device)
        lookup[needed] = torch.arange(needed.numel(), device=inputs.device)
        table = m.item_representations(needed)
        local_inputs = torch.where(inputs >= 0, lookup[inputs.clamp(min=0)], inputs)
        hidden = m.output_users(at_targets(encode(local_inputs, table, causal=causal)))
        out = m.output_items(table)
        log_q = torch.log(self.proposal)
        pos_logit = (hidden * out[lookup[positives]]).sum(-1, keepdim=True) - log_q[positives, None]
        neg_logit = hidden @ out[lookup[negatives]].T - log_q[negatives][None, :]
        neg_logit = neg_logit.masked_fill(negatives[None, :] == positives[:, None], float("-inf"))
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        return self._cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device), weights)

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            if self.loss_normaliser is None:
                return F.cross_entropy(logits, targets)
            return F.cross_entropy(logits, targets, reduction="sum") / self.loss_normaliser
        losses = F.cross_entropy(logits, targets, reduction="none") * weights
        return losses.sum() / (weights.sum() if self.loss_normaliser is None else self.loss_normaliser)

    def _mean_weight(self, target_counts: list[int]) -> float:
        """The average recency weight of a target position over sequences with these many targets."""
        longest = max(target_counts, default=0)
        if longest == 0:
            return 1.0
        per_place = recency_factor(np.arange(longest, dtype=np.float64), self.hparams.recency_half_life,
                                   self.hparams.recency_boost)
        cumulative = np.concatenate([[0.0], np.cumsum(per_place)])
        counts = np.asarray(target_counts)
        return float(cumulative[counts].sum() / counts.sum())

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        inputs, targets, *positions = batch
        loss = self._loss(inputs, targets, *positions)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=inputs.shape[0], sync_dist=True)
        return loss

    # ---- validation ----------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._table = self.model.item_representations()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        table = self._table
        scores = self.ranking_scores(self.model.user_vectors(batch["items"], table), table)
        scores[batch["exclude_rows"], batch["exclude_cols"]] = float("-inf")
        k = min(EVAL_K, scores.shape[1])
        topk = torch.topk(scores, k, dim=1).indices.cpu().numpy()
        rows, cols = batch["target_rows"].cpu().numpy(), batch["target_cols"].cpu().numpy()
        targets = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=scores.shape)
        hit = metrics.hits(topk, targets)
        n_targets = np.diff(targets.indptr)
        ndcg = metrics.ndcg_at_k(hit, n_targets, k).sum()
        recall = metrics.recall_at_k(hit, n_targets, k).sum()
        self._eval_sums += torch.tensor([ndcg, recall, topk.shape[0]], dtype=torch.float64, device=self.device)

    def ranking_scores(self, users: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Every item's score for each user, in fp32 even under bf16-mixed: autocast would round
        the scores to 8 bits of mantissa, turning near ties among thousands of items into a coin
        toss."""
        with torch.autocast(users.device.type, enabled=False):
            return users.float() @ self.model.output_items(table).float().T

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        n = max(float(sums[2]), 1.0)
        # Already identical on every rank after the reduce: no further sync needed.
        self.log("val_ndcg10", float(sums[0]) / n, prog_bar=True)
        self.log("val_recall10", float(sums[1]) / n, prog_bar=True)
        del self._table

    # ---- optimisation --------------------------------------------------------------------

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # Biases and LayerNorm gains are not decayed (the usual AdamW practice).
            (no_decay if p.ndim < 2 else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            # One kernel for every parameter on a GPU: the step is otherwise bound by launching
            # them. Not under fp16's gradient scaler, whose unscaling a fused step takes over.
            fused=self.device.type == "cuda" and not self._scaled_gradients(),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_fraction * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            # Linear decay to 10% of the peak rate at the last scheduled step.
            progress = (step - warmup) / max(1, total - warmup)
            return max(0.1, 1.0 - 0.9 * progress)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


    def _scaled_gradients(self) -> bool:
        return self._trainer is not None and str(self.trainer.precision).startswith("16")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Gradients are clipped here, by norm, unless fp16 scales them: Lightning's bf16 plugin
        refuses to clip for a fused optimizer although bf16 gradients are never scaled."""
        if self._scaled_gradients():
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val
            )


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable

