"""Score-level fusion of two factor models, the weight tuned on validation.

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


def fuse(a: FactorModel, b: FactorModel, weight: float) -> FactorModel:
    if not 0.0 <= weight <= 1.0:
        raise ValueError("fusion weight must be in [0, 1]")
    items, users = {}, {}
    for split in EVAL_SPLITS:
        ua, ub = a.users[split], b.users[split]
        sa = user_score_std(ua, a.items[split])[:, None]
        sb = user_score_std(ub, b.items[split])[:, None]
        users[split] = np.concatenate([weight * ua / sa, (1 - weight) * ub / sb], axis=1).astype(np.float32)
        items[split] = np.concatenate([a.items[split], b.items[split]], axis=1).astype(np.float32)
    return FactorModel(items=items, users=users)


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
