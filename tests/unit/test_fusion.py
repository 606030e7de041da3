"""Score fusion: mixtures rank by the weighted sum of per-user z-scores, and the weight of two
models is chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest

from components.factors import FactorModel
from components.fusion import fuse, mix, tune, user_score_std

SPLITS = ("valid", "test")


def random_models(*dims: int, seed: int = 0) -> list[FactorModel]:
    rng = np.random.default_rng(seed)
    return [FactorModel(items={s: rng.normal(size=(30, d)) for s in SPLITS},
                        users={s: rng.normal(size=(5, d)) for s in SPLITS}) for d in dims]


def test_a_mixture_ranks_by_the_weighted_sum_of_z_scores():
    models = random_models(3, 7, 2)
    weights = [0.3, 0.5, 0.2]
    mixed = mix(models, weights)
    for split in SPLITS:
        z = [(m.users[split] @ m.items[split].T) for m in models]
        z = [(s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True) for s in z]
        direct = sum(w * s for w, s in zip(weights, z))
        got = mixed.users[split] @ mixed.items[split].T
        # Equal up to a per-user constant (the means drop out), so the same ranking.
        assert np.allclose(got - got.mean(1, keepdims=True), direct, atol=1e-4)


def test_two_models_fused_are_what_fuse_gave_before_mix_existed():
    """`fuse` as it was written before `mix` (2026-11-29), spelled out: the same bits, so the
    pipeline's fused model did not move."""
    a, b = random_models(4, 6)
    for w in (0.0, 0.35, 1.0):
        fused = fuse(a, b, w)
        for split in SPLITS:
            sa = user_score_std(a.users[split], a.items[split])[:, None]
            sb = user_score_std(b.users[split], b.items[split])[:, None]
            users = np.concatenate([w * a.users[split] / sa, (1 - w) * b.users[split] / sb], axis=1)
            items = np.concatenate([a.items[split], b.items[split]], axis=1)
            assert np.array_equal(fused.users[split], users.astype(np.float32))
            assert np.array_equal(fused.items[split], items.astype(np.float32))


def test_bad_weights_are_refused():
    a, b = random_models(2, 2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fuse(a, b, 1.5)
    with pytest.raises(ValueError, match="3 fusion weights for 2 models"):
        mix([a, b], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="must not be negative"):
        mix([a, b], [1.2, -0.2])


def test_the_weight_is_the_best_on_validation_ties_to_the_even_mix():
    a, b = random_models(3, 3)
    assert tune(a, b, lambda m: 1.0, 5).weight == 0.5  # every weight ties: the even mix
    peaked = tune(a, b, lambda m: -abs(weight_of_a(m, a) - 0.75), 5)
    assert peaked.weight == pytest.approx(0.75)
    assert [w for w, _ in peaked.validation_curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert np.array_equal(peaked.model.users["test"], fuse(a, b, 0.75).users["test"])
    with pytest.raises(ValueError, match="at least 2"):
        tune(a, b, lambda m: 1.0, 1)


def weight_of_a(fused: FactorModel, a: FactorModel) -> float:
    """The weight `fuse` gave `a`, read back from the fused user vectors."""
    sd = user_score_std(a.users["valid"], a.items["valid"])[0]
    return float(fused.users["valid"][0, 0] * sd / a.users["valid"][0, 0])
