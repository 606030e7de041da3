"""The components as a user runs them: one `python -m components.<step>` process each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration


def cli(step: str, artifacts: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"components.{step}", "--artifacts", str(artifacts)]
    for o in [*TINY, *overrides]:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_pipeline_end_to_end(tmp_path):
    from components.pipeline import STAGES

    art = tmp_path / "artifacts"
    for stage in STAGES:  # each stage's own command, in the declared order (what DVC runs)
        proc = cli(stage.command.removeprefix("components."), art, f"bert.text_encoder.cache_dir={tmp_path / 'cache'}")
        assert proc.returncode == 0, f"{stage.name}: {proc.stderr[-2000:]}"
        # Library chatter users cannot act on is filtered out (it used to drown the output).
        output = proc.stdout + proc.stderr
        for noise in ("torchvision is not installed", "Tip:", "GPU available", "LOAD REPORT", "Traceback"):
            assert noise not in output, f"{stage.name}: {noise!r} in its output"
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"popularity", "mf", "bert", "fused"}
    assert metrics["mf"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]
    fusion = json.loads((art / "eval" / "fusion.json").read_text())
    assert 0.0 <= fusion["weight"] <= 1.0 and len(fusion["validation_curve"]) == 21
    assert "| mf |" in proc.stdout
    assert (art / "validation" / "data_docs" / "index.html").exists()
    assert (art / "eval" / "recall_at_k.png").exists()
    check_bundle(art)
    shown = subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--artifacts", str(art), "--show"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert shown.returncode == 0 and "| popularity |" in shown.stdout


def check_bundle(art: Path) -> None:
    """The bundle holds what bundle.json says, byte for byte, and its graphs run."""
    import hashlib

    import numpy as np

    from components.onnx_graphs import session, tokenize

    bundle = art / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"bundle.json"}
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == digest, rel
    assert {"sequence.onnx", "text_encoder.onnx", "mf.onnx", "tokenizer/tokenizer.json"} <= on_disk
    assert manifest["sequence"]["variant"] in ("onnx_fp32", "onnx_int8")
    assert manifest["package_versions"]["onnxruntime"]
    report = json.loads((art / "compress" / "report.json").read_text())
    assert report["sequence"]["parity"]["max_abs_diff"] < 1e-4
    assert report["sequence"]["parity"]["min_top10_identical"] >= 0.99
    text = report["text_encoder"]
    assert text["variants"]["onnx_int8"]["size_mb"] * 3.5 < text["variants"]["onnx_fp32"]["size_mb"]
    assert text["variants"]["onnx_int8"]["cosine_to_fp32"] > 0.98
    # INT8 is served only when both the text embedding and the item vector keep the cosine.
    int8 = text["variants"]["onnx_int8"]
    keeps = int8["cosine_to_fp32"] >= 0.99 and int8["item_vector_cosine_to_fp32"] >= 0.98
    assert text["variant"] == ("onnx_int8" if keeps else "onnx_fp32")

    # A new item's text -> its item vector, without PyTorch.
    feeds = tokenize(bundle / "tokenizer", ["Vintage hiking tent with poles"], manifest["text_encoder"]["max_length"])
    _, item_vector = session(bundle / manifest["text_encoder"]["file"]).run(None, feeds)
    assert item_vector.shape == (1, manifest["model_config"]["hidden_size"]) and np.isfinite(item_vector).all()
    parity = json.loads((art / "metrics" / "export.json").read_text())["parity"]
    assert parity["mf"]["top10_identical"] == 1.0


def test_invalid_data_stops_the_pipeline(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"u{u % 30},i{u % 17},{1_600_000_000 + u}" for u in range(300)]
    rows[5] = "u1,ghost,1600000005"
    rows[6] = "u2,i3,-42"
    (raw / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    (raw / "items.csv").write_text("item_id,title,description\n" + "\n".join(f"i{i},Item {i},x" for i in range(17)) + "\n")
    art = tmp_path / "artifacts"
    source = ["data.source=files", f"data.path={raw}"]
    proc = cli("validate", art, *source)
    assert proc.returncode == 1
    assert "VALIDATION FAILED" in proc.stderr
    assert "item_id_known" in proc.stderr and "'ghost'" in proc.stderr
    assert "timestamp_not_too_old" in proc.stderr and "-42" in proc.stderr
    assert not (art / "data").exists()
    # The next stage refuses to run without a validated snapshot, and writes nothing.
    proc = cli("features", art, *source)
    assert proc.returncode != 0 and "run validation first" in proc.stderr
    assert not (art / "features" / "sequences.npz").exists()


def test_bad_source_is_a_clear_error(tmp_path):
    proc = cli("validate", tmp_path / "a", "data.source=movielens-100k", f"data.path={tmp_path / 'none'}")
    assert proc.returncode == 2
    assert "MovieLens-100K not found" in proc.stderr and "Traceback" not in proc.stderr
