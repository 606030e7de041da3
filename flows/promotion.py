"""The model registry's side of a run: register the bundle, the promotion gate, rollback.

- `register_bundle`: logs `sequence.onnx` as an MLflow ONNX model (with its signature and an
  input example) and the whole bundle as run artifacts (`bundle/`, what the service downloads),
  registers a new version of `tracking.model_name` with the alias `challenger`, then runs the
  gate. A bundle identical to an existing version's (same sha256: a fully cached run) registers
  nothing new.
- `gate` (like TFX's blessing): data validation passed, the bundle's latency within budget, and
  validation NDCG@10 and Recall@10 at least `gate.min_relative_improvement` above the
  champion's, relative differences within `gate.tolerance` counting as ties; with no champion
  yet, NDCG@10 above popularity's. A pass moves `champion`; the decision and its numbers go to
  the version's tags and description either way.
- `online_gate` / `python -m flows.promotion online`: the same decision on online evidence (the
  service's impressions): the challenger is promoted when the 95 % interval of its online
  NDCG@k minus the champion's, over users, lies above `online.min_ndcg_lift`, each side with at
  least `online.min_users` users. Its numbers go to the challenger's tags (`online_gate_*`).
- Every promotion tags the new champion with `previous_champion`: the version a rollback (by
  hand, or the `monitor` flow's on a falling online metric) goes back to.
- `python -m flows.promotion rollback --to-version N` moves `champion` back;
  `python -m flows.promotion register` logs and registers the last pipeline run in `artifacts/`.
  Each command holds the artifacts folder's lock (`flows/lock.py`) as the flows do. Otherwise a
  retrain that is running would gate against the champion it read before the manual move and
  then move the alias over it, silently undoing a rollback. A busy folder is refused at once,
  naming the run that holds it, or waited for with `--wait-seconds`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import GateConfig, OnlineConfig, Params
from components.pipeline import Artifacts
from flows.tracking import client
from serving.bundle_format import MANIFEST

CHAMPION, CHALLENGER = "champion", "challenger"


class NothingToCompare(ValueError):
    exit_code = 2


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    checks: dict[str, bool]


def gate(
    challenger: dict[str, float], champion: dict[str, float] | None, popularity: dict[str, float],
    validation_passed: bool, latency_ms: float, cfg: GateConfig,
) -> GateDecision:
    """Metrics are validation `ndcg@10` and `recall@10`."""
    checks: dict[str, bool] = {"data_validation": validation_passed, "latency": latency_ms <= cfg.latency_budget_ms}
    reasons = [
        "data validation passed" if validation_passed else "data validation FAILED",
        f"p50 latency {latency_ms:.2f} ms {'<=' if checks['latency'] else '>'} budget {cfg.latency_budget_ms:g} ms",
    ]
    if champion is None:
        checks["beats_popularity"] = challenger["ndcg@10"] > popularity["ndcg@10"]
        reasons.append(f"no champion yet: NDCG@10 {challenger['ndcg@10']:.6f} "
                       f"{'>' if checks['beats_popularity'] else '<='} popularity {popularity['ndcg@10']:.6f}")
    else:
        factor = 1 + cfg.min_relative_improvement
        for key in ("ndcg@10", "recall@10"):
            required = champion[key] * factor
            change = (challenger[key] - required) / required if required > 0 else 0.0
            ok = challenger[key] >= required or -change <= cfg.tolerance
            checks[key] = ok
            note = f" x {factor:g}" if cfg.min_relative_improvement else ""
            if ok and challenger[key] < required:
                note += f" (within the {cfg.tolerance:.2%} tolerance: {change:+.3%})"
            reasons.append(f"{key} {challenger[key]:.6f} {'>=' if ok else '<'} champion {champion[key]:.6f}{note}")
    promote = all(checks.values())
    return GateDecision(promote, ("PROMOTED: " if promote else "NOT PROMOTED: ") + "; ".join(reasons), checks)


@dataclass(frozen=True)
class RegisterResult:
    version: int
    promoted: bool
    reason: str
    model_uri: str
    champion_version: int | None
    new_version: bool = True


def _version_metrics(version) -> dict[str, float] | None:
    tags = version.tags
    if "valid_ndcg_at_10" not in tags:
        return None
    return {"ndcg@10": float(tags["valid_ndcg_at_10"]), "recall@10": float(tags["valid_recall_at_10"])}


def current_champion(params: Params, alias: str = CHAMPION):
    """The version behind `alias` (`champion`, or `challenger`); None when there is none."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(params.tracking)
    try:
        return mlflow_client.get_model_version_by_alias(params.tracking.model_name, alias)
    except MlflowException:
        return None


