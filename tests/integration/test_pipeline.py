"""The components as a user runs them: one `python -m components.<step>` process each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
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
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"features reads {art / 'data'}, missing or empty: run validate first" in proc.stderr
    assert not (art / "features" / "sequences.npz").exists()


def test_bad_source_is_a_clear_error(tmp_path):
    proc = cli("validate", tmp_path / "a", "data.source=movielens-100k", f"data.path={tmp_path / 'none'}")
    assert proc.returncode == 2
    assert "MovieLens-100K not found" in proc.stderr and "Traceback" not in proc.stderr


# ---- data guards: each test reproduces a hole found by hand ---------------------------------


def files_source(raw: Path, interactions: bytes, items: bytes) -> list[str]:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "interactions.csv").write_bytes(interactions)
    (raw / "items.csv").write_bytes(items)
    return ["data.source=files", f"data.path={raw}", "validation.min_interactions=1", "validation.min_users=1",
            "validation.weight_min=null", "validation.weight_max=null"]


ITEMS = b"item_id,title\n" + b"\n".join(b"i%d,Item %d" % (i, i) for i in range(5)) + b"\n"


def test_ids_are_read_as_written(tmp_path):
    """Ids are labels: "007" and "7" are two users, "0001" stays "0001", and one missing cell
    fails by name instead of turning every id into "9.0"."""
    rows = [b"007,i1,1600000000", b"7,i2,1600000001", b"0001,i3,1600000002", b"0001,i4,1600000003"]
    source = files_source(tmp_path / "raw", b"user_id,item_id,timestamp\n" + b"\n".join(rows) + b"\n", ITEMS)
    art = tmp_path / "a"
    assert cli("validate", art, *source).returncode == 0
    users = sorted(pl.read_parquet(art / "data" / "interactions.parquet")["user_id"].unique().to_list())
    assert users == ["0001", "007", "7"]
    rows[1] = b",i2,1600000001"
    source = files_source(tmp_path / "raw2", b"user_id,item_id,timestamp\n" + b"\n".join(rows) + b"\n", ITEMS)
    proc = cli("validate", tmp_path / "b", *source)
    assert proc.returncode == 1 and "user_id_not_null" in proc.stderr
    assert ".0'" not in proc.stderr and "Traceback" not in proc.stderr


def test_undecodable_bytes_in_ids_fail_validation(tmp_path):
    rows = "José,i1,1600000000\nJosè,i2,1600000001\nana,i3,1600000002\n".encode("latin-1")
    source = files_source(tmp_path / "raw", b"user_id,item_id,timestamp\n" + rows, ITEMS)
    proc = cli("validate", tmp_path / "a", *source)  # data.files.encoding is utf-8
    assert proc.returncode == 1 and "user_id_decodable" in proc.stderr, proc.stderr[-2000:]


def test_features_refuse_a_snapshot_of_another_source_and_a_failed_validation_voids_it(tmp_path):
    art = tmp_path / "artifacts"
    a = files_source(tmp_path / "A", b"user_id,item_id,timestamp\n" + b"\n".join(
        b"u%d,i%d,%d" % (u % 3, u % 5, 1_600_000_000 + u) for u in range(40)) + b"\n", ITEMS)
    features_ok = ["features.min_user_interactions=0", "features.min_item_interactions=0"]
    assert cli("validate", art, *a).returncode == 0
    assert cli("features", art, *a, *features_ok).returncode == 0
    b = [o.replace(str(tmp_path / "A"), str(tmp_path / "B")) for o in a]
    proc = cli("features", art, *b, *features_ok)  # validated A, asked for B
    assert proc.returncode == 2 and "validated from another source" in proc.stderr
    assert str(tmp_path / "A") in proc.stderr and str(tmp_path / "B") in proc.stderr and "Traceback" not in proc.stderr
    # B is corrupt: validation fails, and what was built from A's snapshot goes with it.
    files_source(tmp_path / "B", b"user_id,item_id,timestamp\nu1,ghost,-5\n", ITEMS)
    assert cli("validate", art, *b).returncode == 1
    assert not (art / "data").exists() and not (art / "features").exists()
    assert not (art / ".pipeline" / "features.json").exists()


def test_a_stage_before_its_inputs_or_settings_that_leave_nothing_are_clear_errors(tmp_path):
    """Found by hand: both ended in a traceback (exit 1) instead of a message naming what to do."""
    art = tmp_path / "artifacts"
    proc = cli("train_mf", art)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"train_mf reads {art / 'features'}, missing or empty: run validate and features first" in proc.stderr
    assert f"python -m components.pipeline run --until train_mf --artifacts {art}" in proc.stderr
    source = files_source(tmp_path / "raw", b"user_id,item_id,timestamp\n" + b"\n".join(
        b"u%d,i%d,%d" % (u % 3, u % 5, 1_600_000_000 + u) for u in range(40)) + b"\n", ITEMS)
    assert cli("validate", art, *source).returncode == 0
    proc = cli("features", art, *source, "features.min_user_interactions=400")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "k-core filtering removed every interaction; lower features.min_user_interactions" in proc.stderr
    # The failed run leaves an empty features folder: the next stage still says what to run.
    proc = cli("train_mf", art)
    assert proc.returncode == 2 and "run features first" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("bert.finetune", art, *source, "features.min_user_interactions=0", "features.min_item_interactions=0")
    assert proc.returncode == 2 and "run features, item_text_embeddings and pretrain_bert first" in proc.stderr


def test_a_folder_where_a_file_belongs_is_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    (raw / "interactions.csv").mkdir(parents=True)
    (raw / "items.csv").write_bytes(ITEMS)
    proc = cli("validate", tmp_path / "a", "data.source=files", f"data.path={raw}")
    assert proc.returncode == 2 and "is a folder, not a data file" in proc.stderr and "Traceback" not in proc.stderr
