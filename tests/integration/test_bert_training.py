"""The BERT recommender's training on tiny data: stages, DDP, resume, text tower, cold start."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from components import pipeline
from components.config import Params
from components.evaluate import evaluate_split
from components.factors import FactorModel
from components.features import build_features, id_sort_key
from components.sequences import load_sequences
from components.pipeline import Artifacts
from tests.bert_helpers import TINY_BERT_OVERRIDES, make_tiny_bert
from tests.conftest import REPO, TINY, tiny_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def bert_overrides(tiny_bert: Path, cache: Path) -> list[str]:
    return [*TINY_BERT_OVERRIDES, f"bert.text_encoder.path={tiny_bert}", f"bert.text_encoder.cache_dir={cache}"]


@pytest.fixture
def prepared(tmp_path, tiny_bert) -> tuple[Path, Params, list[str]]:
    """Validated data, features and text embeddings for the tiny config; returns the artifacts
    folder, the params and the overrides that produced them."""
    overrides = bert_overrides(tiny_bert, tmp_path / "cache")
    params = tiny_params(*overrides)
    art = tmp_path / "artifacts"
    pipeline.run(params, Artifacts(art), until="item_text_embeddings")
    return art, params, overrides


def stage(name: str, params: Params, art: Path):
    """One stage, in this process, with its declared inputs and outputs."""
    return pipeline.call(pipeline.STAGE[name], params, Artifacts(art))


def pretrain(params: Params, art: Path):
    return stage("pretrain_bert", params, art)


def finetune(params: Params, art: Path):
    return stage("finetune_bert", params, art)


def cli(stage: str, art: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", f"components.bert.{stage}", "--artifacts", str(art)]
    for o in [*TINY, *overrides]:
        cmd += ["--set", o]
    return cmd


def test_text_embeddings_are_cached(prepared):
    art, params, _ = prepared
    again = stage("item_text_embeddings", params, art)
    assert again.computed == 0 and again.cached == again.n_items
    emb = np.load(art / "text_embeddings" / "embeddings.npy")
    assert emb.shape == (again.n_items, 16) and np.isfinite(emb).all()


def test_pretrain_then_finetune_outputs(prepared):
    art, params, _ = prepared
    pre = pretrain(params, art)
    assert pre.model_dir and (pre.model_dir / "config.json").exists()
    fine = finetune(params, art)
    out = art / "bert"
    for name in ("model/config.json", "model/model.safetensors", "item_embeddings.npy", "factors.npz",
                 "learning_curve.png", "training.json"):
        assert (out / name).exists(), name
    for name in ("best.ckpt", "last.ckpt"):
        assert (art / "checkpoints" / "finetune_bert" / name).exists(), name
    epochs_log = art / "metrics" / "finetune_bert_epochs.csv"
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["inference"] == "causal" and cfg["mode"] == "text+id"
    training = json.loads((out / "training.json").read_text())
    assert training["initialized_from"].endswith("pretrain/model")
    assert training["precision"] == "32-true"  # CPU default
    rows = list(csv.DictReader(epochs_log.open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, fine.epochs_run + 1))
    assert all(0.0 <= float(r["val_ndcg10"]) <= 1.0 for r in rows)
    factors = FactorModel.load(out / "factors.npz")
    seqs = load_sequences(art / "features")
    assert factors.users["test"].shape == (seqs.n_users, 16)


def test_bert_learns_the_sequential_signal(prepared):
    """On the synthetic data (next item = successor in its topic half the time) a small model
    trained for seconds ranks the next item far better than popularity."""
    art, params, _ = prepared
    from components.config import apply_overrides, params_from_dict
    from components.evaluate import popularity_model

    p = params_from_dict(apply_overrides(params.to_dict(), [
        "bert.pretrain.enabled=false", "bert.finetune.max_epochs=20", "bert.finetune.lr=0.005", "bert.hidden_size=32",
    ]))
    finetune(p, art)
    seqs = load_sequences(art / "features")
    counts = np.diff(seqs.history_matrix("valid").indptr)
    no_head = np.zeros(seqs.n_items, bool)
    bert = evaluate_split(FactorModel.load(art / "bert" / "factors.npz"), seqs, "test", p.evaluation, counts, no_head)[0]
    pop = evaluate_split(popularity_model(seqs.history_matrix("valid"), seqs.n_users), seqs, "test", p.evaluation,
                         counts, no_head)[0]
    assert bert["recall@10"] > 2 * pop["recall@10"]


def test_two_process_ddp_keeps_replicas_identical(prepared):
    art, _, overrides = prepared
    ddp = [*overrides, "bert.pretrain.enabled=false", "bert.finetune.max_epochs=1", "bert.refit_epochs=0",
           "bert.trainer.devices=2", "bert.trainer.strategy=ddp", "bert.trainer.check_replicas=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cli("finetune", art, ddp), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((art / "bert" / "replica_check.json").read_text())
    assert check["world_size"] == 2
    assert len(check["parameter_sha256_per_rank"]) == 2
    assert check["identical"] is True
    assert json.loads((art / "bert" / "training.json").read_text())["strategy"] == "ddp"


def kill_after_epochs(cmd: list[str], log: Path, epochs: int) -> None:
    """Start a training CLI and SIGKILL it once `epochs` epochs have been logged."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= epochs + 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_run_resumes_from_last_checkpoint(prepared):
    art, _, overrides = prepared
    run = [*overrides, "bert.pretrain.enabled=false", "bert.finetune.max_epochs=30", "bert.finetune.patience=100",
           "bert.refit_epochs=0"]
    metrics = art / "metrics" / "finetune_bert_epochs.csv"
    kill_after_epochs(cli("finetune", art, run), metrics, 3)
    done_before = len(metrics.read_text().splitlines()) - 1
    last = torch.load(art / "checkpoints" / "finetune_bert" / "last.ckpt", map_location="cpu", weights_only=False)
    checkpointed = last["epoch"] + 1
    # Every finished epoch is checkpointed, not only improving ones; the kill can land between
    # an epoch's log row and its checkpoint, so at most one logged epoch is lost.
    assert done_before >= 3 and checkpointed >= done_before - 1
    # DVC removes a stage's outputs before running it: the log comes back from the checkpoint.
    metrics.unlink()

    again = subprocess.run(cli("finetune", art, run), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    training = json.loads((art / "bert" / "training.json").read_text())
    assert training["resumed"] is True
    assert training["resumed_after_epoch"] == checkpointed
    # The second run continued after the last checkpointed epoch; an epoch logged but not
    # checkpointed was trained again and logged once.
    epochs = [int(r["epoch"]) for r in csv.DictReader(metrics.open())]
    assert epochs == list(range(1, 31))

    # A finished run is never resumed: the same command trains again from the first epoch.
    third = subprocess.run(cli("finetune", art, run), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    training = json.loads((art / "bert" / "training.json").read_text())
    assert training["resumed"] is False and training["epochs_run"] == 30
    assert [int(r["epoch"]) for r in csv.DictReader(metrics.open())] == list(range(1, 31))


def test_a_killed_run_is_not_resumed_with_other_settings(prepared):
    """The resume marker holds the stage's key (inputs, settings, code): a change in any of them
    starts over instead of continuing someone else's weights."""
    art, _, overrides = prepared
    run = [*overrides, "bert.pretrain.enabled=false", "bert.finetune.max_epochs=30", "bert.finetune.patience=100",
           "bert.refit_epochs=0"]
    metrics = art / "metrics" / "finetune_bert_epochs.csv"
    kill_after_epochs(cli("finetune", art, run), metrics, 3)
    assert (art / "checkpoints" / "finetune_bert" / "last.ckpt").exists()
    changed = [*run[:-1], "bert.refit_epochs=0", "bert.dropout=0.3", "bert.finetune.max_epochs=4"]
    proc = subprocess.run(cli("finetune", art, changed), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "belong to another run" in proc.stderr
    training = json.loads((art / "bert" / "training.json").read_text())
    assert training["resumed"] is False and training["epochs_run"] == 4
    assert [int(r["epoch"]) for r in csv.DictReader(metrics.open())] == [1, 2, 3, 4]


def test_last_checkpoint_follows_every_epoch_not_only_improving_ones(prepared):
    art, _, overrides = prepared
    # lr = 0: validation never improves after the first epoch.
    frozen = [*overrides, "bert.pretrain.enabled=false", "bert.finetune.max_epochs=3", "bert.finetune.lr=0",
              "bert.finetune.patience=100", "bert.refit_epochs=0"]
    proc = subprocess.run(cli("finetune", art, frozen), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = art / "checkpoints" / "finetune_bert"
    assert torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_text_tower_fine_tunes_a_tiny_bert_end_to_end(prepared):
    art, params, _ = prepared
    from components.config import apply_overrides, params_from_dict

    p = params_from_dict(apply_overrides(params.to_dict(), [
        "bert.text_encoder.finetune_layers=1", "bert.mode=text", "bert.pretrain.enabled=false",
        "bert.finetune.max_epochs=2", "bert.refit_epochs=0", "bert.loss=sampled", "bert.num_negatives=32",
    ]))
    from transformers import AutoModel

    before = AutoModel.from_pretrained(p.bert.text_encoder.path).state_dict()
    finetune(p, art)
    from components.bert.model import load_model

    tuned = load_model(art / "bert" / "model")
    assert tuned.text_tower is not None and tuned.cfg.text_finetune_layers == 1
    after = tuned.text_tower.encoder.state_dict()
    top = "encoder.layer.1.attention.self.query.weight"
    bottom = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(before[top], after[top]), "the top layer must train"
    assert torch.allclose(before[bottom], after[bottom]), "the bottom layer must stay frozen"


def test_cold_items_are_recommended_through_their_text(tmp_path, tiny_bert):
    """Items absent from training are still retrieved for users whose next item they are."""
    overrides = bert_overrides(tiny_bert, tmp_path / "cache")
    params = tiny_params(*overrides, "data.synthetic.n_users=400", "data.synthetic.n_interactions=8000",
                         "bert.mode=text", "bert.pretrain.enabled=false", "bert.finetune.max_epochs=15",
                         "bert.finetune.lr=0.005", "bert.refit_epochs=0", "bert.max_len=8")
    art = tmp_path / "artifacts"
    pipeline.run(params, Artifacts(art), until="validate")
    inter = pl.read_parquet(art / "data" / "interactions.parquet")
    # Hold out 10% of the items: they keep only their occurrences as some user's last item.
    items = sorted(inter["item_id"].unique().to_list())
    rng = np.random.default_rng(0)
    held = set(rng.choice(items, size=len(items) // 10, replace=False).tolist())
    # Ties broken by item id, as features do: polars' default sort leaves tied rows in any
    # order, which would make a different item "last" from run to run.
    inter = inter.sort([id_sort_key("user_id", inter), "timestamp", id_sort_key("item_id", inter)]).with_columns(
        last=pl.int_range(pl.len()).over("user_id") == pl.len().over("user_id") - 1
    )
    inter = inter.filter(~pl.col("item_id").is_in(list(held)) | pl.col("last")).drop("last")
    inter.write_parquet(art / "data" / "interactions.parquet")
    build_features(art / "data", art / "features", params.features)
    stage("item_text_embeddings", params, art)
    finetune(params, art)

    seqs = load_sequences(art / "features")
    item_ids = pl.read_parquet(art / "features" / "items.parquet")["item_id"].to_list()
    cold = np.array([i in held for i in item_ids])
    train_items = set(seqs.items[seqs.split == 0].tolist())
    assert not any(cold[i] for i in train_items), "held-out items must be absent from training"
    targets = seqs.target_matrix("test")
    cold_users = [u for u in range(seqs.n_users) if targets[u].indices.size and cold[targets[u].indices[0]]]
    assert len(cold_users) >= 10
    model = FactorModel.load(art / "bert" / "factors.npz")
    from components.evaluate import rank

    top = rank(model.users["test"][cold_users], model.items["test"], seqs.history_matrix("test")[cold_users], 10, 256)
    hits = np.mean([targets[u].indices[0] in top[i] for i, u in enumerate(cold_users)])
    chance = 10 / seqs.n_items
    assert hits > 3 * chance, f"cold-item recall@10 {hits:.3f} vs chance {chance:.3f}"


def test_stages_can_be_skipped(prepared):
    art, params, _ = prepared
    from components.config import apply_overrides, params_from_dict

    def with_(*o):
        return params_from_dict(apply_overrides(params.to_dict(), list(o)))

    # Pre-training skipped: outputs exist (for DVC) and say so; fine-tuning starts from scratch.
    p = with_("bert.pretrain.enabled=false", "bert.finetune.max_epochs=1", "bert.refit_epochs=0")
    assert pretrain(p, art).skipped
    assert (art / "pretrain" / "model" / "SKIPPED").exists()
    res = finetune(p, art)
    assert json.loads((art / "bert" / "training.json").read_text())["initialized_from"] is None
    assert not res.skipped

    # Fine-tuning skipped: the cloze model is the recommender.
    p = with_("bert.pretrain.max_epochs=1", "bert.finetune.enabled=false")
    pretrain(p, art)
    res = finetune(p, art)
    assert res.skipped and res.model_dir is not None
    assert json.loads((art / "bert" / "model" / "config.json").read_text())["inference"] == "cloze"
    assert (art / "bert" / "factors.npz").exists()


@pytest.mark.parametrize("refit", ["continue", "retrain"])
def test_validation_factors_come_from_the_model_selected_before_the_refit(prepared, refit):
    """The refit trains on validation targets: validation scores must not come from it."""
    art, params, _ = prepared
    from components.bert.model import SeqRecConfig, SeqRecModel
    from components.bert.train import user_vectors
    from components.config import apply_overrides, params_from_dict

    p = params_from_dict(apply_overrides(params.to_dict(), ["bert.pretrain.enabled=false", "bert.refit_epochs=2",
                                                            f"bert.refit={refit}", "bert.finetune.max_epochs=3"]))
    res = finetune(p, art)
    summary = json.loads((art / "bert" / "training.json").read_text())
    # continue: the fixed extra epochs; retrain: as many epochs as selection chose.
    assert summary["refit"] == refit
    assert summary["refit_epochs"] == (2 if refit == "continue" else res.best_epoch)
    best = torch.load(art / "checkpoints" / "finetune_bert" / "best.ckpt", map_location="cpu", weights_only=False)
    model = SeqRecModel(SeqRecConfig.load(art / "bert" / "model" / "config.json"))
    model.load_state_dict({k[len("model."):]: v for k, v in best["state_dict"].items() if k.startswith("model.")})
    seqs = load_sequences(art / "features")
    factors = FactorModel.load(art / "bert" / "factors.npz")
    expected = user_vectors(model, seqs.histories("valid", model.cfg.max_len))
    np.testing.assert_allclose(factors.users["valid"], expected, rtol=1e-4, atol=1e-5)
    # ...while the test factors come from the refitted (deployed) model.
    assert not np.allclose(factors.users["test"], user_vectors(model, seqs.histories("test", model.cfg.max_len)))
