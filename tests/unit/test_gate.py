"""The promotion gate's decisions, worked by hand."""

from __future__ import annotations

from components.config import RegistryConfig
from components.register import gate

CFG = RegistryConfig(tracking_uri=None, experiment="x", model_name="m", min_relative_improvement=0.0, latency_budget_ms=10.0)
POP = {"ndcg@10": 0.02, "recall@10": 0.05}


def test_first_model_must_beat_popularity():
    assert gate({"ndcg@10": 0.03, "recall@10": 0.06}, None, POP, True, 1.0, CFG).promote
    d = gate({"ndcg@10": 0.02, "recall@10": 0.06}, None, POP, True, 1.0, CFG)
    assert not d.promote and "popularity" in d.reason and not d.checks["beats_popularity"]


def test_challenger_against_champion_on_both_metrics():
    champ = {"ndcg@10": 0.10, "recall@10": 0.20}
    assert gate({"ndcg@10": 0.10, "recall@10": 0.20}, champ, POP, True, 1.0, CFG).promote  # equal passes at 0
    d = gate({"ndcg@10": 0.12, "recall@10": 0.19}, champ, POP, True, 1.0, CFG)
    assert not d.promote and d.checks == {"data_validation": True, "latency": True, "ndcg@10": True, "recall@10": False}
    strict = RegistryConfig(**{**CFG.__dict__, "min_relative_improvement": 0.05})
    assert not gate({"ndcg@10": 0.104, "recall@10": 0.25}, champ, POP, True, 1.0, strict).promote
    assert gate({"ndcg@10": 0.106, "recall@10": 0.211}, champ, POP, True, 1.0, strict).promote


def test_failed_validation_or_slow_bundle_blocks_promotion():
    good = {"ndcg@10": 0.5, "recall@10": 0.5}
    d = gate(good, None, POP, False, 1.0, CFG)
    assert not d.promote and "data validation FAILED" in d.reason
    d = gate(good, None, POP, True, 12.5, CFG)
    assert not d.promote and "12.50 ms > budget 10 ms" in d.reason
