"""`python -m benchmarks.tune`: Optuna studies on the inner holdout, resumed from SQLite, the
best settings as presets, the test split scored per seed; a pruned trial's stage process killed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration

SPACE = {
    "mf": {"mf.factors": {"choice": [8, 16]}, "mf.regularization": {"log": [0.1, 10.0]}},
    "bert": {"bert.finetune.lr": {"log": [1e-3, 5e-3]}, "bert.dropout": {"float": [0.1, 0.3]}},
}


def _settings(tmp_path: Path) -> list[str]:
    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    return [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
            f"bert.text_encoder.cache_dir={tmp_path / 'cache'}", "bert.pretrain.enabled=false", "seed=0"]


def _tune(tmp_path: Path, settings: list[str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.tune", "--dataset", "synthetic", "--workdir", str(tmp_path / "work"),
           "--study-db", str(tmp_path / "studies.db"), "--out", str(tmp_path / "t.json"), *args,
           *[a for s in settings for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_tune_resumes_writes_presets_and_scores_test_per_seed(tmp_path):
    settings = _settings(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    proc = _tune(tmp_path, settings, "--models", "mf,bert", "--space", str(space), "--max-trials", "2",
                 "--score-test", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "t.json").read_text())["synthetic"]
    for model in ("mf", "bert"):
        result = out[model]
        assert [t["state"] for t in result["trials"]] == ["COMPLETE", "COMPLETE"]
        best = max(result["trials"], key=lambda t: t["value"])
        assert result["best"] == best["params"] and result["best_value"] == best["value"]
        assert set(result["best"]) == set(SPACE[model])
        # The preset holds the best settings in a preset's shape and loads over the dataset's.
        preset = yaml.safe_load((tmp_path / f"t.{model}.yaml").read_text())
        section = preset[model]
        flat = {f"{model}.{k}": v for k, v in section.items()} if model == "mf" else \
            {"bert.finetune.lr": section["finetune"]["lr"], "bert.dropout": section["dropout"]}
        assert flat == result["best"]
        assert "inner holdout" in (tmp_path / f"t.{model}.yaml").read_text()
        test = result["test"]
        assert len(test["ndcg@10"]) == 2 and all(0 <= v <= 1 for v in test["ndcg@10"])
        assert test["seeds"] == [0, 1] and test["mean"] == pytest.approx(sum(test["ndcg@10"]) / 2)
    # Trials ran on the inner holdout; the test scoring on the real one, both models of a seed in
    # one root with their best settings.
    inner = yaml.safe_load((tmp_path / "work/synthetic/bert-inner/.pipeline/finetune_bert.params.yaml").read_text())
    assert inner["features"]["holdout"] == "inner"
    for seed in (0, 1):
        run = yaml.safe_load((tmp_path / f"work/synthetic/test-seed{seed}/.pipeline/finetune_bert.params.yaml")
                             .read_text())
        assert run["features"]["holdout"] == "test" and run["seed"] == seed
        assert run["bert"]["dropout"] == out["bert"]["best"]["bert.dropout"]
        assert run["mf"]["factors"] == out["mf"]["best"]["mf.factors"]
    ratios = out["bert_over_mf"]["per_seed"]
    assert len(ratios) == 2 and all(r["ci95"][0] <= r["ratio"] <= r["ci95"][1] for r in ratios)
    assert (tmp_path / "t.png").stat().st_size > 0

    # A second call resumes the stored study: one more trial makes three, the first two kept.
    proc = _tune(tmp_path, settings, "--models", "mf", "--space", str(space), "--max-trials", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "t.json").read_text())["synthetic"]["mf"]
    assert again["study"] == out["mf"]["study"]
    assert [t["number"] for t in again["trials"]] == [0, 1, 2]
    assert [t["params"] for t in again["trials"][:2]] == [t["params"] for t in out["mf"]["trials"]]
    assert again["trials"][2]["params"] not in [t["params"] for t in again["trials"][:2]]  # a new point
    assert again["spent_minutes"] * 60 == pytest.approx(sum(t["seconds"] for t in again["trials"]))
    # With the budget spent, a call only reports the stored study.
    proc = _tune(tmp_path, settings, "--models", "mf", "--space", str(space), "--max-trials", "3")
    assert proc.returncode == 0 and "the study holds 3 trials, --max-trials 3; reporting the stored study" in proc.stderr
    # Other settings are another study, never mixed with this one's trials.
    proc = _tune(tmp_path, [*settings, "mf.iterations=3"], "--models", "mf", "--space", str(space),
                 "--max-trials", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = json.loads((tmp_path / "t.json").read_text())["synthetic"]["mf"]
    assert other["study"] != out["mf"]["study"] and len(other["trials"]) == 1
    # ... and the call says why the stored study did not resume.
    assert (f"a new study {other['study']!r}: the other study of synthetic-mf run last, {out['mf']['study']!r} "
            "(3 trials), ran with other settings: mf.iterations ") in proc.stderr
    assert "-> 3" in proc.stderr.split("ran with other settings: mf.iterations ")[1].splitlines()[0]


def test_a_bad_search_space_is_refused_by_name(tmp_path):
    from benchmarks.tune import check_space
    from tests.conftest import tiny_params

    # Bounds as YAML reads them without a dot (strings) are numbers of the kind's type.
    space = check_space("bert", yaml.safe_load("{bert.finetune.lr: {log: [1e-4, 3e-3]}, bert.num_layers: {int: [1, 3]}}"),
                        tiny_params())
    assert space == {"bert.finetune.lr": {"log": [1e-4, 3e-3]}, "bert.num_layers": {"int": [1, 3]}}
    with pytest.raises(ValueError, match="'bert.dropout': float bounds must be numbers"):
        check_space("bert", {"bert.dropout": {"float": ["low", 0.3]}}, tiny_params())

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"mf": {"mf.factor": {"choice": [8, 16]}}}))
    proc = _tune(tmp_path, [], "--models", "mf", "--space", str(space))
    assert proc.returncode == 2 and "mf.factor" in proc.stderr
    space.write_text(yaml.safe_dump({"mf": {"mf.alpha": {"log": [0, 1]}}}))
    proc = _tune(tmp_path, [], "--models", "mf", "--space", str(space))
    assert proc.returncode == 2 and "'mf.alpha'" in proc.stderr and "positive" in proc.stderr
    # A model tunes its own section only: no space reaches the holdout (or the data, or the seed).
    space.write_text(yaml.safe_dump({"mf": {"features.holdout": {"choice": ["test"]}}}))
    proc = _tune(tmp_path, [], "--models", "mf", "--space", str(space))
    assert proc.returncode == 2 and "'features.holdout'" in proc.stderr and "mf.*" in proc.stderr
    space.write_text(yaml.safe_dump({"bert": {"bert.dropout": {"float": [0.1, 0.3]}}}))
    proc = _tune(tmp_path, [], "--models", "mf", "--space", str(space))
    assert proc.returncode == 2 and "no search space for 'mf'" in proc.stderr
    # An ablation's change is checked before the study runs (no trial, no study stored).
    for change, message in (("bert.nope=3", "unknown key bert.nope"), ("bert.mode=foo", "bert.mode: expected one of"),
                            ("mf.factors=8", "expected bert.KEY=VALUE")):
        proc = _tune(tmp_path, [], "--models", "bert", "--space", str(space), "--ablate", change)
        assert proc.returncode == 2 and message in proc.stderr and "queued" not in proc.stderr, proc.stderr[-2000:]
    # No study and nothing to score: refused, as is a negative count.
    proc = _tune(tmp_path, [], "--models", "bert", "--max-trials", "0")
    assert proc.returncode == 2 and "--max-trials 0 runs no study: give --ablate or --score-test" in proc.stderr
    proc = _tune(tmp_path, [], "--models", "bert", "--max-trials", "-1")
    assert proc.returncode == 2 and "--max-trials at least 0" in proc.stderr
    assert not (tmp_path / "studies.db").exists()


def test_a_pruned_trial_kills_the_stage_process(tmp_path):
    """The pruner stops a trial from its epoch callback, which reads the fine-tuning stage's own
    output: the stage's process is killed at once (it would train its remaining epochs unwatched
    otherwise), and what an earlier trial left in the root is not taken as this one's."""
    from benchmarks.tune import train_and_score, with_settings
    from components import pipeline
    from components.config import load_params
    from components.pipeline import Artifacts

    base = with_settings(load_params(REPO / "params.yaml", [*_settings(tmp_path), "bert.finetune.patience=200"]),
                         {"features.holdout": "inner"})
    art = Artifacts(tmp_path / "art")
    stage = next(s for s in pipeline.STAGES if s.name == "finetune_bert")
    # An earlier trial, complete: two epochs, its curve on disk.
    first = with_settings(base, {"bert.finetune.max_epochs": 2})
    earlier = []
    train_and_score("bert", first, art, lambda epoch, value: earlier.append(epoch))
    assert earlier == [1, 2] and not pipeline.staleness(stage, first, art)

    class Pruned(Exception):
        pass

    seen = []

    def on_epoch(epoch: int, value: float) -> None:
        seen.append((epoch, value))
        raise Pruned

    second = with_settings(base, {"bert.finetune.max_epochs": 200, "bert.dropout": 0.3})
    with pytest.raises(Pruned):
        train_and_score("bert", second, art, on_epoch)
    # Its own first epoch only (not the earlier trial's rows), and the process stopped there:
    # without the kill it would have run (and logged) all 200 epochs before returning.
    assert len(seen) == 1 and seen[0][0] == 1 and 0 <= seen[0][1] <= 1
    rows = art.finetune_epochs.read_text().strip().splitlines()[1:]
    assert 1 <= len(rows) <= 2
    # Neither run's stage is left looking complete.
    assert pipeline.staleness(stage, second, art) and pipeline.staleness(stage, first, art)
