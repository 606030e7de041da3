"""The `incremental` flow (hourly, `prefect.yaml`): the champion updated from the events the
service recorded since its watermark, or retrained in full when they drifted too far.

1. The events the service's store (`online.db`) received after the champion's watermark (the
   `events_watermark` tag of its registry version; for a version without one, the events
   received before it was registered count as seen) are exported. Events the `validation`
   settings refuse (timestamp and weight ranges), events on items neither the champion nor the
   service's `/items` know, events without a weight when the training data is weighted, and
   exact duplicates of recorded events go to `window/quarantine.csv` with the reason (and to the
   MLflow run): never dropped unseen, and never blocking the update.
2. Drift between the champion's training events and the window (`components.incremental`) is
   logged as a Prefect artifact and MLflow metrics; the decision follows: nothing (too few
   events: the watermark stays), a full retrain, or an incremental update (a cloze-only
   champion, or one that fine-tunes its text encoder, is retrained in full instead).
3. Both build a new artifacts root, `<artifacts>/incremental/<time>/`, from the champion's
   validated snapshot plus the window, as a `files` source. A full retrain runs the training
   flow on it. An update runs the pipeline's own stages (validation with the same expectations,
   features, text embeddings), then, in place of the training stages, `update_mf` (the
   champion's ALS item factors carried over, new items and every user solved in closed form)
   and `update_bert` (the champion's networks carried to the new catalogue, new items from
   their text, fine-tuned on the changed users' sequences plus a replay sample: the selected
   network up to each user's validation event, the deployable one up to the test event); then
   compression, export and evaluation, and registration behind the nightly flow's gate.
4. The new version is registered with its lineage tags, before the gate can promote it:
   `parent_version`, `events_watermark`, the window (`window_first_seq`..`window_last_seq`,
   its time range, counts), `artifacts_root`, `update_kind` and `updates_since_full` (which
   sends the next update to a full retrain). Old update roots are then removed
   (`incremental.keep_roots`; the roots the flow may start from again are kept).

The run holds the artifacts folder's lock (`flows/lock.py`) throughout: while the training flow
holds it, this hour is skipped. Only events received `incremental.settle_seconds` ago are taken,
so that the watermark never passes an event another service replica is still writing.

    python -m flows.incremental                  # once, without Prefect's scheduler
    prefect deploy --name hourly-incremental     # on its schedule
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components import pipeline
from components.config import Params, load_params
from components.incremental import FULL, INCREMENTAL, NOTHING, Decision, Drift, decide, window_drift
from components.pipeline import Artifacts
from flows.lock import FolderBusy, folder_lock

log = logging.getLogger(__name__)

INCREMENTAL_DIR = "incremental"
# An update root's name: its start time, `%Y%m%dT%H%M%S%f` (UTC).
ROOT_NAME = re.compile(r"\d{8}T\d{12}")
# Lineage tags of a registry version.
ROOT, WATERMARK, UPDATES, PARENT, KIND = (
    "artifacts_root", "events_watermark", "updates_since_full", "parent_version", "update_kind")
# The pipeline's stages an update runs before updating the models, and after.
BEFORE_UPDATE = ("validate", "features", "item_text_embeddings")
AFTER_UPDATE = ("compress", "export", "evaluate")


@dataclass(frozen=True)
class ChampionState:
    version: str
    root: Path
    watermark: int
    updates_since_full: int


@dataclass(frozen=True)
class Window:
    events_file: Path
    quarantine_file: Path
    exported: int
    quarantined: int
    first_seq: int
    last_seq: int
    # Events after the window, received too recently to be taken (incremental.settle_seconds).
    waiting: int = 0


class ChampionElsewhere(RuntimeError):
    """The champion's artifacts root holds another run's outputs: nothing to update from."""

    exit_code = 2  # the CLI prints the message, not a traceback


def champion_state(params: Params, artifacts: Path) -> ChampionState | None:
    """The champion's version, the artifacts root it was trained in, its watermark and how many
    incremental updates it is from a full training; None when there is no champion."""
    from flows.promotion import current_champion
    from serving.store import EventStore

    champion = current_champion(params)
    if champion is None:
        return None
    root = Path(champion.tags.get(ROOT, str(artifacts)))
    if not root.is_dir():
        raise ChampionElsewhere(
            f"the champion (version {champion.version}) was trained in {root}, which no longer exists (removed by "
            f"incremental.keep_roots after a rollback past it, or by hand). Run the training flow to register a "
            f"champion to update from.")
    try:
        sha = pipeline.load_result("export", Artifacts(root)).bundle_sha256
    except FileNotFoundError:
        sha = None
    if sha != champion.tags.get("bundle_sha256"):
        raise ChampionElsewhere(
            f"the champion (version {champion.version}) was not trained in {root}: its bundle is not the one there "
            f"(a later training run replaced it?). Run the training flow to register a champion from this folder.")
    if WATERMARK in champion.tags:
        watermark = int(champion.tags[WATERMARK])
    else:
        # A nightly version: its data came from the configured source; the store's events count
        # from when it was registered.
        store = EventStore(params.online.db)
        watermark = store.last_seq(received_before=champion.creation_timestamp / 1000.0)
        store.close()
    return ChampionState(str(champion.version), root, watermark, int(champion.tags.get(UPDATES, "0")))


@task(cache_policy=NO_CACHE)
def export_window(params: Params, state: ChampionState, out: Path) -> Window:
    """The store's events after the watermark, checked event by event against the validation
    settings (the rules the training data passes), the catalogue and the recorded events; the
    rest quarantined with the reason."""
    import polars as pl

    from serving.store import DataRules, EventStore

    v = params.validation
    rules = DataRules(v.min_timestamp, v.max_future_seconds, v.weight_min, v.weight_max)
    out.mkdir(parents=True, exist_ok=True)
    store = EventStore(params.online.db)
    try:
        exported = store.export_csv(out / "exported.csv", out / "quarantine.csv", after_seq=state.watermark,
                                    rules=rules, received_before=time.time() - params.incremental.settle_seconds)
        added = dict(store.items())
    finally:
        store.close()
    ids = {"user_id": pl.Utf8, "item_id": pl.Utf8}
    events = pl.read_csv(out / "exported.csv", schema_overrides={**ids, "timestamp": pl.Int64, "weight": pl.Float64})
    recorded = pl.read_parquet(state.root / "data" / "interactions.parquet")
    known = set(pl.read_parquet(state.root / "data" / "items.parquet")["item_id"].cast(pl.Utf8).to_list()) | set(added)
    key = ["user_id", "item_id", "timestamp"]
    seen = recorded.select(key).unique().with_columns(recorded_already=pl.lit(True))
    events = events.join(seen, on=key, how="left", maintain_order="left")
    # Training validation bounds the share of exact duplicates: repeats go to quarantine instead.
    duplicate = pl.col("recorded_already").fill_null(False) | (pl.struct(key).is_duplicated()
                                                                & ~pl.struct(key).is_first_distinct())
    problems = pl.when(~pl.col("item_id").is_in(list(known))).then(
        pl.lit("item unknown: neither in the champion's catalogue nor added through the service's /items"))
    if "weight" in recorded.columns:
        problems = problems.when(pl.col("weight").is_null()).then(
            pl.lit("no weight: the champion's training data is weighted, an event without one cannot join it"))
    problems = problems.when(duplicate).then(pl.lit("exact duplicate of a recorded event (user, item, timestamp)"))
    events = events.with_columns(reason=problems.otherwise(None)).drop("recorded_already")
    bad = events.filter(pl.col("reason").is_not_null())
    if bad.height:
        quarantine = pl.read_csv(out / "quarantine.csv", schema_overrides={**ids, "weight": pl.Float64,
                                                                             "reason": pl.Utf8})
        pl.concat([quarantine, bad], how="diagonal_relaxed").write_csv(out / "quarantine.csv")
    events = events.filter(pl.col("reason").is_null()).drop("reason")
    events.write_parquet(out / "events.parquet")
    return Window(out / "events.parquet", out / "quarantine.csv", events.height,
                  exported.quarantined + bad.height, state.watermark + 1, exported.last_seq, exported.waiting)


@task(cache_policy=NO_CACHE)
def drift_of(state: ChampionState, window: Window, seed: int) -> Drift:
    return window_drift(state.root / "features", window.events_file, seed)


def drift_markdown(drift: Drift, decision: Decision, window: Window) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in drift.metrics().items())
    return (f"# Incremental update: {decision.action}\n\n{decision.reason}\n\n"
            f"Events {window.first_seq}..{window.last_seq}: {window.exported} taken, {window.quarantined} "
            f"quarantined (`{window.quarantine_file}`).\n\n| drift | value |\n|---|---|\n{rows}\n")


def write_source(state: ChampionState, window: Window, params: Params, out: Path) -> list[str]:
    """The champion's validated snapshot plus the window's events (and the items the service
    added) as a `files` source in `out`; returns the settings that read it."""
    import polars as pl

    from serving.store import EventStore

    out.mkdir(parents=True, exist_ok=True)
    old = pl.read_parquet(state.root / "data" / "interactions.parquet")
    new = pl.read_parquet(window.events_file)
    columns = ["user_id", "item_id", "timestamp"] + (["weight"] if "weight" in old.columns else [])
    if "weight" in columns and "weight" in new.columns:
        new = new.with_columns(pl.col("weight").cast(pl.Float64))
    pl.concat([old.select(columns), new.select([c for c in columns if c in new.columns])],
              how="diagonal_relaxed").write_parquet(out / "interactions.parquet")
    items = pl.read_parquet(state.root / "data" / "items.parquet").select("item_id", "text")
    store = EventStore(params.online.db)
    added = pl.DataFrame(store.items(), schema={"item_id": pl.Utf8, "text": pl.Utf8}, orient="row")
    store.close()
    pl.concat([items, added.filter(~pl.col("item_id").is_in(items["item_id"].to_list()))]).write_parquet(
        out / "items.parquet")
    return ["data.source=files", f"data.path={out}", "data.files.interactions=interactions.parquet",
            "data.files.items=items.parquet", "data.files.columns.user_id=user_id",
            "data.files.columns.item_id=item_id", "data.files.columns.timestamp=timestamp",
            f"data.files.columns.weight={'weight' if 'weight' in columns else 'null'}",
            "data.files.columns.split=null", "data.files.item_id_column=item_id", "data.files.text_columns=[text]"]


@task(cache_policy=NO_CACHE)
def update_models(params: Params, state: ChampionState, window: Window, root: str) -> dict[str, Any]:
    """The champion's MF and sequence model carried to the new catalogue and updated."""
    from components.incremental import update_bert, update_mf

    art = Artifacts(root)
    mf = update_mf(art.features, state.root, art.mf, params.mf, params.seed)
    bert = update_bert(art.features, art.text_embeddings, state.root, window.events_file, art.bert,
                       art.finetune_epochs, params.incremental, params.bert, params.seed)
    for result in (mf, bert):
        get_run_logger().info(result.describe())
    return {"update_mf": mf, "update_bert": bert}