def _sequence_signature(onnx_path, k_example: int = 3):
    """The sequence graph's signature and a small input example, from one real call."""
    import numpy as np
    import onnxruntime as ort
    from mlflow.models import infer_signature

    from serving.bundle_format import sequence_feeds

    example = sequence_feeds([[0, 1, 2], [1]], k_example, [[2], []])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, example)))
    return infer_signature({k: np.asarray(v) for k, v in example.items()}, outputs), example


def _same_bundle(params: Params, sha: str):
    """An existing version registered from a byte-identical bundle, if any."""
    mlflow_client = client(params.tracking)
    name = params.tracking.model_name
    for version in mlflow_client.search_model_versions(f"name='{name}'"):
        if version.tags.get("bundle_sha256") == sha:
            return version
    return None


def register_bundle(results: dict[str, Any], art: Artifacts, params: Params, run_id: str,
                    version_tags: dict[str, str] | None = None) -> RegisterResult:
    """Register the bundle of the run's export stage under `run_id`, with `version_tags` (set
    before the gate can promote it), then apply the gate."""
    import mlflow
    import onnx

    mlflow_client = client(params.tracking)
    name = params.tracking.model_name
    bundle = results["export"]
    champion = current_champion(params)

    same = _same_bundle(params, bundle.bundle_sha256)
    if same is not None:
        reason = (f"UNCHANGED: the bundle (sha256 {bundle.bundle_sha256[:12]}) is identical to version "
                  f"{same.version}; no new version registered")
        mlflow_client.set_tag(run_id, "registered_version", str(same.version))
        return RegisterResult(int(same.version), False, reason, f"models:/{name}/{same.version}",
                              int(champion.version) if champion is not None else None, new_version=False)

    compress = results["compress"]
    quality = compress.quality_valid[compress.sequence_variant]
    challenger = {"ndcg@10": quality["ndcg@10"], "recall@10": quality["recall@10"]}
    latency = quality["latency_b1"]["p50_ms"]
    popularity = results["evaluate"].valid.get("popularity", {"ndcg@10": 0.0})
    validation = results["validate"]

    sequence_file = art.bundle / json.loads((art.bundle / MANIFEST).read_text())["sequence"]["file"]
    signature, example = _sequence_signature(sequence_file)
    with mlflow.start_run(run_id=run_id):
        # The bundle is served on CPU (`serving/`); MLflow's default asks for CUDA first.
        info = mlflow.onnx.log_model(onnx.load(str(sequence_file)), name="sequence", signature=signature,
                                     input_example=example, save_as_external_data=False,
                                     onnx_execution_providers=["CPUExecutionProvider"])
        mlflow.log_artifacts(str(art.bundle), "bundle")  # the side files the service needs
    version = mlflow.register_model(info.model_uri, name, tags={**(version_tags or {}), "run_id": run_id,
                                                                "bundle_sha256": bundle.bundle_sha256})
    number = int(version.version)
    mlflow_client.set_registered_model_alias(name, CHALLENGER, number)

    champion_metrics = _version_metrics(champion) if champion is not None else None
    decision = gate(challenger, champion_metrics, popularity, validation.success, latency, params.gate)
    for key, value in {
        "valid_ndcg_at_10": challenger["ndcg@10"], "valid_recall_at_10": challenger["recall@10"],
        "latency_p50_ms_b1": latency, "variant": compress.sequence_variant, "bundle_artifact": f"runs:/{run_id}/bundle",
        "gate": "passed" if decision.promote else "failed", "gate_reason": decision.reason,
        "compared_to": f"version {champion.version}" if champion is not None else "popularity",
        "dataset_fingerprint": validation.fingerprint or "unknown",
    }.items():
        mlflow_client.set_model_version_tag(name, str(number), key, str(value))
    mlflow_client.update_model_version(name, str(number), description=decision.reason)
    mlflow_client.set_tag(run_id, "registered_version", str(number))
    if decision.promote:
        promote(params, number)
    champ = current_champion(params)
    return RegisterResult(number, decision.promote, decision.reason, f"models:/{name}/{number}",
                          int(champ.version) if champ is not None else None)


