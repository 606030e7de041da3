"""Online evaluation, replayed: does the service's online metric rank two models as offline
evaluation does, and what do impressions and a shadow challenger cost?

    python -m benchmarks.online --out online.json

1. Two genuinely different models are trained on MovieLens-100K's training period by the
   pipeline: the champion with the preset's settings, the challenger a smaller id-only BERT
   (`--challenger-set`, default: 1 layer, 32 wide, no text, no pre-training, 10 epochs).
2. For `ab` (half the users each, by the service's stable hash) and `shadow` (the challenger
   ranks every request, never shown): a fresh event store gets every user's events before the
   test split, the service starts on it, and the test events are replayed in time order over
   HTTP, `/recommend` (k=10, seen items excluded) before each. Online HR@10 / NDCG@10 come from
   the impressions by the service's own attribution (`serving/online.py`), beside the offline
   Recall@10 / NDCG@10 (= HR@10, one held-out item a user) of the same models on the same split.
3. Overhead: `/recommend` at concurrency 8 without impression logging, then with impressions
   at 100 % and a shadow challenger at 10 %, alternated twice, p99 side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import dataset_params, save
from benchmarks.serving import load, start_server
from components.cli import add_params_arguments, run_main
from components.pipeline import Artifacts

log = logging.getLogger("benchmarks.online")

CHALLENGER = ("bert.mode=id", "bert.hidden_size=32", "bert.num_layers=1", "bert.num_heads=1",
              "bert.intermediate_size=64", "bert.pretrain.enabled=false", "bert.finetune.max_epochs=10")


def train(params, work: Path) -> dict[str, float]:
    """The pipeline up to the bundle and its offline test metrics in `work`."""
    from components import pipeline

    pipeline.run(params, Artifacts(work), until=["export", "evaluate"])
    metrics = json.loads((work / "eval" / "metrics.json").read_text())["bert"]
    return {"offline_ndcg@10": metrics["ndcg@10"], "offline_hr@10": metrics["recall@10"]}


def replay_events(features: Path) -> tuple[list[tuple[str, str, int, float]], list[tuple[str, str, int]]]:
    """(events before the test split, test events in time order), with the data's own ids."""
    import pandas as pd

    events = pd.read_parquet(features / "interactions.parquet")
    users = pd.read_parquet(features / "user_map.parquet").set_index("user_idx")["user_id"].astype(str)
    items = pd.read_parquet(features / "items.parquet").set_index("item_idx")["item_id"].astype(str)
    events = events.sort_values("timestamp", kind="stable")
    events["user"] = users.loc[events["user_idx"]].to_numpy()
    events["item"] = items.loc[events["item_idx"]].to_numpy()
    test = events["split"] == "test"
    before = list(zip(events.loc[~test, "user"], events.loc[~test, "item"],
                      events.loc[~test, "timestamp"].astype(int).tolist(), events.loc[~test, "weight"].astype(float)))
    return before, list(zip(events.loc[test, "user"], events.loc[test, "item"],
                            events.loc[test, "timestamp"].astype(int).tolist()))


