"""`dvc repro` in a temporary git copy of the project, on a shrunk params.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import apply_overrides
from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration


def project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [f for f in out if (REPO / f).is_file() and not f.startswith(("tests/", "benchmarks/"))]


def make_repo(tmp_path: Path) -> Path:
    """A git copy of the project whose params.yaml is the real one, shrunk."""
    repo = tmp_path / "repo"
    for rel in project_files():
        dest = repo / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    # A tiny text encoder: the stages (embeddings, compression, export) run as with MiniLM, faster.
    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    overrides = [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24"]
    (repo / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, check=True, env=git_env())
    return repo


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`dvc repro` from scratch, committed (the expensive part, shared by the journeys below)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc"))
    first = dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    return repo, first


@pytest.fixture
def dvc_repo(reproduced, tmp_path) -> Path:
    """A private copy of the reproduced repository (workspace, DVC cache and git history)."""
    copy = tmp_path / "repo"
    shutil.copytree(reproduced[0], copy, symlinks=True)
    return copy


def git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    # The stages run `python -m ...`: the interpreter running the tests must come first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=git_env(), timeout=600
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, env=git_env(), capture_output=True, text=True).stdout


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json").stdout))


def test_dvc_repro_then_experiment_changes_metrics(reproduced, dvc_repo):
    assert "Running stage 'finetune_bert'" in reproduced[1].stdout
    metrics = json.loads((dvc_repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"popularity", "mf", "bert", "fused"}
    assert (dvc_repo / "artifacts" / "bert" / "learning_curve.png").exists()
    assert (dvc_repo / "dvc.lock").exists()
    assert (dvc_repo / "artifacts" / "bundle" / "bundle.json").exists()
    # After a repro nothing is stale, bytecode compiled by the stages included.
    assert changed_stages(dvc_repo) == set()

    again = dvc(dvc_repo, "repro")
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    assert "Running stage" not in again.stdout

    # The metrics and curves are small files git tracks: the baseline commit holds them.
    tracked = git(dvc_repo, "ls-files", "artifacts").split()
    assert "artifacts/metrics/evaluate.json" in tracked and "artifacts/metrics/finetune_bert_epochs.csv" in tracked

    exp = dvc(dvc_repo, "exp", "run", "-S", "mf.factors=4")
    # Only the stages downstream of the changed parameter ran.
    assert "Running stage 'train_mf'" in exp.stdout and "Running stage 'evaluate'" in exp.stdout
    assert "Running stage 'features'" not in exp.stdout and "Running stage 'finetune_bert'" not in exp.stdout
    assert "Running stage 'compress'" not in exp.stdout
    diff = dvc(dvc_repo, "metrics", "diff", "--json")
    changes = json.loads(diff.stdout)
    mf_ndcg = changes["artifacts/metrics/evaluate.json"]["test.mf.ndcg@10"]
    assert mf_ndcg["old"] != mf_ndcg["new"]
    assert "failed to load" not in diff.stderr
    params = dvc(dvc_repo, "params", "diff", "--json")
    assert json.loads(params.stdout)["params.yaml"]["mf.factors"]["new"] == 4

    # The experiment beside its baseline: every metric loads in both (no "!"), and the
    # README's column selection keeps the table to what changed.
    shown = dvc(dvc_repo, "exp", "show", "--only-changed", "--csv")
    rows = list(__import__("csv").DictReader(shown.stdout.splitlines()))
    assert len(rows) >= 2 and all("!" not in row.values() for row in rows), shown.stdout[:2000]
    columns = list(rows[0])
    assert "mf.factors" in columns and "test.mf.ndcg@10" in columns and len(columns) < 60, columns
    plots = dvc(dvc_repo, "plots", "diff", "HEAD", "--json")
    assert "recall_at_k" in plots.stdout and "finetune_epochs" in plots.stdout


def test_retraining_after_a_code_change_trains_from_scratch(dvc_repo):
    """A change in the BERT code reruns exactly the stages that run that code, from the first
    epoch, with a full per-epoch log (a left-over checkpoint is never resumed)."""
    before = json.loads((dvc_repo / "artifacts" / "bert" / "training.json").read_text())
    train = dvc_repo / "components" / "bert" / "train.py"
    train.write_text(train.read_text() + "\n# a change in the training code\n")
    stale = changed_stages(dvc_repo)
    assert {"pretrain_bert", "finetune_bert", "compress"} <= stale and not stale & {"validate", "features", "train_mf"}
    out = dvc(dvc_repo, "repro")
    assert "Running stage 'finetune_bert'" in out.stdout and "Running stage 'train_mf'" not in out.stdout
    for stage, folder in (("pretrain_bert", "pretrain"), ("finetune_bert", "bert")):
        training = json.loads((dvc_repo / "artifacts" / folder / "training.json").read_text())
        assert training["resumed"] is False and training["train_seconds"] > 0, training
        log = (dvc_repo / "artifacts" / "metrics" / f"{stage}_epochs.csv").read_text().splitlines()
        assert len(log) == 1 + training["epochs_run"], log
    after = json.loads((dvc_repo / "artifacts" / "bert" / "training.json").read_text())
    assert after["epochs_run"] == before["epochs_run"]
    assert changed_stages(dvc_repo) == set()


def test_a_flow_run_in_the_workspace_leaves_dvc_clean(dvc_repo):
    """The Prefect flow and `dvc repro` share the stages' keys: after a repro the flow finds
    everything up to date, and a flow run after a settings change records itself in dvc.lock."""
    raw = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    raw["mf"]["factors"] = 8
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert changed_stages(dvc_repo) == {"train_mf"}  # DVC names the first stale stage of a chain
    env = {**git_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    flow = subprocess.run([sys.executable, "-m", "flows.training"], cwd=dvc_repo, capture_output=True, text=True,
                          env=env, timeout=900)
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
    assert "Skipped (up to date): validate, features, item_text_embeddings, pretrain_bert, finetune_bert, compress" \
        in flow.stdout, flow.stdout[-2000:]
    assert "Traceback" not in flow.stdout + flow.stderr
    assert changed_stages(dvc_repo) == set()


def test_the_committed_lock_matches_the_committed_code(tmp_path):
    """On a fresh clone, `dvc status` finds no stage whose code, settings or source moved since
    dvc.lock was written (only outputs are missing: they live in a DVC cache the clone lacks).
    Whoever changes a stage's code runs `make repro` and commits dvc.lock with the metrics."""
    tracked = subprocess.run(["git", "ls-files", "--cached"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    clone = tmp_path / "clone"
    for rel in tracked:
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=clone, check=True, env=git_env())
    status = json.loads(dvc(clone, "status", "--json").stdout)
    moved = {stage: {path: what for entry in changes if isinstance(entry, dict)
                     for path, what in entry.get("changed deps", {}).items()
                     if not path.startswith("artifacts/")}
             for stage, changes in status.items()}
    assert not {s: m for s, m in moved.items() if m}, f"dvc.lock is older than the code: {moved}"