def promote(params: Params, version: int | str) -> None:
    """Move `champion` to `version`, remembering the version it replaces."""
    mlflow_client = client(params.tracking)
    name = params.tracking.model_name
    previous = current_champion(params)
    if previous is not None and str(previous.version) != str(version):
        mlflow_client.set_model_version_tag(name, str(version), "previous_champion", str(previous.version))
    mlflow_client.set_registered_model_alias(name, CHAMPION, int(version))


def online_gate(champion: dict[str, float], challenger: dict[str, float], cfg: OnlineConfig) -> GateDecision:
    """`champion` / `challenger`: each user's online NDCG@k (`serving.online.per_user`)."""
    from serving.online import interval, lift

    gain = lift(champion, challenger)
    checks = {"users": min(len(champion), len(challenger)) >= cfg.min_users,
              "lift": gain.low > cfg.min_ndcg_lift}
    a, b = interval(list(champion.values())), interval(list(challenger.values()))
    reason = (f"online NDCG@{cfg.k} challenger {b.mean:.6f} ({len(challenger)} users) vs champion {a.mean:.6f} "
              f"({len(champion)} users): lift {gain.mean:+.6f}, 95% CI [{gain.low:+.6f}, {gain.high:+.6f}] "
              f"{'>' if checks['lift'] else 'not above'} {cfg.min_ndcg_lift:g}")
    if not checks["users"]:
        reason += f"; fewer than {cfg.min_users} users on a side"
    promote_ = all(checks.values())
    return GateDecision(promote_, ("PROMOTED: " if promote_ else "NOT PROMOTED: ") + reason, checks)


class NoStore(FileNotFoundError):
    exit_code = 2


def read_online(cfg: OnlineConfig, since: float, until: float):
    """The impressions shown in [since, until) in the service's store (`online.db`) and the
    events that may count for them."""
    from serving.online import read
    from serving.store import EventStore, not_a_store, store_arg

    db = store_arg(cfg.db)
    problem = not_a_store(db)
    if problem:
        raise NoStore(f"online.db, the service's event store: {problem}")
    store = EventStore(db)
    try:
        return read(store, since, until, cfg.attribution_seconds)
    finally:
        store.close()


def online_evidence(params: Params, since: float, until: float):
    """(champion version, challenger version, {user: NDCG} of each) from the service's store:
    the champion's own answers, and the challenger's A/B answers or, failing those, its shadow
    lists."""
    from serving.online import per_user

    cfg = params.online
    champion, challenger = current_champion(params), current_champion(params, CHALLENGER)
    if champion is None or challenger is None or champion.version == challenger.version:
        name = params.tracking.model_name
        if champion is None or challenger is None:
            missing = [a for a, v in ((CHAMPION, champion), (CHALLENGER, challenger)) if v is None]
            why = f"{name} has no {' and no '.join(missing)} alias (the training flow sets them)"
        else:
            why = f"the champion and the challenger are both version {champion.version} of {name}"
        raise NothingToCompare(f"nothing to compare: {why}")
    impressions, events = read_online(cfg, since, until)
    values = per_user(impressions, events, cfg.k, cfg.attribution_seconds)
    champ = values.get((str(champion.version), "champion"), {})
    chall = max((values.get((str(challenger.version), v), {}) for v in ("challenger", "shadow")), key=len)
    return str(champion.version), str(challenger.version), champ, chall


