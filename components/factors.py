"""The factor-model file: what every trained model hands to evaluation, fusion and export.

A factor model scores user u and item i as `users[split][u] . items[split][i]`. Matrix
factorization is one directly; a sequence model's user vector is its encoder output for the
user's history; popularity is a 1-d factor model; a score-level fusion is a concatenation of
scaled factor models. A model may use different item vectors per split (MF and BERT are
refitted before test), so each split keeps its own pair.

File format (`factors.npz`): arrays `items_valid`, `users_valid`, `items_test`, `users_test`
(float32; items x d and users x d, users in `user_idx` order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import npz

EVAL_SPLITS = ("valid", "test")
FILE_NAME = "factors.npz"


@dataclass(frozen=True)
class FactorModel:
    """Per split: `items[split]` (n_items x d) and `users[split]` (n_users x d)."""

    items: dict[str, np.ndarray]
    users: dict[str, np.ndarray]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"items_{s}": self.items[s] for s in EVAL_SPLITS}
        arrays.update({f"users_{s}": self.users[s] for s in EVAL_SPLITS})
        npz.save(path, **arrays)

    @classmethod
    def load(cls, path: Path, mapped: bool = False) -> "FactorModel":
        """`mapped`: the arrays memory-mapped read-only (rows are read when used)."""
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train the model first")
        data = npz.load_mapped(path) if mapped else np.load(path)
        return cls(
            items={s: data[f"items_{s}"] for s in EVAL_SPLITS},
            users={s: data[f"users_{s}"] for s in EVAL_SPLITS},
        )
