"""Score-level fusion of factor models, the weight of two tuned on validation.

Each model's scores are standardised per user (z-scores over all items), then mixed:
s = w * z_a + (1 - w) * z_b. With score = u . v, the per-user mean and variance are exact and
cheap: mean_u = u . mu and var_u = u^T C u, with mu and C the mean and covariance of the item
vectors. Since a per-user constant does not change a ranking, the fused model is itself a factor
model: users [w u_a / sd_a, (1 - w) u_b / sd_b], items [v_a, v_b]. So fusion needs no new
scoring path, in evaluation or in serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.factors import EVAL_SPLITS, FactorModel


@dataclass(frozen=True)
class FusionResult:
    model: FactorModel
    weight: float
    validation_curve: list[tuple[float, float]]


def user_score_std(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Standard deviation over items of each user's scores u . v (exact, no score matrix)."""
    centered = items - items.mean(axis=0)
    cov = centered.T @ centered / max(items.shape[0], 1)
    var = np.einsum("ud,de,ue->u", users, cov, users)
    return np.sqrt(np.maximum(var, 1e-12))


def mix(models: list[FactorModel], weights: list[float]) -> FactorModel:
    """sum_i w_i z_i over any number of models, each one's scores z-scored per user, as one
    factor model (the per-user means drop out of a ranking)."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"{len(weights)} fusion weights for {len(models)} models")
    if min(weights) < 0.0:
        raise ValueError(f"fusion weights must not be negative: {list(weights)}")
    items, users = {}, {}
    for split in EVAL_SPLITS:
        users[split] = np.concatenate(
            [w * m.users[split] / user_score_std(m.users[split], m.items[split])[:, None]
             for m, w in zip(models, weights)], axis=1).astype(np.float32)
        items[split] = np.concatenate([m.items[split] for m in models], axis=1).astype(np.float32)
    return FactorModel(items=items, users=users)


def fuse(a: FactorModel, b: FactorModel, weight: float) -> FactorModel:
    """`weight` on `a`, the rest on `b`."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError("fusion weight must be in [0, 1]")
    return mix([a, b], [weight, 1 - weight])


def tune(a: FactorModel, b: FactorModel, score_valid, grid_size: int) -> FusionResult:
    """Pick the weight of `a` with the best validation score (`score_valid(model) -> float`)."""
    if grid_size < 2:
        raise ValueError("fusion.grid_size must be at least 2")
    curve = []
    for w in np.linspace(0.0, 1.0, grid_size):
        curve.append((float(w), float(score_valid(fuse(a, b, float(w))))))
    # Ties go to the weight closest to an even mix (the less extreme choice).
    best_w = max(curve, key=lambda c: (c[1], -abs(c[0] - 0.5)))[0]
    return FusionResult(fuse(a, b, best_w), best_w, curve)
