"""The promotion gate's decisions, worked by hand; the manual promotion command's refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.config import GateConfig
from flows.promotion import gate

CFG = GateConfig(min_relative_improvement=0.0, tolerance=0.0, latency_budget_ms=10.0)
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
    strict = GateConfig(**{**CFG.__dict__, "min_relative_improvement": 0.05})
    assert not gate({"ndcg@10": 0.104, "recall@10": 0.25}, champ, POP, True, 1.0, strict).promote
    assert gate({"ndcg@10": 0.106, "recall@10": 0.211}, champ, POP, True, 1.0, strict).promote


def test_failed_validation_or_slow_bundle_blocks_promotion():
    good = {"ndcg@10": 0.5, "recall@10": 0.5}
    d = gate(good, None, POP, False, 1.0, CFG)
    assert not d.promote and "data validation FAILED" in d.reason
    d = gate(good, None, POP, True, 12.5, CFG)
    assert not d.promote and "12.50 ms > budget 10 ms" in d.reason


def test_differences_within_the_tolerance_are_ties_and_the_message_shows_them():
    """0.507193 vs 0.507202 used to read "0.5072 < champion 0.5072": two trainings of one model
    differ in the last digits; the tolerance counts that as a tie, and the message says so."""
    champ = {"ndcg@10": 0.507202, "recall@10": 0.61}
    tolerant = GateConfig(min_relative_improvement=0.0, tolerance=0.001, latency_budget_ms=10.0)
    d = gate({"ndcg@10": 0.507193, "recall@10": 0.61}, champ, POP, True, 1.0, tolerant)
    assert d.promote, d.reason
    assert "0.507193 >= champion 0.507202" in d.reason and "tolerance" in d.reason
    # Without the tolerance the same numbers fail, with digits enough to see why.
    d = gate({"ndcg@10": 0.507193, "recall@10": 0.61}, champ, POP, True, 1.0, CFG)
    assert not d.promote and "0.507193 < champion 0.507202" in d.reason
    # A real drop is not a tie.
    assert not gate({"ndcg@10": 0.50, "recall@10": 0.61}, champ, POP, True, 1.0, tolerant).promote


def test_a_manual_promotion_command_refuses_a_missing_artifacts_folder(tmp_path):
    """Its lock would guard nothing there (and the folder would be created): refused by name,
    before MLflow is contacted, and nothing is created."""
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, "-m", "flows.promotion", "rollback", "--to-version", "1",
                           "--artifacts", str(missing)], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"--artifacts {missing}: no such folder" in proc.stderr, proc.stderr[-2000:]
    assert not missing.exists()