def promote_online(params: Params, since: float, until: float) -> GateDecision:
    """The online gate on the challenger; its decision and numbers go to the challenger's tags."""
    champion, challenger, champ, chall = online_evidence(params, since, until)
    decision = online_gate(champ, chall, params.online)
    mlflow_client = client(params.tracking)
    name = params.tracking.model_name
    for key, value in {"online_gate": "passed" if decision.promote else "failed",
                       "online_gate_reason": decision.reason, "online_compared_to": f"version {champion}"}.items():
        mlflow_client.set_model_version_tag(name, challenger, key, value)
    if decision.promote:
        promote(params, challenger)
    return decision


class NoSuchVersion(LookupError):
    exit_code = 2


def rollback(params: Params, to_version: int) -> str:
    from mlflow.exceptions import MlflowException

    mlflow_client = client(params.tracking)
    name = params.tracking.model_name
    try:
        mlflow_client.get_model_version(name, str(to_version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
        known = f"its versions are {', '.join(map(str, versions))}" if versions else "it has no versions yet"
        raise NoSuchVersion(f"{name} has no version {to_version} to roll back to ({known})") from None
    previous = current_champion(params)
    mlflow_client.set_registered_model_alias(name, CHAMPION, to_version)
    note = f"champion rolled back to version {to_version}" + (f" (was {previous.version})" if previous else "")
    mlflow_client.set_model_version_tag(name, str(to_version), "rollback", note)
    return note


def main() -> int:
    import argparse

    from components import pipeline
    from components.cli import add_params_arguments, params_from_args
    from flows.lock import folder_lock
    from flows.tracking import log_training_run

    parser = argparse.ArgumentParser(description="Log and register the last pipeline run, or roll the champion back.")
    add_params_arguments(parser, artifacts=False)
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="log the pipeline run in --artifacts, register its bundle, apply the gate")
    reg.add_argument("--run-name", default=None)
    back = sub.add_parser("rollback", help="move the champion alias to an earlier version")
    back.add_argument("--to-version", type=int, required=True)
    onl = sub.add_parser("online", help="promote the challenger on online evidence (the service's impressions)")
    onl.add_argument("--since", default=None, help="24h / 7d ago, ISO date-time or epoch seconds (default: "
                                                   "online.window_hours)")
    for command in (reg, back, onl):
        command.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                             help="the flows' artifacts folder, whose lock the command holds")
        command.add_argument("--wait-seconds", type=float, default=0.0,
                             help="wait this long for a flow run holding --artifacts (default: refuse at once)")
    args = parser.parse_args()
    if not args.artifacts.is_dir():
        # A lock on a folder no flow uses guards nothing (and would create it, say where the
        # command was run from): refused instead.
        parser.error(f"--artifacts {args.artifacts}: no such folder; name the flows' artifacts folder (the lock "
                     "that keeps this command and a training run apart lives there)")
    params = params_from_args(args)
    if args.command == "online":
        import time

        from serving.online import parse_time

        try:  # refused before waiting for the lock; the window itself ends once it is held
            parse_time(args.since, time.time()) if args.since else None
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--since: {exc}")
    with folder_lock(args.artifacts, f"promotion {args.command}", args.wait_seconds):
        if args.command == "rollback":
            print(rollback(params, args.to_version))
            return 0
        if args.command == "online":
            now = time.time()
            since = parse_time(args.since, now) if args.since else now - params.online.window_hours * 3600
            decision = promote_online(params, since, now)
            print(decision.reason)
            return 0
        art = Artifacts(args.artifacts)
        results = {s.name: pipeline.load_result(s, art) for s in pipeline.STAGES}
        run_id = log_training_run(results, art, params, args.run_name)
        res = register_bundle(results, art, params, run_id)
        print(f"registered {res.model_uri} (run {run_id}); {res.reason}")
        print(f"champion: version {res.champion_version}")
        return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
