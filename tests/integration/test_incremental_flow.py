"""The `incremental` flow against a real MLflow server and the Prefect test harness: a champion
from the training flow, events recorded by the service's store after it, an update that
registers a child version with its lineage, then a run with nothing new that does nothing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration


def test_update_registers_a_child_nothing_new_does_nothing_and_drift_retrains(services, tmp_path):
    import polars as pl
    from mlflow import MlflowClient

    from components.config import load_params
    from flows.incremental import incremental
    from flows.lock import FolderBusy, folder_lock
    from flows.training import training
    from serving.store import EventStore

    uri, _ = services
    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    db = tmp_path / "events.db"
    settings = [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
                f"bert.text_encoder.cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}",
                "tracking.model_name=incremental-model", "gate.latency_budget_ms=1000", f"online.db={db}",
                "bert.pretrain.enabled=false", "bert.finetune.max_epochs=10", "bert.finetune.lr=0.005",
                "incremental.min_events=20", "incremental.steps=20",
                # The update must become the champion for the second run to start from it: a
                # tolerant gate (the gate itself is tested with the training flow).
                "gate.min_relative_improvement=-0.5"]
    art = tmp_path / "artifacts"
    params_file = str(REPO / "params.yaml")
    first = training(settings, params_file, str(art))
    assert first["promoted"], first["reason"]

    # What the service records after the champion: known users on known items, a new item added
    # through /items with its text, and five events training would refuse.
    data = pl.read_parquet(art / "data" / "interactions.parquet")
    users = data["user_id"].unique().sort().to_list()[:40]
    items = data["item_id"].unique().sort().to_list()
    rng = np.random.default_rng(0)
    now = int(time.time()) - 3600
    store = EventStore(db)
    store.add_item("i-new", "Premium antique scroll with a quilt")
    rows = [(u, items[int(rng.integers(len(items)))], now + i, 3.0) for i, u in enumerate(users * 3)]
    rows += [(u, "i-new", now + 200 + i, 4.0) for i, u in enumerate(users[:10])]
    recorded = data.row(0, named=True)
    refused = [("u-bad", "no-such-item", now, 3.0), ("u-bad", items[0], -5, 3.0), ("u-bad", items[1], now, None),
               ("u-bad", items[2], now, 9.0),  # outside validation's weight range (1-5)
               (recorded["user_id"], recorded["item_id"], recorded["timestamp"], recorded["weight"])]
    rows += refused
    store.add_many(rows)
    last_seq = store.last_seq()
    store.close()

    # The events were received a moment ago: they wait out incremental.settle_seconds (60 s).
    settling = incremental(settings, params_file, str(art))
    assert settling["action"] == "nothing", settling
    assert f"{len(rows)} more received in the last 60 s wait for the next run" in settling["reason"]
    settings.append("incremental.settle_seconds=0")

    # While the training flow holds the folder, this hour is skipped; the training flow itself
    # waits (incremental.lock_wait_seconds) and then fails naming the holder.
    with folder_lock(art, "training", 0):
        busy = incremental(settings, params_file, str(art))
        with pytest.raises(FolderBusy, match="in use by the training run .*; waited 1 s"):
            training([*settings, "incremental.lock_wait_seconds=1"], params_file, str(art))
    assert busy["action"] == "nothing" and "in use by the training run" in busy["reason"], busy

    result = incremental(settings, params_file, str(art))
    assert result["action"] == "incremental", result["reason"]
    assert result["version"] == 2 and result["promoted"], result["gate"]
    client = MlflowClient(uri, uri)
    v2 = client.get_model_version("incremental-model", "2")
    tags = v2.tags
    assert tags["parent_version"] == "1" and tags["update_kind"] == "incremental"
    assert tags["events_watermark"] == str(last_seq) and tags["window_first_seq"] == "1"
    assert tags["window_events"] == str(len(rows) - 5) and tags["window_quarantined"] == "5"
    assert tags["updates_since_full"] == "1" and tags["artifacts_root"] == result["root"]
    assert tags["gate"] == "passed"
    # Every quarantined event is kept, with its reason.
    quarantine = pl.read_csv(f"{result['root']}/window/quarantine.csv")
    reasons = " | ".join(quarantine["reason"].to_list())
    assert quarantine.height == 5
    for reason in ("item unknown", "before", "no weight", "above 5.0", "exact duplicate"):
        assert reason in reasons, reasons
    # The update's run: drift, the update and the evaluation, and the bundle it registered.
    run = client.get_run(tags["run_id"])
    assert run.data.tags["recforge.kind"] == "incremental" and run.data.tags["decision"] == "incremental"
    metrics = run.data.metrics
    assert metrics["drift.window.events"] == len(rows) - 5
    assert metrics["update.bert.new_items"] == 1 and metrics["update.bert.changed_sequences"] == 40
    assert "test.bert.ndcg_at_10" in metrics and "update.bert.updated_window_ndcg10" in metrics
    # The new item is in the registered bundle's catalogue.
    catalogue = pl.read_parquet(f"{result['root']}/features/items.parquet")["item_id"].to_list()
    assert "i-new" in catalogue

    # Nothing new since: nothing is done, and no version registered.
    again = incremental(settings, params_file, str(art))
    assert again["action"] == "nothing" and again["reason"].startswith("0 new events"), again
    assert again["champion_version"] == "2"
    assert max(int(v.version) for v in client.search_model_versions("name='incremental-model'")) == 2

    # A window where a block of brand-new items takes most events: the drift rule sends it to a
    # full retrain (the training flow on the champion's data plus the window).
    store = EventStore(db)
    for k in range(10):
        store.add_item(f"i-block-{k}", f"Classic hiking quilt number {k}")
    block = [(u, f"i-block-{i % 10}", now + 1000 + i, 5.0) for i, u in enumerate(users * 2)]
    store.add_many(block + [(u, items[0], now + 2000 + i, 2.0) for i, u in enumerate(users[:10])])
    store.close()
    # A root a failed run left behind goes once keep_roots is reached; the roots the flow may
    # start from again (the champion's, its rollback target's) stay.
    leftover = art / "incremental" / "20000101T000000000000"
    (leftover / "window").mkdir(parents=True)
    full = incremental([*settings, "incremental.keep_roots=1"], params_file, str(art))
    assert full["action"] == "full_retrain" and "never seen" in full["reason"], full
    assert full["pruned"] == [str(leftover)] and not leftover.exists()
    assert Path(result["root"]).is_dir() and Path(full["root"]).is_dir()
    v3 = client.get_model_version("incremental-model", str(full["version"]))
    assert v3.tags["update_kind"] == "full_retrain" and v3.tags["updates_since_full"] == "0"
    assert v3.tags["parent_version"] == "2"
    retrained = pl.read_parquet(f"{full['root']}/features/items.parquet")["item_id"].to_list()
    assert {"i-new", "i-block-0"} <= set(retrained)

    # A champion whose root is gone (rolled back past what keep_roots kept, or removed by hand):
    # one clear error before any work, not a traceback from deep inside the update.
    from flows.incremental import ChampionElsewhere
    from flows.promotion import rollback

    rollback(load_params(params_file, settings), 2)
    shutil.rmtree(result["root"])
    with pytest.raises(ChampionElsewhere, match=r"version 2\) was trained in .*, which no longer exists"):
        incremental(settings, params_file, str(art))


def test_replay_benchmark_command(tmp_path):
    """`python -m benchmarks.incremental --tune` on a tiny synthetic replay: the update's
    settings chosen on the base period's own replay (every combination tried, the best within
    the time budget used), every policy scored on every window, the totals with their
    intervals, the drifted window sent to a full retrain, and the plot."""
    import json
    import subprocess
    import sys

    encoder = make_tiny_bert(tmp_path / "tiny-bert")
    settings = [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24",
                f"bert.text_encoder.cache_dir={tmp_path / 'cache'}", "bert.finetune.max_epochs=3",
                "incremental.steps=5"]
    out = tmp_path / "i.json"
    cmd = [sys.executable, "-m", "benchmarks.incremental", "--dataset", "synthetic", "--windows", "2",
           "--tune", "--tune-grid", "steps=2,6 lr=0.001", "--tune-windows", "2", "--tune-max-share", "100",
           "--out", str(out), *[a for s in settings for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["synthetic"]
    tuning = result["tuning"]
    assert [t["settings"] for t in tuning["trials"]] == [{"steps": 2, "lr": 0.001}, {"steps": 6, "lr": 0.001}]
    best = max(tuning["trials"], key=lambda t: t["ndcg@10"])
    assert tuning["chosen"] == best["settings"]
    # The inner replay stays inside the base period: no event of the scored windows is read.
    assert tuning["base_events"] == int(result["settings"]["events"] * 0.7)
    assert tuning["window_bounds"][0] == tuning["inner_events"] and tuning["window_bounds"][-1] == tuning["base_events"]
    assert result["settings"]["incremental"]["steps"] == best["settings"]["steps"]
    assert {w["incremental"]["update"]["steps"] for w in result["windows"]} == {best["settings"]["steps"]}
    assert [w["window"] for w in result["windows"]] == [1, 2]
    for window in result["windows"]:
        assert window["eval_users"] > 0 and window["decision"] in ("incremental", "full_retrain", "nothing")
        for policy in ("no_update", "incremental", "full_retrain"):
            assert 0 <= window[policy]["ndcg@10"] <= 1
    total = result["total"]
    assert total["incremental"]["seconds_per_update"] > 0 and total["full_retrain"]["seconds_per_update"] > 0
    low, high = total["incremental_over_no_update"]["ci95"]
    assert low <= total["incremental_over_no_update"]["ndcg@10_ratio"] <= high
    assert result["drift_check"]["decision"] == "full_retrain"
    assert out.with_suffix(".png").stat().st_size > 0

    # A grid naming a setting that is not the update's is refused by name, before any work.
    bad = [*cmd[:cmd.index("--tune-grid") + 1], "steps=2 max_len=10", "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'max_len=10'" in proc.stderr and "replay_ratio" in proc.stderr
