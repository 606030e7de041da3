"""The features' sequence file, what every model and evaluation read: written by
`components/features.py`, read here, so that training and evaluation do not depend on how
features are built (a change there does not make a model stale unless its output changes).

`sequences.npz`: per-user chronological sequences as CSR-style arrays: `indptr` (users + 1),
`items` (item indices), `timestamps`, `weights`, `split` codes (0 train, 1 valid, 2 test);
the item count comes from `stats.json` beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from components import npz

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
FILE_NAME = "sequences.npz"


def write_sequences(features_dir: Path, indptr: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                    weights: np.ndarray, split: np.ndarray) -> None:
    npz.save(features_dir / FILE_NAME, indptr=indptr, items=items, timestamps=timestamps, weights=weights, split=split)


@dataclass(frozen=True)
class Sequences:
    """Per-user chronological sequences, CSR-style: user u owns items[indptr[u]:indptr[u+1]]."""

    indptr: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    weights: np.ndarray
    split: np.ndarray
    n_items: int

    @property
    def n_users(self) -> int:
        return self.indptr.size - 1

    def user_of_position(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.indptr))

    def _matrix(self, mask: np.ndarray, weighted: bool = False) -> sp.csr_matrix:
        rows = self.user_of_position()[mask]
        values = self.weights[mask].astype(np.float32) if weighted else np.ones(rows.size, np.float32)
        m = sp.csr_matrix((values, (rows, self.items[mask])), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        return m

    def history_matrix(self, split: str, weighted: bool = False) -> sp.csr_matrix:
        """Interactions a model may see when predicting `split`: everything before it.

        Values are interaction counts, or summed weights when `weighted`."""
        return self._matrix(self.split < SPLIT_CODES[split], weighted)

    def target_matrix(self, split: str) -> sp.csr_matrix:
        return self._matrix(self.split == SPLIT_CODES[split])

    def histories(self, split: str, max_len: int | None = None) -> list[np.ndarray]:
        """Each user's chronological item sequence before `split` (last `max_len` items)."""
        keep = self.split < SPLIT_CODES[split]
        out = []
        for u in range(self.n_users):
            lo, hi = self.indptr[u], self.indptr[u + 1]
            seq = self.items[lo:hi][keep[lo:hi]]
            out.append(seq[-max_len:] if max_len else seq)
        return out


def places_from_end(lengths: np.ndarray) -> np.ndarray:
    """For rows of `lengths` laid end to end, each entry's place from the end of its row
    (..., 1, 0), in 32-bit where it fits (at 100M entries a tenth of the 64-bit version's time)."""
    lengths = np.asarray(lengths)
    total = int(lengths.sum())
    index = np.int32 if total < 2**31 else np.int64
    places = np.repeat(np.cumsum(lengths, dtype=index), lengths)
    places -= np.arange(1, total + 1, dtype=index)
    return places


def recency_factor(from_end, half_life: float, boost: float):
    """How much an interaction counts by its recency: 1 + boost * 0.5^(k / half_life), k = how
    many later interactions its sequence has (0 = the most recent). One definition for MF's
    confidence and the sequence model's loss weights; works on numpy arrays and torch tensors."""
    return 1.0 + boost * 0.5 ** (from_end / half_life)


def load_sequences(features_dir: Path, mapped: bool = False) -> Sequences:
    """`mapped`: the arrays memory-mapped read-only, read when used (ALS never reads the 100M
    timestamps of a 100M-interaction table)."""
    data = npz.load_mapped(features_dir / FILE_NAME) if mapped else np.load(features_dir / FILE_NAME)
    stats = json.loads((features_dir / "stats.json").read_text())
    return Sequences(
        indptr=data["indptr"],
        items=data["items"],
        timestamps=data["timestamps"],
        weights=data["weights"],
        split=data["split"],
        n_items=int(stats["n_items"]),
    )


