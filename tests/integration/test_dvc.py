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


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
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


def test_dvc_repro_then_experiment_changes_metrics(dvc_repo):
    dvc(dvc_repo, "repro")
    metrics = json.loads((dvc_repo / "artifacts" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"popularity", "mf", "bert", "fused"}
    assert (dvc_repo / "artifacts" / "bert" / "learning_curve.png").exists()
    assert (dvc_repo / "dvc.lock").exists()
    assert (dvc_repo / "artifacts" / "bundle" / "bundle.json").exists()

    again = dvc(dvc_repo, "repro")
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    assert "Running stage" not in again.stdout

    subprocess.run(["git", "add", "-A"], cwd=dvc_repo, check=True, env=git_env())
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=dvc_repo, check=True, env=git_env())
    exp = dvc(dvc_repo, "exp", "run", "-S", "mf.factors=4")
    # Only the stages downstream of the changed parameter ran.
    assert "Running stage 'train_mf'" in exp.stdout and "Running stage 'evaluate'" in exp.stdout
    assert "Running stage 'features'" not in exp.stdout and "Running stage 'finetune_bert'" not in exp.stdout
    assert "Running stage 'compress'" not in exp.stdout
    diff = dvc(dvc_repo, "metrics", "diff", "--json")
    changes = json.loads(diff.stdout)
    mf_ndcg = changes["artifacts/eval/metrics.json"]["mf.ndcg@10"]
    assert mf_ndcg["old"] != mf_ndcg["new"]
    params = dvc(dvc_repo, "params", "diff", "--json")
    assert json.loads(params.stdout)["params.yaml"]["mf.factors"]["new"] == 4