def lineage(state: ChampionState, window: Window, root: Path, kind: str) -> dict[str, str]:
    """The registry tags of a version made from `window`: set when it is registered, before the
    gate can make it the champion (the next run reads its root and watermark from them)."""
    import polars as pl

    def stamp(t: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))

    events = pl.read_parquet(window.events_file)
    tags = {PARENT: state.version, WATERMARK: window.last_seq, "window_first_seq": window.first_seq,
            "window_last_seq": window.last_seq, "window_events": window.exported,
            "window_quarantined": window.quarantined, ROOT: root, KIND: kind,
            UPDATES: 0 if kind == FULL else state.updates_since_full + 1}
    if events.height:
        tags["window_start"], tags["window_end"] = stamp(events["timestamp"].min()), stamp(events["timestamp"].max())
    return {k: str(v) for k, v in tags.items()}


def log_window(params: Params, run_id: str, drift: Drift, decision: Decision, window: Window,
               numbers: dict[str, dict[str, float]]) -> None:
    """The window's drift, the decision, the quarantined events and `numbers` ({subject:
    {measure: value}}, scope `update`) into the MLflow run `run_id`."""
    from mlflow.entities import Metric

    from flows.tracking import client, metric_name

    mlflow_client = client(params.tracking)
    now = int(time.time() * 1000)
    values = {metric_name("drift", "window", k): v for k, v in drift.metrics().items()}
    values.update({metric_name("update", subject, k): v for subject, row in numbers.items() for k, v in row.items()})
    # MLflow takes no NaN or infinity (no scored user, no earlier event rate).
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()
                                             if math.isfinite(float(v))])
    mlflow_client.set_tag(run_id, "decision", decision.action)
    mlflow_client.set_tag(run_id, "decision_reason", decision.reason[:5000])
    mlflow_client.log_artifact(run_id, str(window.quarantine_file), "window")


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(results: dict[str, Any], params: Params, root: str, run_name: str, tags: dict[str, str],
             version_tags: dict[str, str]) -> dict[str, Any]:
    """An MLflow run of the update (the update, evaluation), the bundle registered with
    `version_tags` and gated as the nightly flow does."""
    import mlflow

    from flows.promotion import register_bundle
    from flows.tracking import model_metrics, use_experiment

    use_experiment(params.tracking)
    evaluation = results["evaluate"]
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"recforge.kind": "incremental", "orchestrator": "prefect", **tags})
        mlflow.log_metrics({**model_metrics("test", evaluation.test), **model_metrics("valid", evaluation.valid)})
        run_id = run.info.run_id
    res = register_bundle(results, Artifacts(root), params, run_id, version_tags=version_tags)
    return {"run_id": run_id, "version": res.version, "promoted": res.promoted, "reason": res.reason,
            "model_uri": res.model_uri, "new_version": res.new_version}


