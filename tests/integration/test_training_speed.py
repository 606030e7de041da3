"""`python -m benchmarks.training_speed` on the tiny synthetic dataset: the pipeline's stages
feed the product's training module, every variant is measured in the same run with its
settings applied, and the ratios and the plot come out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration


def test_variants_side_by_side(tmp_path):
    encoder = make_tiny_bert(tmp_path / "encoder")
    sets = [a for o in [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
                        "bert.dropout=0.3"] for a in ("--set", o)]
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "-m", "benchmarks.training_speed", "--dataset", "synthetic", "--variants",
           "before,buckets+compile,packed+buckets", "--epochs", "1", "--repeats", "2", "--workdir", str(tmp_path / "w"),
           "--out", str(out), *sets]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["datasets"]["synthetic"]
    # 150 users, batches of 64: every epoch is whole, one to warm up and one timed.
    assert row["batches_per_epoch"] == row["timed_steps"] == row["warmup_steps"] == 3
    variants = row["variants"]
    assert list(variants) == ["before", "buckets+compile", "packed+buckets"]
    # "before" is the dataset's own dropout on the attention weights, whatever the default is now.
    assert variants["before"]["overrides"] == ["bert.attention_dropout=0.3", "bert.bucket_batches=0",
                                               "bert.trainer.packed_dropout=false", "bert.trainer.compile=false"]
    assert variants["packed+buckets"]["overrides"] == ["bert.attention_dropout=0.3", "bert.bucket_batches=4",
                                                       "bert.trainer.packed_dropout=true", "bert.trainer.compile=false"]
    assert variants["before"]["speedup_vs_before"] == 1.0
    for name, v in variants.items():
        assert len(v["runs_sequences_per_second"]) == 2 and v["sequences_per_second"] > 0, name
        ratio = v["sequences_per_second"] / variants["before"]["sequences_per_second"]
        assert v["speedup_vs_before"] == pytest.approx(ratio, abs=1e-3)
    # The compiled variant really went through dynamo: one graph of the whole encoder.
    compiled = variants["buckets+compile"]
    assert compiled["graphs"] >= 1 and compiled["graph_breaks"] == 0
    assert variants["before"]["graphs"] == 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["command"].startswith("python -m benchmarks.training_speed --dataset synthetic")


def test_text_tower_variants_and_a_step_count(tmp_path):
    """The text encoder's top layer fine-tuned, its frozen layers recomputed or cached, beside
    the frozen embeddings: timed for the steps asked, the cache's one-off cost reported."""
    encoder = make_tiny_bert(tmp_path / "encoder")
    sets = [a for o in [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24"]
            for a in ("--set", o)]
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "-m", "benchmarks.training_speed", "--dataset", "synthetic", "--variants",
           "text-tower,text-tower-cached,text-frozen", "--steps", "2", "--warmup-steps", "1", "--repeats", "1",
           "--workdir", str(tmp_path / "w"), "--out", str(out), *sets]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in eval mode at the start of training" not in proc.stderr
    row = json.loads(out.read_text())["datasets"]["synthetic"]
    assert row["timed_steps"] == 2 and row["warmup_steps"] == 1
    variants = row["variants"]
    assert variants["text-tower"]["overrides"] == ["bert.mode=text+id", "bert.text_encoder.finetune_layers=1",
                                                   "bert.text_encoder.cache_frozen=false"]
    assert variants["text-frozen"]["overrides"][1] == "bert.text_encoder.finetune_layers=0"
    assert [name for name, v in variants.items() if "text_cache_seconds" in v] == ["text-tower-cached"]
    assert all(v["sequences_per_second"] > 0 for v in variants.values())


def test_unknown_variant_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training_speed", "--variants", "before,fast",
                           "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--variants: unknown fast; choose from before," in proc.stderr
