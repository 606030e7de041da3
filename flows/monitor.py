"""The `monitor` flow (hourly, `prefect.yaml`): the service's online metrics into MLflow, and a
rollback when the live champion fails online.

Each run reads the impressions of the last `online.window_hours` from the service's event store
(`online.db`), logs one MLflow run (`online.<variant>_v<version>.<measure>`, tagged with the
champion and challenger versions), writes the champion's and challenger's figures to their
registry versions' tags (`online_ndcg_at_10`, `online_users`, ...), and, when the champion's
online NDCG@k over at least `online.min_users` users is below `online.rollback_below`, moves
`champion` back to the version it replaced (its `previous_champion` tag), tagging both.

The move happens under the artifacts folder's lock (flows/lock.py), which the training and
incremental flows hold while they move the same aliases, and only while the champion is still
the version measured: a nightly retrain that promoted a new champion meanwhile is never undone
on its predecessor's figures. When a run holds the lock, the monitor does not wait for it (a
retrain takes an hour); it says so, and the next hour's run decides.

    python -m flows.monitor                 # once, without Prefect
    prefect deploy --name hourly-monitor    # on its schedule
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from components.cli import ARTIFACTS
from components.config import Params, load_params
from flows.lock import FolderBusy, describe, folder_lock
from flows.promotion import CHALLENGER, CHAMPION, current_champion, read_online, rollback
from flows.tracking import client, metric_name


@dataclass(frozen=True)
class MonitorResult:
    champion_version: str | None
    rows: list  # serving.online.OnlineMetrics
    rolled_back_to: str | None
    reason: str
    run_id: str


def check(params: Params, now: float | None = None, artifacts: Path | str = ARTIFACTS) -> MonitorResult:
    import mlflow

    from serving.online import compute

    cfg = params.online
    now = time.time() if now is None else now
    rows = compute(*read_online(cfg, now - cfg.window_hours * 3600, now), cfg.k, cfg.attribution_seconds)
    mlflow_client = client(params.tracking)
    name = params.tracking.model_name
    champion, challenger = current_champion(params), current_champion(params, CHALLENGER)
    champion_version = str(champion.version) if champion is not None else None
    challenger_version = str(challenger.version) if challenger is not None else None

    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name=f"monitor {time.strftime('%Y-%m-%d %H:%M', time.gmtime(now))}") as run:
        mlflow.set_tags({"recforge.kind": "monitor", "champion_version": str(champion_version),
                         "challenger_version": str(challenger_version), "window_hours": str(cfg.window_hours)})
        for m in rows:
            subject = f"{m.variant}_v{m.model_version}"
            mlflow.log_metrics({metric_name("online", subject, key): float(value)
                                for key, value in m.flat().items()
                                if isinstance(value, (int, float)) and value == value})
            served = (m.variant == CHAMPION and m.model_version == champion_version) or (
                m.variant in (CHALLENGER, "shadow") and m.model_version == challenger_version)
            if served:
                for key, value in {f"online_ndcg_at_{cfg.k}": f"{m.ndcg.mean:.6f}",
                                   f"online_hr_at_{cfg.k}": f"{m.hr.mean:.6f}", "online_users": str(m.users),
                                   "online_requests": str(m.requests), "online_variant": m.variant,
                                   "online_checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                                   "online_monitor_run": run.info.run_id}.items():
                    mlflow_client.set_model_version_tag(name, m.model_version, key, value)
        live = next((m for m in rows if m.model_version == champion_version and m.variant == CHAMPION), None)
        rolled_back_to, reason = None, "no champion impressions in the window"
        if live is not None:
            reason = (f"champion version {champion_version}: online NDCG@{cfg.k} {live.ndcg.mean:.6f} over "
                      f"{live.users} users")
            if cfg.rollback_below is None:
                reason += " (no rollback threshold set)"
            elif live.users < cfg.min_users:
                reason += f": fewer than {cfg.min_users} users, no decision"
            elif live.ndcg.mean >= cfg.rollback_below:
                reason += f" >= {cfg.rollback_below:g}: kept"
            else:
                previous = champion.tags.get("previous_champion")
                if previous is None:
                    reason += f" < {cfg.rollback_below:g}, but there is no previous champion to go back to"
                else:
                    reason += f" < {cfg.rollback_below:g}"
                    rolled_back_to, outcome = roll_back(params, artifacts, champion_version, previous, reason)
                    reason += outcome
        mlflow.set_tag("decision", reason)
    return MonitorResult(champion_version, rows, rolled_back_to, reason, run.info.run_id)


def roll_back(params: Params, artifacts: Path | str, measured: str, previous: str,
              reason: str) -> tuple[str | None, str]:
    """Move `champion` from `measured` back to `previous` under the artifacts folder's lock,
    only while `measured` is still the champion: (the version moved to or None, what happened)."""
    name = params.tracking.model_name
    try:
        with folder_lock(artifacts, "monitor", 0):
            now = current_champion(params)
            if now is None or str(now.version) != measured:
                return None, (f": NOT rolled back, the champion moved to version "
                              f"{getattr(now, 'version', None)} since it was measured")
            outcome = f": ROLLED BACK to version {previous}"
            client(params.tracking).set_model_version_tag(name, measured, "online_rollback", reason + outcome)
            rollback(params, int(previous))
            return previous, outcome
    except FolderBusy as busy:
        return None, (f": NOT rolled back this hour, {describe(busy.holder)} holds {artifacts} and may move "
                      "the champion (the next run decides)")


@flow(name="monitor")
def monitor(overrides: list[str] | None = None, params_file: str = "params.yaml",
            params_overrides: list[str] | None = None, artifacts: str = str(ARTIFACTS)) -> dict:
    from serving.online import table

    params = load_params(params_file, list(overrides or []), [Path(f) for f in params_overrides or []])
    result = check(params, artifacts=artifacts)
    logger = get_run_logger()
    logger.info("online metrics, last %g h:\n%s", params.online.window_hours, table(result.rows))
    logger.info(result.reason)
    return {"champion_version": result.champion_version, "rolled_back_to": result.rolled_back_to,
            "reason": result.reason, "mlflow_run_id": result.run_id}


def main() -> int:
    import argparse

    from components.cli import add_params_arguments, params_from_args, run_main
    from serving.online import table

    parser = argparse.ArgumentParser(description="Online metrics into MLflow, and rollback on a failing champion.")
    add_params_arguments(parser)

    def run() -> int:
        args = parser.parse_args()
        result = check(params_from_args(args), artifacts=args.artifacts)
        print(table(result.rows))
        print(result.reason)
        return 0

    run_main(run)
    return 0


if __name__ == "__main__":
    main()