def cannot_update(root: Path, params: Params) -> str | None:
    """Why the champion in `root` cannot take an incremental update (a full retrain can)."""
    import json

    config = json.loads((root / "bert" / "model" / "config.json").read_text())
    if config.get("inference") == "cloze":
        return "the champion is the cloze pre-trained model (fine-tuning off); the update trains next-item prediction"
    if config.get("text_finetune_layers", 0) > 0:
        return "the champion fine-tunes its text encoder (bert.text_encoder.finetune_layers > 0); new items need a full retrain"
    return None


@flow(name="incremental")
def incremental(overrides: list[str] | None = None, params_file: str = "params.yaml", artifacts: str = "artifacts",
                params_overrides: list[str] | None = None) -> dict[str, Any]:
    from components.cli import quiet_libraries
    from flows.training import forward_component_logs

    overrides, params_overrides = list(overrides or []), list(params_overrides or [])
    params = load_params(params_file, overrides, [Path(f) for f in params_overrides])
    quiet_libraries()
    forward_component_logs()
    logger = get_run_logger()
    with ExitStack() as held:
        try:
            # The training flow may be rewriting this folder: this hour is skipped, not queued
            # (the next run takes the same events, from the champion the retrain may replace).
            held.enter_context(folder_lock(artifacts, "incremental", 0, logger))
        except FolderBusy as busy:
            reason = f"skipped: {busy}; the next run takes these events"
            logger.info(reason)
            return {"action": NOTHING, "reason": reason, "busy": busy.holder}
        return _update(params, overrides, params_file, artifacts, params_overrides)


