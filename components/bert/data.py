"""Training and validation batches for the sequence recommender (a LightningDataModule).

Training sequences are each user's chronological items before `train_until` ("valid": the
training split; "test": training + validation, for the refit), cut to the last max_len + 1.
- next-item objective: input = seq[:-1], target = seq[1:] (every position predicts its next item)
- cloze objective: input = seq with random positions replaced by MASK (at least one), target =
  the original item at masked positions
Both are left-padded with PAD so that the most recent item sits at the last position, to the
batch's longest sequence rather than max_len (`padded_length`): positions are right-aligned, so
the model computes the same thing, and batches of short histories cost what they hold.

Validation batches hold, per user with a validation target: the history before validation,
the items to exclude from the ranking (that history) and the targets, as (row, column) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from components.bert.model import MASK, PAD, left_pad, padded_length
from components.sequences import load_sequences


class _ListDataset(Dataset):
    def __init__(self, rows: list):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def target_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) indices of the positions of `targets` [B, L] that hold an item. Worked
    out here, on the CPU, and carried with the batch: the loss gathers these rows instead of
    boolean-indexing on the device, a device-to-host sync that left a GPU idle while the host
    queued the rest of the step."""
    return (targets.reshape(-1) != PAD).nonzero().squeeze(1)


class LengthBucketSampler(Sampler[int]):
    """A shuffled order in which every `batch_size` consecutive sequences have similar lengths.

    Batches are padded to their longest history, so a random batch is as wide as its longest
    member. Here the shuffled sequences are cut into pools of `pool_batches` batches, each pool
    is sorted by length and cut into batches, and the batches are shuffled; the one short batch
    (of the last pool) comes last, so a DataLoader's batches fall on the same boundaries. Pools
    keep batches random across epochs: a pool of the whole dataset would fix each batch's
    members.

    The order comes from the sampler's own generator, seeded once from torch's (which the stages
    seed) and advanced by one per epoch: under DDP every rank draws the same order whatever else
    its training consumed from the global generator, and Lightning's sampler wrapper hands each
    rank every world-size-th index of it (neighbours in a sorted pool: still similar lengths)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, pool_batches: int):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError("batch_size and pool_batches must be >= 1")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.pool = batch_size, batch_size * pool_batches
        self.seed = int(torch.randint(0, 2**62, (1,)))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        full, short = [], []
        for lo in range(0, order.size, self.pool):
            pool = order[lo : lo + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            for i in range(0, pool.size, self.batch_size):
                (full if pool.size - i >= self.batch_size else short).append(pool[i : i + self.batch_size])
        for b in torch.randperm(len(full), generator=generator).tolist():
            yield from full[b].tolist()
        for batch in short:
            yield from batch.tolist()


@dataclass
class NextItemCollate:
    max_len: int

    def __call__(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = [s[:-1] for s in seqs], [s[1:] for s in seqs]
        width = padded_length(inputs, self.max_len)
        targets = left_pad(targets, width)
        return left_pad(inputs, width), targets, target_positions(targets)


@dataclass
class ClozeCollate:
    max_len: int
    mask_prob: float

    def __call__(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = left_pad(seqs, padded_length(seqs, self.max_len))
        real = items != PAD
        masked = (torch.rand(items.shape) < self.mask_prob) & real
        # Every sequence gets at least one masked position: its most recent item, which also
        # matches how the model is used (predict the position after the history).
        none = ~masked.any(dim=1)
        masked[none, -1] = True
        targets = torch.where(masked, items, torch.full_like(items, PAD))
        inputs = torch.where(masked, torch.full_like(items, MASK), items)
        return inputs, targets, target_positions(targets)


@dataclass
class EvalCollate:
    max_len: int
    histories: list[np.ndarray]
    exclude_indptr: np.ndarray
    exclude_indices: np.ndarray
    target_indptr: np.ndarray
    target_indices: np.ndarray

    def _pairs(self, users: list[int], indptr: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [np.full(indptr[u + 1] - indptr[u], r) for r, u in enumerate(users)]
        cols = [indices[indptr[u] : indptr[u + 1]] for u in users]
        return torch.as_tensor(np.concatenate(rows), dtype=torch.long), torch.as_tensor(np.concatenate(cols), dtype=torch.long)

    def __call__(self, users: list[int]) -> dict[str, torch.Tensor]:
        ex_rows, ex_cols = self._pairs(users, self.exclude_indptr, self.exclude_indices)
        t_rows, t_cols = self._pairs(users, self.target_indptr, self.target_indices)
        histories = [self.histories[u] for u in users]
        return {
            "items": left_pad(histories, padded_length(histories, self.max_len)),
            "exclude_rows": ex_rows,
            "exclude_cols": ex_cols,
            "target_rows": t_rows,
            "target_cols": t_cols,
        }


class SequenceDataModule(pl.LightningDataModule):
    def __init__(
        self,
        features_dir: Path,
        max_len: int,
        batch_size: int,
        objective: str,
        mask_prob: float = 0.2,
        train_until: str = "valid",
        eval_batch_size: int = 512,
        validate: bool = True,
        bucket_batches: int = 0,
    ):
        """`bucket_batches` > 0: training batches drawn by `LengthBucketSampler` with pools of
        that many batches (0: a plain shuffle), and `positions_per_batch` set for the loss.

        Why the loss needs it: a batch's loss is the mean over its target positions. In a random
        batch every position weighs about 1 / (the average batch's positions); in a bucketed one
        a position of a short history would weigh far more than one of a long history, which
        changes what is learned (MovieLens-100K, inner split: NDCG@10 0.0996 with the per-batch
        mean against 0.1105 with the fixed scale, seed 0; benchmarks/README.md "CPU fine-tuning
        speed"). Dividing each batch's summed loss by the epoch's average positions per batch
        weighs every position alike again. Next-item training only: cloze batches keep their
        mean (their masked positions are drawn per batch)."""
        super().__init__()
        if objective not in ("next", "cloze"):
            raise ValueError("objective must be 'next' or 'cloze'")
        self.features_dir = Path(features_dir)
        self.max_len = max_len
        self.batch_size = batch_size
        self.objective = objective
        self.mask_prob = mask_prob
        self.train_until = train_until
        self.eval_batch_size = eval_batch_size
        self.validate = validate
        self.bucket_batches = bucket_batches

    def setup(self, stage: str | None = None) -> None:
        seqs = load_sequences(self.features_dir)
        self.n_items = seqs.n_items
        min_len = 2 if self.objective == "next" else 1
        keep = self.max_len + 1 if self.objective == "next" else self.max_len
        self.train_sequences = [h[-keep:] for h in seqs.histories(self.train_until) if len(h) >= min_len]
        self.item_counts = np.bincount(seqs.history_matrix(self.train_until).indices, minlength=seqs.n_items)
        # Next-item targets: every item of a kept sequence but the first (cloze masks at random).
        self.positions_per_batch = None
        if self.bucket_batches > 0 and self.objective == "next" and self.train_sequences:
            positions = sum(len(s) - 1 for s in self.train_sequences)
            self.positions_per_batch = positions / -(-len(self.train_sequences) // self.batch_size)
        if self.validate:
            targets = seqs.target_matrix("valid")
            exclude = seqs.history_matrix("valid")
            self.eval_users = np.flatnonzero(np.diff(targets.indptr) > 0).tolist()
            self.eval_collate = EvalCollate(
                self.max_len, seqs.histories("valid", self.max_len),
                exclude.indptr, exclude.indices, targets.indptr, targets.indices,
            )

    def train_dataloader(self) -> DataLoader:
        collate = (
            NextItemCollate(self.max_len) if self.objective == "next" else ClozeCollate(self.max_len, self.mask_prob)
        )
        sampler = None
        if self.bucket_batches > 0:
            # The width a sequence needs in its batch (the next-item collate drops its last item).
            lengths = np.fromiter((len(s) for s in self.train_sequences), dtype=np.int64, count=len(self.train_sequences))
            sampler = LengthBucketSampler(lengths, self.batch_size, self.bucket_batches)
        return DataLoader(_ListDataset(self.train_sequences), batch_size=self.batch_size, shuffle=sampler is None,
                          sampler=sampler, collate_fn=collate, pin_memory=self._pin())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_ListDataset(self.eval_users), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.eval_collate, pin_memory=self._pin())

    def _pin(self) -> bool:
        """Page-locked batches when training on a GPU: the copy to the device runs asynchronously.
        Not on a CPU run on a GPU machine, where pinning would only start a CUDA context."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