def call(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def seeded_store(db: Path, before: list[tuple[str, str, int, float]]) -> None:
    from serving.store import EventStore

    db.unlink(missing_ok=True)
    store = EventStore(db)
    store.add_many(before)
    store.close()


def replay(mode: str, champion: Path, challenger: Path, work: Path, before, test, port: int,
           fraction: float) -> dict[str, Any]:
    from serving.online import from_store
    from serving.store import EventStore

    db = work / f"replay-{mode}.db"
    seeded_store(db, before)
    start = time.time()
    server = start_server(champion, port, db, 1, 0.0, ["--challenger", mode, "--challenger-bundle", str(challenger),
                                                         "--challenger-fraction", str(fraction),
                                                         "--online-refresh-seconds", "0"], keep_db=True)
    try:
        for n, (user, item, ts) in enumerate(test, 1):
            call(port, "/recommend", {"user_id": user, "k": 10})
            call(port, "/events", {"user_id": user, "item_id": item, "timestamp": ts})
            if n % 200 == 0:
                log.info("%s replay: %d / %d test events", mode, n, len(test))
    finally:
        server.terminate()
        server.wait(timeout=30)  # the service writes what is queued before it exits
    store = EventStore(db)
    rows = from_store(store, start, time.time(), k=10, attribution_seconds=3600)
    store.close()
    return {m.variant: m for m in rows}


def overhead(champion: Path, challenger: Path, work: Path, users: list[str], port: int, seconds: float,
             before) -> dict[str, Any]:
    payloads = [json.dumps({"user_id": u, "k": 10}).encode() for u in users]
    cases = {"base": ["--impression-rate", "0"],
             "logged": ["--impression-rate", "1", "--challenger", "shadow", "--challenger-bundle", str(challenger),
                        "--challenger-fraction", "0.1"]}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    db = work / "overhead.db"
    for _ in range(2):
        for name, extra in cases.items():
            seeded_store(db, before)
            server = start_server(champion, port, db, 1, 0.0, [*extra, "--online-refresh-seconds", "0"], keep_db=True)
            try:
                load(port, payloads, 4, 3.0)  # warm-up
                runs[name].append(load(port, payloads, 8, seconds))
                log.info("overhead %s: %s", name, runs[name][-1])
            finally:
                server.terminate()
                server.wait(timeout=30)
    p99 = {name: float(np.median([r["p99_ms"] for r in rs])) for name, rs in runs.items()}
    return {"p99_ms_base": p99["base"], "p99_ms_logged": p99["logged"], "p99_ratio": p99["logged"] / p99["base"],
            "errors": sum(r["errors"] for rs in runs.values() for r in rs),
            "rps_base": float(np.median([r["rps"] for r in runs["base"]])),
            "rps_logged": float(np.median([r["rps"] for r in runs["logged"]])), "runs": runs}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, online, offline = [], [], []
    for mode in ("ab", "shadow"):
        for variant in ("champion", "challenger"):
            labels.append(f"{mode}\n{variant}")
            online.append(out[mode][variant]["online_ndcg@10"])
            offline.append(out[mode][variant]["offline_ndcg@10"])
    xs = np.arange(len(labels))
    ax.bar(xs - 0.2, offline, 0.4, label="offline NDCG@10 (test split)")
    ax.bar(xs + 0.2, online, 0.4, label="online NDCG@10 (replay)")
    ax.set_xticks(xs, labels)
    ax.legend(fontsize=8)
    ax.set_title("Online vs offline, MovieLens-100K replay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--data-dir", type=Path, default=None, help="MovieLens-100K folder")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench/online"))
    parser.add_argument("--challenger-set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"the challenger's settings over the champion's (default: {' '.join(CHALLENGER)})")
    parser.add_argument("--seconds", type=float, default=15.0, help="per overhead run")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    champion_params = dataset_params(args.params, "movielens-100k", args.data_dir, args.overrides,
                                     args.override_files)
    challenger_params = dataset_params(args.params, "movielens-100k", args.data_dir,
                                       [*args.overrides, *(args.challenger_set or CHALLENGER)], args.override_files)
    models = {"champion": args.workdir / "champion", "challenger": args.workdir / "challenger"}
    offline = {"champion": train(champion_params, models["champion"]),
               "challenger": train(challenger_params, models["challenger"])}
    bundles = {name: work / "bundle" for name, work in models.items()}
    before, test = replay_events(models["champion"] / "features")
    log.info("replay: %d events before the test split, %d test events", len(before), len(test))

    out: dict[str, Any] = {}
    for mode, fraction in (("ab", 0.5), ("shadow", 1.0)):
        rows = replay(mode, bundles["champion"], bundles["challenger"], args.workdir, before, test, args.port,
                      fraction)
        result = {}
        for name, variant in (("champion", "champion"), ("challenger", "challenger" if mode == "ab" else "shadow")):
            m = rows[variant]
            result[name] = {"online_ndcg@10": m.ndcg.mean, "online_ndcg@10_ci95": [m.ndcg.low, m.ndcg.high],
                            "online_hr@10": m.hr.mean, "online_hr@10_ci95": [m.hr.low, m.hr.high],
                            "users": m.users, "requests": m.requests, **offline[name]}
        online_sign = np.sign(result["champion"]["online_ndcg@10"] - result["challenger"]["online_ndcg@10"])
        offline_sign = np.sign(offline["champion"]["offline_ndcg@10"] - offline["challenger"]["offline_ndcg@10"])
        result["online_agrees_with_offline"] = bool(online_sign == offline_sign)
        out[mode] = result
        print(mode, json.dumps(result, indent=2))
    users = sorted({u for u, _, _ in test})
    out["overhead"] = overhead(bundles["champion"], bundles["challenger"], args.workdir, users, args.port,
                               args.seconds, before)
    print("overhead", json.dumps({k: v for k, v in out["overhead"].items() if k != "runs"}, indent=2))
    save(out, args.out, plot)
    return 0


if __name__ == "__main__":
    run_main(main)