def _update(params: Params, overrides: list[str], params_file: str, artifacts: str,
            params_overrides: list[str]) -> dict[str, Any]:
    import shutil

    import polars as pl

    from flows.training import flow_run_tags, run_stage, training

    logger = get_run_logger()
    state = champion_state(params, Path(artifacts))
    if state is None:
        reason = "no champion registered yet: the training flow registers the first"
        logger.info(reason)
        return {"action": NOTHING, "reason": reason}
    if "split" in pl.read_parquet_schema(state.root / "data" / "interactions.parquet"):
        # Appending events would leave the published split behind (leave-one-out instead).
        reason = (f"the champion (version {state.version}) was trained on its source's published split; "
                  "new events cannot join it: retrain with the training flow")
        logger.info(reason)
        return {"action": NOTHING, "reason": reason, "champion_version": state.version}

    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    root = (Path(artifacts) / INCREMENTAL_DIR / started).resolve()
    window = export_window(params, state, root / "window")
    drift = drift_of(state, window, params.seed)
    decision = decide(drift, state.updates_since_full, params.incremental)
    blocked = cannot_update(state.root, params) if decision.action == INCREMENTAL else None
    if blocked:
        decision = Decision(FULL, blocked)
    create_markdown_artifact(key="incremental-drift", markdown=drift_markdown(drift, decision, window),
                             description="Drift of the new events and the decision it led to")
    logger.info("champion version %s, events %d..%d: %d taken, %d quarantined. %s: %s", state.version,
                window.first_seq, window.last_seq, window.exported, window.quarantined, decision.action, decision.reason)
    if decision.action == NOTHING:
        shutil.rmtree(root)
        reason = decision.reason + (f"; {window.waiting} more received in the last "
                                    f"{params.incremental.settle_seconds:g} s wait for the next run" if window.waiting else "")
        return {"action": NOTHING, "reason": reason, "champion_version": state.version}

    source = write_source(state, window, params, root / "source")
    run_name, tags = flow_run_tags()
    version_tags = lineage(state, window, root, decision.action)
    if decision.action == FULL:
        result = training(overrides + source, params_file, str(root), run_name=f"full retrain {run_name}",
                          params_overrides=params_overrides, version_tags=version_tags)
        log_window(params, result["run_id"], drift, decision, window, {})
    else:
        run_params = load_params(params_file, overrides + source, [Path(f) for f in params_overrides])
        results = {name: run_stage.with_options(name=name)(name, run_params, str(root), False).result
                   for name in BEFORE_UPDATE}
        results.update(update_models(run_params, state, window, str(root)))
        results.update({name: run_stage.with_options(name=name)(name, run_params, str(root), False).result
                        for name in AFTER_UPDATE})
        result = register(results, run_params, str(root), f"incremental {run_name}", tags, version_tags)
        log_window(params, result["run_id"], drift, decision, window,
                   {"bert": results["update_bert"].metrics(), "mf": results["update_mf"].metrics()})
    logger.info("version %s (%s): %s", result["version"], decision.action, result["reason"])
    try:
        pruned = prune_roots(params, Path(artifacts), keep=root)
    except Exception as exc:  # the version is registered: housekeeping must not fail the run
        logger.warning("old update roots were not removed (%s: %s); the next run tries again",
                       type(exc).__name__, exc)
        pruned = []
    if pruned:
        logger.info("removed %d old update roots (incremental.keep_roots=%s): %s", len(pruned),
                    params.incremental.keep_roots, ", ".join(p.name for p in pruned))
    return {"action": decision.action, "reason": decision.reason, "champion_version": state.version,
            "version": result["version"], "promoted": result["promoted"], "gate": result["reason"],
            "root": str(root), "drift": drift.metrics(), "flow_run": tags.get("prefect.flow_run_id"),
            "pruned": [str(p) for p in pruned]}


def roots_to_remove(roots: list[Path], keep_newest: int | None, protected: set[Path]) -> list[Path]:
    """Of the update roots (named by their start time, so names sort by age), those beyond the
    newest `keep_newest` (None: none) that are not `protected`. Folders named otherwise are not
    the flow's: never counted, never removed."""
    if keep_newest is None:
        return []
    ours = [p for p in roots if ROOT_NAME.fullmatch(p.name)]
    older = sorted(ours, key=lambda p: p.name, reverse=True)[keep_newest:]
    return sorted(p for p in older if p.resolve() not in protected)


def protected_roots(params: Params) -> set[Path]:
    """The roots of the versions holding an alias (champion, challenger) and of the champion's
    rollback target (`previous_champion`): the incremental flow may start from any of them."""
    from flows.promotion import CHAMPION
    from flows.tracking import client

    from mlflow.exceptions import MlflowException

    mlflow_client = client(params.tracking)
    name = params.tracking.model_name

    def tags_of(version: str) -> dict[str, str]:
        try:
            return mlflow_client.get_model_version(name, version).tags
        except MlflowException:  # deleted from the registry since it was tagged
            return {}

    aliases = mlflow_client.get_registered_model(name).aliases
    versions = {str(v) for v in aliases.values()}
    if CHAMPION in aliases:
        previous = tags_of(str(aliases[CHAMPION])).get("previous_champion")
        versions |= {previous} if previous else set()
    tags = [tags_of(v) for v in sorted(versions)]
    return {Path(t[ROOT]).resolve() for t in tags if ROOT in t}


def prune_roots(params: Params, artifacts: Path, keep: Path) -> list[Path]:
    """Remove the update roots `incremental.keep_roots` does not keep (never `keep`, the root
    just built, nor a protected one); returns them."""
    import shutil

    folder = artifacts / INCREMENTAL_DIR
    if params.incremental.keep_roots is None or not folder.is_dir():
        return []
    roots = [p for p in folder.iterdir() if p.is_dir()]
    doomed = roots_to_remove(roots, params.incremental.keep_roots, protected_roots(params) | {keep.resolve()})
    for root in doomed:
        shutil.rmtree(root)
    return doomed


def main() -> int:
    import argparse

    from components.cli import add_params_arguments, run_main

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(description="Update the champion from the service's new events, once.")
    add_params_arguments(parser)

    def run() -> int:
        args = parser.parse_args()
        if not args.artifacts.is_dir():  # the flow's lock would create a mistyped folder
            parser.error(f"--artifacts {args.artifacts}: no such folder; name the training flow's artifacts folder "
                         "(the champion an update starts from was trained there)")
        load_params(args.params, args.overrides, args.override_files)
        result = incremental(args.overrides, str(args.params), str(args.artifacts),
                             params_overrides=[str(f) for f in args.override_files])
        print(json.dumps(result, indent=2, default=str))
        return 0

    run_main(run)
    return 0


if __name__ == "__main__":
    main()
