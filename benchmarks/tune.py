"""Honest tuning: an Optuna study per model on the inner holdout, then the test split scored once.

    python -m benchmarks.tune --dataset amazon-scientific --models mf,bert --minutes 60 --out t.json

Every trial runs the pipeline (`components/pipeline.py`) on the dataset's preset with
`features.holdout=inner`: each user's last training event is the validation split (early
stopping) and the validation event is the test split, so the real test events are never read
while tuning. A trial's value is that inner test NDCG@10 (full ranking, the evaluate stage's own
code); the sequence model also reports its per-epoch validation NDCG@10, on which Optuna's median
pruner stops runs that trail the median of earlier trials at the same epoch (the stage's
process is killed, not left running).

- The search: TPE over the space in `SPACES` (or `--space FILE`: YAML by model, each
  `key: {log|float|int: [low, high]}` or `key: {choice: [...]}`; a model tunes its own section
  only, `mf.*` or `bert.*`, so no space can reach the holdout, the data or the seed).
- The budget is trial time, the same `--minutes` for every model of the call, per process
  (`--jobs N`: N x `--minutes` of trials; trials are not interrupted: the last one started
  before the budget ran out finishes). The study lives in
  SQLite (`--study-db`), named by the dataset, the model and a hash of the settings and the
  space, so a second call with the same ones resumes it with what is left of the budget (the
  seconds every stored trial recorded; a trial cut off by `kill -9` counts nothing) and
  other settings start a study of their own.
- The best settings are written as a preset beside the output (`X.<model>.yaml`), to be laid
  over the dataset's preset (`--params-overrides presets/<dataset>.yaml --params-overrides
  X.<model>.yaml`).
- `--score-test`: the best settings are then trained with `features.holdout=test` for
  `--seeds` seeds (every model of a seed in one artifacts root, so they are scored on the same
  users) and scored once on the test split: NDCG@10 mean and sd over the seeds, and with both
  models, each seed's bert / mf ratio with its paired-bootstrap 95 % interval.

- The study starts from the dataset's own settings: they are queued as a trial that is never
  pruned (again if it failed or was cut off), so its best is never below them. A setting outside
  the space is left to the sampler in that trial, by name (the trial is then partly the preset).
- `--jobs N`: N processes share the study (its SQLite file), each with --minutes of trials.
- `--input DIR` (with `--test-input DIR` for `--score-test`): the sequence model is tuned on
  the folders `python -m benchmarks.gpu export --set features.holdout=inner` (and without it)
  wrote, its fine-tuning stage alone: what a GPU machine with PyTorch alone runs. Each run's
  per-user scores stay in --workdir with a key of the fine-tuning code, the export and the
  settings; a later call reads a run of the same key instead of training it again.
- `--ablate KEY=VALUE` (repeatable): the best settings and each single change on the inner
  holdout, `--seeds` seeds each (the quality table's rows).
- `--score-test` also writes each model's per-user test NDCG@10 (`X.<model>.test.npz`, with a
  fingerprint of the test split); `--ratio BERT_NPZ MF_NPZ` pairs two such files, say a GPU
  machine's bert and this machine's MF, and refuses files of different splits.

Output: `{DATASET: {MODEL: {"study", "best": {...}, "best_value", "trials": [...], "test": {...},
"ablation": {...}}, "bert_over_mf": {...}}}` and a plot of every trial's value (the best so far
as a line). Results at the datasets' size: benchmarks/README.md "Tuning".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.common import dataset_params, datasets, names_of, save, write_json
from benchmarks.gpu import ENCODER_DIR, exported_params
from components import pipeline
from components.cli import add_params_arguments, run_main, setup_logging
from components.config import DEFAULT_PARAMS, Params, ParamsError, flatten, params_from_dict, read_yaml, set_key
from components.pipeline import Artifacts

log = logging.getLogger("benchmarks.tune")

K = 10
# Settings an export (`--input`) fixed when it was written: its data, features and split, its
# text embeddings, and the stages before fine-tuning, which it does not run.
FIXED_BY_EXPORT = ("data.", "features.", "bert.pretrain.", "bert.text_encoder.")
# Except how fine-tuning uses the encoder: its top layers trained (from the weights an export
# carries with `--encoder-weights`) and where that runs. The text embeddings stay as exported.
TOWER_LAYERS = "bert.text_encoder.finetune_layers"
TUNABLE_ON_EXPORT = (TOWER_LAYERS, *(k for k in pipeline.DEVICE_ONLY if k.startswith("bert.text_encoder.")))
# A process of a study stops after this many failed trials in a row (a broken setup, not bad luck).
FAILURES_IN_A_ROW = 3
# The stage that trains each model.
TRAINED_BY = {"mf": "train_mf", "bert": "finetune_bert"}
# The search spaces: dotted params key -> (kind, arguments). Ranges around the published
# recipes' (SASRec / BERT4Rec sizes, ALS regularisation over decades).
SPACES: dict[str, dict[str, dict[str, list]]] = {
    "mf": {
        "mf.factors": {"choice": [32, 64, 128, 256, 512]},
        "mf.regularization": {"log": [0.01, 300.0]},
        "mf.alpha": {"log": [0.5, 50.0]},
        "mf.iterations": {"int": [5, 30]},
    },
    "bert": {
        "bert.finetune.lr": {"log": [1e-4, 3e-3]},
        "bert.hidden_size": {"choice": [64, 128, 256]},
        "bert.num_layers": {"int": [1, 3]},
        "bert.dropout": {"float": [0.1, 0.5]},
        "bert.weight_decay": {"log": [1e-4, 0.3]},
    },
}
KINDS = ("log", "float", "int", "choice")


class TuningError(RuntimeError):
    exit_code = 1  # a CLI prints the message and exits with this, no traceback


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler's timeout, `kill`), raised where the process is. As an interrupt,
    not SystemExit: Optuna records the running trial as failed (SystemExit would leave it
    "running" until its heartbeat goes stale), and the unwinding kills the trial's stage
    processes (components/pipeline.py) and removes its folder."""


_terminating = False


def _terminate(signum: int, frame: Any) -> None:
    # Once: a second SIGTERM (a scheduler signalling the process group, then the call its
    # children) would otherwise interrupt the unwinding of the first, and the trial's cleanup.
    global _terminating
    if not _terminating:
        _terminating = True
        raise Terminated()


def _arm_child() -> None:
    """In a process this call spawned (a study's `--jobs` process, a test seed or ablation run):
    Linux SIGKILLs it when the call dies however it dies (`kill -9` included, where no handler
    runs), and a SIGTERM unwinds it as it unwinds the call."""
    from components.pipeline import die_with_parent

    arm = die_with_parent()
    if arm is not None:
        arm()
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # the call died before the arming
            os._exit(1)
    signal.signal(signal.SIGTERM, _terminate)
    setup_logging()


def check_space(model: str, space: Any, params: Params) -> dict[str, dict[str, list]]:
    """`space` if every entry is well formed, names a setting of `model`'s own section and
    takes its bounds; a ValueError naming the entry otherwise."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"no search space for {model!r} (a mapping of its settings)")
    for key, spec in space.items():
        if not str(key).startswith(f"{model}."):
            raise ValueError(f"search space entry {key!r}: {model} tunes its own settings only ({model}.*)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ValueError(f"search space entry {key!r}: expected one of {', '.join(KINDS)} with its values")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise ValueError(f"search space entry {key!r}: {kind} needs " +
                             ("a list of values" if kind == "choice" else "[low, high]"))
        if kind != "choice":
            # YAML reads 1e-4 (no dot) as a string: bounds are numbers of the kind's type.
            try:
                values = [int(v) if kind == "int" else float(v) for v in values]
            except (TypeError, ValueError):
                raise ValueError(f"search space entry {key!r}: {kind} bounds must be numbers, not {values}") from None
            spec[kind] = values
        if kind != "choice" and not values[0] < values[1]:
            raise ValueError(f"search space entry {key!r}: low must be below high")
        if kind == "log" and values[0] <= 0:
            raise ValueError(f"search space entry {key!r}: a log range must be positive")
        # An unknown key or a value of the wrong type fails here, by name.
        for value in values:
            try:
                with_settings(params, {key: value})
            except Exception as e:
                raise ValueError(f"search space entry {key!r}: {e}") from None
    return space


def suggest(trial: Any, space: dict[str, dict[str, list]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, values)
        elif kind == "int":
            out[key] = trial.suggest_int(key, int(values[0]), int(values[1]))
        else:
            out[key] = trial.suggest_float(key, float(values[0]), float(values[1]), log=kind == "log")
    return out


def with_settings(params: Params, settings: dict[str, Any]) -> Params:
    """`params` with dotted settings replaced (values as Python objects: no YAML round trip that
    would read 1e-05 as a string)."""
    raw = params.to_dict()
    for key, value in settings.items():
        set_key(raw, key.split("."), value)
    return params_from_dict(raw)


def nested(settings: dict[str, Any]) -> dict[str, Any]:
    """{"bert.finetune.lr": 1e-3} -> {"bert": {"finetune": {"lr": 1e-3}}} (a preset's shape)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------
# One model trained and scored
# --------------------------------------------------------------------------------------------


# The fine-tuning stage's line for each epoch (components/bert/train.py, EpochLog).
EPOCH_LINE = re.compile(r"\bfinetune epoch (\d+)/\d+: .*?validation NDCG@10 (\S+?),")


def train_and_score(model: str, params: Params, art: Artifacts,
                    on_epoch: Callable[[int, float], None] | None = None) -> tuple[float, np.ndarray]:
    """Train `model` through the pipeline under `art` and score it on the features' test split:
    mean NDCG@10 and the per-user values. `on_epoch(epoch, val_ndcg10)` is called as the sequence
    model's fine-tuning epochs finish, read off the stage's own output (never a file an earlier
    run left); it may raise to stop the run, and the stage's processes are killed."""
    from components.evaluate import per_user_ndcg
    from components.factors import FILE_NAME, FactorModel
    from components.sequences import load_sequences

    def emit(line: str) -> None:
        log.info("  %s", line)
        found = EPOCH_LINE.search(line) if on_epoch is not None else None
        if found:
            value = float(found.group(2))
            if math.isfinite(value):  # an epoch without a validation score is not reported
                on_epoch(int(found.group(1)), value)

    pipeline.run(params, art, until=TRAINED_BY[model], emit=emit)
    factors = FactorModel.load((art.mf if model == "mf" else art.bert) / FILE_NAME)
    per_user = per_user_ndcg(factors, load_sequences(art.features), "test", K, params.evaluation.batch_size)
    return float(per_user.mean()), per_user


def train_exported(folder: Path, params: Params, out: Path,
                   on_epoch: Callable[[int, float], None] | None = None) -> tuple[float, np.ndarray]:
    """The sequence model's fine-tuning stage alone on a dataset folder that `python -m
    benchmarks.gpu export` wrote (a machine with PyTorch alone: a GPU's), scored on that
    folder's test split as `train_and_score` scores; `on_epoch` likewise, from each epoch's
    validation. `out` is removed afterwards (a study's trials would fill the disk)."""
    import pytorch_lightning as pl

    from components.bert.train import run_stage
    from components.evaluate import per_user_ndcg
    from components.factors import FILE_NAME, FactorModel
    from components.sequences import load_sequences

    class Report(pl.Callback):
        def on_validation_end(self, trainer, module) -> None:
            value = trainer.callback_metrics.get("val_ndcg10")
            if on_epoch is not None and not trainer.sanity_checking and value is not None:
                on_epoch(trainer.current_epoch + 1, float(value))

    shutil.rmtree(out, ignore_errors=True)
    try:
        run_stage("finetune", folder, folder, out, out / "checkpoints", out / "epochs.csv", params.bert, params.seed,
                  params.evaluation.batch_size, callbacks=[Report()])
        factors = FactorModel.load(out / FILE_NAME)
        per_user = per_user_ndcg(factors, load_sequences(folder), "test", K, params.evaluation.batch_size)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return float(per_user.mean()), per_user


def test_fingerprint(features_dir: Path) -> str:
    """A digest of the test split's users and targets: per-user scores from two machines pair
    up only when they agree."""
    from components.sequences import load_sequences

    targets = load_sequences(features_dir).target_matrix("test")
    digest = hashlib.sha256(np.asarray(targets.indptr, dtype=np.int64).tobytes())
    digest.update(np.asarray(targets.indices, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def spent_seconds(study: Any) -> float:
    """Seconds the trials stored in `study` recorded (each records its own when it ends, pruned,
    failed or stopped by a SIGTERM too; one cut off by `kill -9` recorded nothing)."""
    return sum(t.user_attrs.get("seconds", 0.0) for t in study.trials)


# Not a setting: what the inner split of a k-core-filtered dataset is (`study_settings`).
INNER_K_CORE = "features.holdout=inner k-core"


def study_settings(model: str, params: Params, space: dict[str, Any], exported: Path | None = None) -> dict[str, Any]:
    """What a study of `model` is named by: the settings its trials depend on (by the keys the
    pipeline reads, a whole section or one dotted setting) and the space, so that a study only
    ever holds comparable trials. The settings are those the
    pipeline keys the model's training stage and the stages before it by (`pipeline.param_keys`):
    the other model's settings, and those that change where and how the work runs but not its
    result (DEVICE_ONLY, ENGINE_ONLY), are left out. So an MF study resumes after a BERT setting
    changed, and a BERT study on a GPU machine with the encoder compiled. From an `exported`
    folder, its own encoder (where `exported_params` points) is named by the path the export
    recorded, the encoder it was written from, not by where the folder lies: a moved export, or
    one given by another path, resumes the study, and another encoder's does not."""
    settings = params.to_dict()
    if exported is not None and settings["bert"]["text_encoder"]["path"] == str(exported.parent / ENCODER_DIR):
        written = json.loads((exported / "params.json").read_text())
        settings["bert"]["text_encoder"]["path"] = written["bert"]["text_encoder"]["path"]
    keys = dict.fromkeys(k for stage in pipeline.plan(TRAINED_BY[model]) for k in pipeline.param_keys(stage))
    depends_on = {key: _lookup(settings, key) for key in keys}
    features = settings["features"]
    if max(features["min_user_interactions"], features["min_item_interactions"]) > 1:
        # With k-core on, the inner split that trials are scored on changed on 2026-11-29 (k-core
        # runs again without the test events): a study of the earlier split must not take them.
        depends_on[INNER_K_CORE] = "again without the test events"
    # Through JSON, so that what a study records compares equal to what a later call computes.
    return json.loads(json.dumps({"settings": depends_on, "space": space}, sort_keys=True, default=str))


def name_of_study(dataset: str, model: str, settings: dict[str, Any]) -> str:
    """`<dataset>-<model>-<hash of study_settings>` (hashed as before the settings were recorded,
    so that the studies named since 2026-11-29 keep their names)."""
    digest = hashlib.sha256(json.dumps([settings["settings"], settings["space"]], sort_keys=True).encode())
    return f"{dataset}-{model}-{digest.hexdigest()[:10]}"


def study_name(dataset: str, model: str, params: Params, space: dict[str, Any],
               exported: Path | None = None) -> str:
    return name_of_study(dataset, model, study_settings(model, params, space, exported))


# The study's user attribute that records its `study_settings`, so that a call that opens a new
# study can say which settings differ from the study it may have expected to resume.
SETTINGS = "settings"


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`key old -> new` for each flat key whose value differs (`unset` where one side lacks it)."""
    old, new = flatten(before), flatten(after)

    def shown(side: dict[str, Any], key: str) -> str:
        return repr(side[key]) if key in side else "unset"

    return [f"{k} {shown(old, k)} -> {shown(new, k)}" for k in sorted(set(old) | set(new))
            if k not in old or k not in new or old[k] != new[k]]


def why_a_new_study(storage: str, name: str, settings: dict[str, Any]) -> str | None:
    """For a study just opened with no trials: how its settings differ from the other study of
    the same dataset and model in `storage` that ran a trial last (the one a user most likely
    meant to resume), or None when there is none. A changed setting otherwise looks like a lost
    study."""
    import optuna

    prefix = name.rsplit("-", 1)[0] + "-"
    last_run = {}
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not summary.study_name.startswith(prefix) or summary.study_name == name:
            continue
        trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)
        # A trial only queued (a call killed before it started) has no time: it ran nothing.
        times = [t.datetime_complete or t.datetime_start for t in trials if t.datetime_start is not None]
        if times:
            last_run[summary.study_name] = (max(times), summary, len(trials))
    if not last_run:
        return None
    _, latest, n = max(last_run.values(), key=lambda v: v[0])
    before = latest.user_attrs.get(SETTINGS)
    head = (f"a new study {name!r}: the other study of {prefix[:-1]} run last, {latest.study_name!r} "
            f"({n} trial{'s' if n != 1 else ''}),")
    if before is None:
        return (f"{head} recorded no settings (it predates their recording), so what differs is not known; "
                "a study resumes only under the settings and space its trials ran with")
    # Equal settings and space would be this study's own name, so something differs.
    changes = _differences(before["settings"], settings["settings"])
    space = _differences(before["space"], settings["space"])
    if space:
        changes.append(f"the search space ({'; '.join(space)})")
    return f"{head} ran with other settings: {'; '.join(changes)}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One process's share of a study (pickled into the processes `--jobs` spawns)."""

    model: str
    inner: dict[str, Any]  # the settings, features.holdout=inner
    space: dict[str, dict[str, list]]
    storage: str
    name: str
    seconds: float  # this process starts no trial after this long
    max_trials: int | None  # trials of the whole study
    work: str
    exported: str | None  # an exported folder (train_exported) instead of the pipeline
    worker: int


class _QuietTermination(logging.Filter):
    """Drops Optuna's failed-trial warning for a trial a SIGTERM stopped: its traceback (the
    signal, through Lightning's shutdown) tells a user nothing the trial's own line does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Terminated))


def _open_study(storage: str, name: str, seed: int, create: bool) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    failures_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    if not any(isinstance(f, _QuietTermination) for f in failures_log.filters):
        failures_log.addFilter(_QuietTermination())
    with warnings.catch_warnings():  # both "experimental" since Optuna 2.9: noise to a user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Trials beat every minute; one that has not beaten for 3 minutes (its call was killed)
        # is marked failed when a call opens the study, instead of staying "running" for ever.
        rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180,
                                         engine_kwargs={"connect_args": {"timeout": 60}})
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3)
        study = (optuna.create_study(study_name=name, storage=rdb, direction="maximize", load_if_exists=True,
                                     pruner=pruner) if create else
                 optuna.load_study(study_name=name, storage=rdb, pruner=pruner))
        if create:
            optuna.storages.fail_stale_trials(study)
    # Seeded by the trials already stored: a resumed study (or another process of this one)
    # draws new points, not the same ones again. TPE models the results after 4 random trials
    # (Optuna's default 10 would leave an hour's study of a sequence model, 5-9 minutes a trial
    # on a CPU, random search); the constant liar keeps parallel processes apart.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=4, constant_liar=True)
    return study


# The user attribute that marks the trial a study starts from (`start_from`).
START = "start"


def start_from(study: Any, space: dict[str, dict[str, list]], params: Params) -> None:
    """Queue the settings the study starts from (the dataset's preset) as a trial, so that a
    study never reports a best below what it was to improve on (a wide space's random start can
    miss a hand-chosen point). Once: again only when that trial failed or was cut off (an earlier
    version's pruned one included; the objective never prunes it now). A setting the space does
    not hold (a choice it lacks, a value outside a range: TPE cannot model a weight decay of 0
    on a log range) is left to the sampler, by name; the rest still start from the preset."""
    import optuna

    state = optuna.trial.TrialState
    held = (state.COMPLETE, state.RUNNING, state.WAITING)
    if any(t.user_attrs.get(START) and t.state in held for t in study.trials):
        return
    current, outside = {}, []
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        value = _lookup(params.to_dict(), key)
        inside = value in values if kind == "choice" else values[0] <= value <= values[1]
        if inside:
            current[key] = value
        else:
            outside.append(f"{key}={value!r}")
    if not current:
        log.info("the current settings lie outside the space (%s): no trial starts from them", ", ".join(outside))
        return
    # A study an earlier version started ran these settings unmarked.
    if not outside and any(t.params == current and t.state == state.COMPLETE for t in study.trials):
        return
    log.info("queued the current settings as a trial: %s%s", current,
             f" (outside the space, left to the sampler: {', '.join(outside)})" if outside else "")
    study.enqueue_trial(current, user_attrs={START: True})


def optimize(job: Job) -> None:
    """Run trials of the stored study until `job.seconds` or the study's `max_trials`."""
    import optuna

    from components.pipeline import StageFailed

    inner = params_from_dict(job.inner)
    study = _open_study(job.storage, job.name, inner.seed + 1000 * job.worker, create=False)
    # One root per process: data, features and text stay up to date across its trials, and no
    # two processes write one stage's folder.
    root = Path(job.work) / (f"{job.model}-inner" if job.worker == 0 else f"{job.model}-inner-{job.worker}")
    tag = f"{job.model}" if job.worker == 0 else f"{job.model} (process {job.worker})"

    def objective(trial: Any) -> float:
        settings = suggest(trial, job.space)
        start = bool(trial.user_attrs.get(START))  # the preset's trial runs to its end
        log.info("%s trial %d%s: %s", tag, trial.number, " (the current settings)" if start else "", settings)
        began = time.perf_counter()

        def on_epoch(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if not start and trial.should_prune():
                log.info("%s trial %d pruned after epoch %d (validation NDCG@10 %.4f)", tag, trial.number, epoch,
                         value)
                raise optuna.TrialPruned()

        try:
            run = with_settings(inner, settings)
            if job.exported:
                value, _ = train_exported(Path(job.exported), run, root / f"trial-{trial.number}", on_epoch)
            else:
                value, _ = train_and_score(job.model, run, Artifacts(root), on_epoch)
        except failures as e:  # the reason stays with the trial, in the output too
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[-1000:])
            raise
        except SystemExit as e:
            # Lightning turns an interrupt inside `fit` (our SIGTERM's, where an export's trial
            # trains in this process) into sys.exit(1), which Optuna lets through with the trial
            # left "running".
            log.info("%s trial %d stopped by a SIGTERM: recorded as failed", tag, trial.number)
            raise Terminated() from e
        except Terminated:
            log.info("%s trial %d stopped by a SIGTERM: recorded as failed", tag, trial.number)
            raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - began)
        log.info("%s trial %d: inner-holdout NDCG@10 %.4f", tag, trial.number, value)
        return value

    # What settings can cause fails the trial, not the study: settings that do not go together
    # (ParamsError), a stage process's failure (StageFailed); a stage run in this process (an
    # export) raises a ValueError or runs out of memory (RuntimeError, torch's CUDA one included). A study
    # whose trials keep failing stops rather than spend its budget on them.
    failures = (StageFailed, ValueError, RuntimeError, MemoryError) if job.exported else (StageFailed, ParamsError)
    streak = [0]

    def give_up(study: Any, trial: Any) -> None:
        streak[0] = streak[0] + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if streak[0] >= FAILURES_IN_A_ROW:
            log.error("%s: %d trials in a row failed (the last: %s); this process stops", tag, streak[0],
                      trial.user_attrs.get("error"))
            study.stop()

    callbacks = [give_up]
    if job.max_trials:
        callbacks.append(optuna.study.MaxTrialsCallback(job.max_trials, states=None))
    study.optimize(objective, timeout=job.seconds, callbacks=callbacks, catch=failures)


def _worker(job: Job) -> None:
    """One of `--jobs` processes: it dies with the call, and a SIGTERM unwinds it."""
    _arm_child()
    try:
        optimize(job)
    except Terminated:
        sys.exit(128 + signal.SIGTERM)


def tune_model(model: str, params: Params, space: dict[str, dict[str, list]], work: Path, storage: str,
               dataset: str, minutes: float, max_trials: int | None, jobs: int = 1,
               exported: Path | None = None) -> dict[str, Any]:
    """The study of `model` on `dataset`, named by its settings (`study_settings`): `jobs`
    processes for `minutes` each (the budget is `jobs` x `minutes` of trials, what the stored
    ones spent deducted), then its summary."""
    import optuna

    settings = study_settings(model, params, space, exported)
    name = name_of_study(dataset, model, settings)
    study = _open_study(storage, name, params.seed, create=True)
    if SETTINGS not in study.user_attrs:  # new, or named before the settings were recorded
        study.set_user_attr(SETTINGS, settings)
    if not study.trials and (why := why_a_new_study(storage, name, settings)):
        log.info("%s: %s", model, why)
    inner = with_settings(params, {"features.holdout": "inner"})
    left = minutes * 60 * jobs - spent_seconds(study)
    done = sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)  # a queued one is to run
    log.info("%s: study %r holds %d trials (%.1f min); %.1f of the %g trial-minutes left (%d process%s)", model,
             name, done, spent_seconds(study) / 60, max(left, 0) / 60, minutes * jobs, jobs, "es" if jobs > 1 else "")
    for left_over in work.glob(f"{model}-inner*/trial-*"):  # a killed call's exported trials (none runs yet)
        shutil.rmtree(left_over, ignore_errors=True)
    if left > 0 and (max_trials is None or done < max_trials):
        start_from(study, space, params)
        share = [Job(model, inner.to_dict(), space, storage, name, left / jobs, max_trials, str(work),
                     None if exported is None else str(exported), worker) for worker in range(jobs)]
        if jobs == 1:
            optimize(share[0])
        else:
            # Spawned, not forked: each process starts CUDA (and Optuna's database engine) of its own.
            context = multiprocessing.get_context("spawn")
            processes = [context.Process(target=_worker, args=(job,), daemon=True) for job in share]
            processes[0].start()
            # The others start once the first has taken the queued trial: on SQLite two processes
            # can both take one waiting trial (no row locks), and would train it twice.
            state = optuna.trial.TrialState
            while processes[0].is_alive() and study.get_trials(deepcopy=False, states=(state.WAITING,)):
                processes[0].join(0.5)
            for process in processes[1:]:
                process.start()
            for process in processes:
                process.join()
            failed = {i: p.exitcode for i, p in enumerate(processes) if p.exitcode}
            if failed:
                raise TuningError(f"{model}: process(es) {', '.join(f'{i} exited with {c}' for i, c in failed.items())}"
                                  f" (see the log above); the study {name!r} keeps every finished trial: the same "
                                  "command resumes it")
    else:
        spent = (f"the {minutes * jobs:.1f} trial-minutes are spent" if left <= 0 else
                 f"the study holds {done} trials, --max-trials {max_trials}")
        log.info("%s: %s; reporting the stored study", model, spent)
    study = _open_study(storage, name, params.seed, create=False)  # what every process stored
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "seconds": t.user_attrs.get("seconds"), "epochs_reported": len(t.intermediate_values),
               **{k: t.user_attrs[k] for k in (START, "error") if k in t.user_attrs}}
              for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = [t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs]
        raise TuningError(f"{model}: no trial of study {name!r} completed; " +
                          (f"{len(errors)} failed, the last with: {errors[-1]}" if errors else "give it more --minutes"))
    return {"study": name, "budget_minutes": minutes * jobs, "processes": jobs,
            "spent_minutes": spent_seconds(study) / 60,
            "trials": trials, "complete": len(complete),
            "pruned": sum(t["state"] == "PRUNED" for t in trials), "failed": sum(t["state"] == "FAIL" for t in trials),
            "best": study.best_trial.params, "best_value": study.best_value, "space": space}


def write_preset(path: Path, dataset: str, model: str, result: dict[str, Any], db: Path) -> None:
    header = (f"# {model} on {dataset}, tuned by `python -m benchmarks.tune` on the inner holdout\n"
              f"# (features.holdout=inner; the test split unread): study {result['study']!r} in {db},\n"
              f"# {len(result['trials'])} trials ({result['pruned']} pruned, {result['failed']} failed) in "
              f"{result['spent_minutes']:.1f} of {result['budget_minutes']:.1f} trial-minutes;\n"
              f"# best inner-holdout NDCG@10 {result['best_value']:.4f}. Lay it over the dataset's settings:\n"
              f"#   {'' if dataset == 'synthetic' else f'--params-overrides presets/{dataset}.yaml '}"
              f"--params-overrides {path}\n")
    path.write_text(header + yaml.safe_dump(nested(result["best"]), sort_keys=False))
    print(f"wrote {path}")


def exported_run_key(folder: str, settings: dict[str, Any]) -> str:
    """What an exported run's per-user scores depend on: the code that trains and scores it
    (the fine-tuning and evaluation stages' modules, and this one), the export's files, the
    text encoder's weights beside it, the cut-off and the run's settings (its seed among them)."""
    files = {f for name in ("finetune_bert", "evaluate") for f in pipeline.code_files(pipeline.STAGE[name])}
    code = {f: pipeline.DIGESTS.file(pipeline.REPO / f) for f in sorted(files)}
    code[__name__] = pipeline.DIGESTS.file(Path(__file__))
    parts = [code, pipeline.DIGESTS.tree(Path(folder)), pipeline.DIGESTS.tree(Path(folder).parent / ENCODER_DIR),
             K, settings]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_exported(tasks: list[tuple[str, dict[str, Any], str]], jobs: int) -> list[np.ndarray]:
    """Each task (an export's folder, settings, a name for the run) trained and scored by
    `train_exported` in a process of its own, `jobs` at a time: the per-user NDCG@10, in task
    order. Spawned (each starts CUDA of its own) and armed to die with the call. A process that
    dies (memory, a signal) is an error naming its run; when the call is interrupted, the
    running ones are terminated, not waited for. A run works in NAME-KEY (KEY: the start of
    `exported_run_key`) and leaves its scores there as NAME-KEY.per-user.npy: a later call (the
    study only reported, more `--ablate` rows or seeds) reads a run of the same code, export and
    settings instead of spending device time on it again."""
    from multiprocessing.connection import wait

    tasks = [(folder, settings, f"{name}-{exported_run_key(folder, settings)[:16]}") for folder, settings, name in tasks]
    results: dict[int, np.ndarray] = {}
    for i, (_, _, out) in enumerate(tasks):
        if Path(f"{out}.per-user.npy").is_file():  # written whole: saved under another name, then renamed
            results[i] = np.load(f"{out}.per-user.npy")
            log.info("%s: scored before with this code, export and settings: reused", out)
    context = multiprocessing.get_context("spawn")
    pending, running = [i for i in range(len(tasks)) if i not in results], {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop(0)
                running[i] = context.Process(target=_score_exported, args=(tasks[i],), daemon=True)
                running[i].start()
            wait([p.sentinel for p in running.values()])
            for i, process in list(running.items()):
                if process.exitcode is None:
                    continue
                del running[i]
                if process.exitcode != 0:
                    raise TuningError(f"the run in {tasks[i][2]} exited with {process.exitcode} (see the log above)")
                results[i] = np.load(f"{tasks[i][2]}.per-user.npy")
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.join()
    return [results[i] for i in range(len(tasks))]


def _score_exported(task: tuple[str, dict[str, Any], str]) -> None:
    _arm_child()
    folder, settings, out = task
    try:
        values = train_exported(Path(folder), params_from_dict(settings), Path(out))[1]
    except Terminated:
        sys.exit(128 + signal.SIGTERM)
    np.save(f"{out}.partial.npy", values)
    os.replace(f"{out}.partial.npy", f"{out}.per-user.npy")  # a reader never finds half a file


def score_test(models: dict[str, dict[str, Any]], params: Params, work: Path, seeds: int,
               on_model: Callable[[str, dict[str, Any]], None], exported: Path | None = None,
               jobs: int = 1) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Every model with its best settings, trained once per seed with `features.holdout=test`
    (the models of one seed in one root: the same features, so the same users in the same order)
    and scored on the test split; or, from an `exported` folder (holdout=test), the sequence
    model's seeds, `jobs` at a time. `on_model(model, result)` as each model's seeds are done.
    Returns the results and each model's per-user NDCG@10 by seed."""
    from components.metrics import paired_bootstrap_ratio

    best = {k: v for result in models.values() for k, v in result["best"].items()}
    runs = [with_settings(params, {**best, "features.holdout": "test", "seed": params.seed + i}) for i in range(seeds)]
    per_user: dict[str, list[np.ndarray]] = {m: [] for m in models}
    # Each seed's test split (a synthetic dataset is drawn by the seed; a real one is not).
    splits = []
    if exported is not None:
        tasks = [(str(exported), run.to_dict(), str(work / f"test-seed{run.seed}")) for run in runs]
        per_user["bert"] = run_exported(tasks, jobs)
        splits = [test_fingerprint(exported)] * len(runs)
    else:
        for run in runs:
            art = Artifacts(work / f"test-seed{run.seed}")
            for model in models:
                per_user[model].append(train_and_score(model, run, art)[1])
            splits.append(test_fingerprint(art.features))
    out: dict[str, Any] = {}
    for model in models:
        values = [float(u.mean()) for u in per_user[model]]
        for run, value in zip(runs, values):
            log.info("%s, seed %d: test NDCG@10 %.4f", model, run.seed, value)
        out[model] = {"seeds": [run.seed for run in runs], "ndcg@10": values, "mean": float(np.mean(values)),
                      "sd": float(np.std(values, ddof=1)) if seeds > 1 else None, "test_splits": splits}
        on_model(model, out[model])
    if {"mf", "bert"} <= models.keys():
        ratios = [paired_bootstrap_ratio(b, m, seed=run.seed) for b, m, run in zip(per_user["bert"], per_user["mf"], runs)]
        out["bert_over_mf"] = ratio_summary(ratios)
    return out, per_user


def ablate(model: str, best: dict[str, Any], changes: list[str], params: Params, work: Path, seeds: int,
           exported: Path | None = None, jobs: int = 1) -> dict[str, Any]:
    """`model` with its tuned settings and each single change (`KEY=VALUE`) on the inner
    holdout, `seeds` seeds each: the quality table's rows, measured where the settings were chosen (the test
    split unread). From an `exported` folder (features.holdout=inner), `jobs` runs at a time."""
    rows = {"tuned": best, **{change: {**best, **changed(model, params, best, change)} for change in changes}}
    runs = {(name, i): with_settings(params, {**settings, "features.holdout": "inner", "seed": params.seed + i})
            for name, settings in rows.items() for i in range(seeds)}
    if exported is not None:
        tasks = [(str(exported), run.to_dict(), str(work / "ablation")) for run in runs.values()]
        values = [float(v.mean()) for v in run_exported(tasks, jobs)]
    else:
        values = [train_and_score(model, run, Artifacts(work / f"ablation-seed{run.seed}"))[0] for run in runs.values()]
    out: dict[str, Any] = {}
    for ((name, i), run), value in zip(runs.items(), values):
        row = out.setdefault(name, {"settings": rows[name], "seeds": [], "ndcg@10": []})
        row["seeds"].append(run.seed)
        row["ndcg@10"].append(value)
    for name, row in out.items():
        row["mean"] = float(np.mean(row["ndcg@10"]))
        row["sd"] = float(np.std(row["ndcg@10"], ddof=1)) if seeds > 1 else None
        row["vs_tuned"] = row["mean"] / out["tuned"]["mean"] - 1 if out["tuned"]["mean"] else None
        log.info("ablation %s: inner-holdout NDCG@10 %.4f%s", name, row["mean"],
                 f" ± {row['sd']:.4f}" if row["sd"] is not None else "")
    return out


def changed(model: str, params: Params, best: dict[str, Any], change: str) -> dict[str, Any]:
    """{KEY: value} of an `--ablate KEY=VALUE`, the value parsed as `--set` parses it (yes ->
    true, 1e-4 -> a number) and checked on the tuned settings: a ParamsError naming a bad key
    or value, so a call refuses it before its study runs."""
    from components.config import apply_overrides

    key, _, value = change.partition("=")
    if not key.startswith(f"{model}.") or not value:
        raise TuningError(f"--ablate {change!r}: expected {model}.KEY=VALUE (a setting of the tuned model)")
    tuned = with_settings(params, best)
    try:
        setting = {key: _lookup(apply_overrides(tuned.to_dict(), [change]), key)}
        with_settings(tuned, setting)  # the value's type and range, beside the other settings
    except ValueError as e:
        where = "on the tuned settings" if best else "on the current settings"
        raise TuningError(f"--ablate {change!r} {where}: {e}") from None
    return setting


def fixed_by_export(key: str) -> bool:
    return key.startswith(FIXED_BY_EXPORT) and key not in TUNABLE_ON_EXPORT


def export_settings(folder: Path, holdout: str, overrides: list[str], override_files: list[Path]) -> Params:
    """The settings an export (`--input`) was written with, the call's presets and `--set` laid
    over them. A ValueError when it was written with another holdout (a `--set` here cannot turn
    a test-split export into an inner one), or when the call changes what the export fixed."""
    written = exported_params(folder, [])
    if written.features.holdout != holdout:
        raise ValueError(f"{folder}: exported with features.holdout={written.features.holdout}; this reads an "
                         f"export written with --set features.holdout={holdout}")
    params = exported_params(folder, overrides, override_files)
    before, after = flatten(written.to_dict()), flatten(params.to_dict())
    fixed = sorted(k for k in after if fixed_by_export(k) and after[k] != before.get(k))
    if fixed:
        raise ValueError(f"{folder}: fixed when the export was written (its data, split, text embeddings; only "
                         f"fine-tuning runs from it): {', '.join(fixed)}; export again with them")
    return params


def _lookup(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def ratio_summary(ratios: list[tuple[float, float, float]]) -> dict[str, Any]:
    return {"per_seed": [{"ratio": r, "ci95": [lo, hi]} for r, lo, hi in ratios],
            "mean": float(np.mean([r[0] for r in ratios])),
            "sd": float(np.std([r[0] for r in ratios], ddof=1)) if len(ratios) > 1 else None}


def save_per_user(path: Path, model: str, result: dict[str, Any], per_user: list[np.ndarray]) -> None:
    """One model's per-user test NDCG@10 by seed, with the model's name and each seed's split's
    fingerprint (`--ratio`)."""
    np.savez(path, model=np.asarray(model), test_splits=np.asarray(result["test_splits"]),
             seeds=np.asarray(result["seeds"]), **{f"seed{seed}": values for seed, values in zip(result["seeds"], per_user)})


def load_per_user(path: Path, model: str) -> dict[str, Any]:
    """A `save_per_user` file of `model`: {"splits": {seed: fingerprint}, seed: per-user values};
    a TuningError naming the file when it is missing, not such a file, or another model's."""
    try:
        with np.load(path) as f:
            held = str(f["model"])
            seeds = [int(s) for s in f["seeds"]]
            out: dict[Any, Any] = {"splits": dict(zip(seeds, (str(x) for x in f["test_splits"])))}
            out.update({s: np.asarray(f[f"seed{s}"], dtype=float) for s in seeds})
    except FileNotFoundError:
        raise TuningError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: a .npy, one bare array
        raise TuningError(f"{path}: not the per-user test scores `--score-test` writes ({e})") from None
    if held != model:
        raise TuningError(f"{path} holds {held}'s scores where {model}'s belong (--ratio BERT_NPZ MF_NPZ)")
    return out


def ratio(bert_file: Path, mf_file: Path) -> dict[str, Any]:
    """bert / mf from two `save_per_user` files (say a GPU machine's bert and this machine's
    MF), over the seeds both hold: per seed, the paired-bootstrap 95 % interval (drawn with the
    seed itself, as `score_test` draws it). An error where a seed's test splits differ, or no
    seed is shared."""
    from components.metrics import paired_bootstrap_ratio

    files = {"bert": load_per_user(bert_file, "bert"), "mf": load_per_user(mf_file, "mf")}
    splits = {name: f["splits"] for name, f in files.items()}
    seeds = [s for s in splits["bert"] if s in splits["mf"]]
    if not seeds:
        raise TuningError(f"{bert_file} and {mf_file} share no seed ({sorted(splits['bert'])} vs {sorted(splits['mf'])})")
    differ = [s for s in seeds if splits["bert"][s] != splits["mf"][s]]
    if differ:
        raise TuningError(f"{bert_file} and {mf_file} were scored on different test splits for seed(s) {differ}")
    ratios = [paired_bootstrap_ratio(files["bert"][s], files["mf"][s], seed=s) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "test_splits": [splits["bert"][s] for s in seeds],
                           "left_out": {name: sorted(set(held) - set(seeds)) for name, held in splits.items()}}
    for name, f in files.items():
        values = [float(f[s].mean()) for s in seeds]
        out[name] = {"ndcg@10": values, "mean": float(np.mean(values)),
                     "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    out["bert_over_mf"] = ratio_summary(ratios)
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(d, m) for d, models in out.items() if isinstance(models, dict)
              for m, r in models.items() if isinstance(r, dict) and "trials" in r]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels):
        trials = out[dataset][model]["trials"]
        done = [(t["number"], t["value"]) for t in trials if t["state"] == "COMPLETE"]
        pruned = [t["number"] for t in trials if t["state"] == "PRUNED"]
        if done:
            x, y = zip(*done)
            ax.scatter(x, y, s=14, label="trial")
            ax.step(x, np.maximum.accumulate(y), where="post", color="C1", label="best so far")
        for n in pruned:
            ax.axvline(n, color="grey", alpha=0.15)
        ax.set(title=f"{dataset}, {model} ({len(pruned)} pruned: grey)", xlabel="trial",
               ylabel="inner-holdout NDCG@10")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    # A terminated call (a scheduler's timeout, `kill`) unwinds like an interrupted one, so the
    # running trial's stage processes are killed with it (components/pipeline.py).
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--dataset", default="movielens-100k", choices=datasets())
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset folder")
    parser.add_argument("--models", default="mf,bert", help=f"comma-separated: {', '.join(TRAINED_BY)}")
    parser.add_argument("--minutes", type=float, default=60.0,
                        help="each model's budget: minutes of trials per process (--jobs N: N x this)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes sharing each study (and the test seeds of --input), for --minutes each")
    parser.add_argument("--max-trials", type=int, default=None, help="and at most this many trials per study (with --jobs, trials "
                        "already running when it is reached finish too); 0: no study, --ablate / --score-test "
                        "take the settings as given")
    parser.add_argument("--space", type=Path, default=None, help="YAML search spaces by model (default: SPACES)")
    parser.add_argument("--study-db", type=Path, default=Path("artifacts/tune/studies.db"),
                        help="SQLite file of the studies (resumed when it exists)")
    parser.add_argument("--input", type=Path, default=None,
                        help="tune bert on folders `python -m benchmarks.gpu export --set features.holdout=inner` "
                             "wrote (a GPU machine with PyTorch alone), not through the pipeline")
    parser.add_argument("--test-input", type=Path, default=None,
                        help="with --input and --score-test: the export with features.holdout=test")
    parser.add_argument("--score-test", action="store_true", help="then train the best settings and score the test split")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the test scoring and of each ablation row")
    parser.add_argument("--ratio", type=Path, nargs=2, metavar=("BERT_NPZ", "MF_NPZ"),
                        help="only compare two models' per-user test scores (X.<model>.test.npz of --score-test "
                             "calls, say bert's from a GPU machine and MF's from here)")
    parser.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                        help="after the study: the best settings and each such single change on the inner "
                             "holdout, --seeds seeds each (repeatable; the quality table's rows)")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/tune"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.ratio:
        result = ratio(*args.ratio)
        write_json(args.out, result)
        for name, seeds in result["left_out"].items():
            if seeds:
                print(f"left out: seed(s) {seeds} of {name}, which the other file lacks")
        cmp = result["bert_over_mf"]
        print(f"bert / mf {cmp['mean']:.3f} (per seed: " +
              ", ".join(f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in cmp["per_seed"]) + ")")
        return 0
    models = names_of(parser, "--models", args.models, TRAINED_BY)
    if not args.minutes > 0 or args.seeds < 1 or args.jobs < 1 or (args.max_trials is not None and args.max_trials < 0):
        wrong = [f"--{name} {getattr(args, name.replace('-', '_'))}" for name, ok in (
            ("minutes", args.minutes > 0), ("seeds", args.seeds >= 1), ("jobs", args.jobs >= 1),
            ("max-trials", args.max_trials is None or args.max_trials >= 0)) if not ok]
        parser.error(f"{', '.join(wrong)}: --minutes must be above 0, --seeds and --jobs at least 1, --max-trials "
                     "at least 0")
    if args.max_trials == 0 and not (args.ablate or args.score_test):
        parser.error("--max-trials 0 runs no study: give --ablate or --score-test (they take the settings as given)")
    if args.ablate and len(models) != 1:
        parser.error("--ablate changes one model's settings: name it alone in --models")
    exported = test_exported = None
    if args.input:
        if models != ["bert"]:
            parser.error("--input trains the sequence model alone: --models bert (MF needs the pipeline)")
        if args.data_dir is not None or args.params.resolve() != DEFAULT_PARAMS.resolve():
            parser.error("--input reads the settings its export was written with: --params and --data-dir belong "
                         "to `python -m benchmarks.gpu export`; --params-overrides and --set apply here")
        exported = args.input / args.dataset
        if not exported.is_dir() and args.input.is_dir():
            held = sorted(d.name for d in args.input.iterdir() if (d / "params.json").is_file())
            parser.error(f"{args.input} holds no export of --dataset {args.dataset}"
                         f" ({'it holds: ' + ', '.join(held) if held else 'nor of any other'})")
        if args.score_test and args.test_input is None:
            parser.error("--score-test with --input needs --test-input (the export with features.holdout=test)")
        try:
            params = export_settings(exported, "inner", args.overrides, args.override_files)
            if args.score_test:
                test_exported = args.test_input / args.dataset
                export_settings(test_exported, "test", args.overrides, args.override_files)
        except ValueError as e:
            parser.error(str(e))
    else:
        params = dataset_params(args.params, args.dataset, args.data_dir, args.overrides, args.override_files)
    for change in args.ablate:  # refused now, not after the study (the tuned settings checked then)
        try:
            changed(models[0], params, {}, change)
            if exported is not None:  # what the export must carry for it (the encoder's weights)
                exported_params(exported, [*args.overrides, change], args.override_files)
        except (TuningError, ValueError) as e:
            parser.error(str(e))
    try:
        spaces = read_yaml(args.space, "search space file") if args.space else SPACES
    except ParamsError as e:
        parser.error(f"--space: {e}")
    if not isinstance(spaces, dict):
        parser.error(f"{args.space}: expected a mapping of models to their search spaces")
    try:
        spaces = {m: check_space(m, spaces.get(m), params) for m in models}
    except ValueError as e:
        parser.error(f"{args.space or 'SPACES'}: {e}")
    if exported is not None and TOWER_LAYERS in spaces["bert"] and args.max_trials != 0:
        try:  # trials that would train the text tower need the encoder's weights in the export
            exported_params(exported, [*args.overrides, f"{TOWER_LAYERS}=1"], args.override_files)
        except ValueError as e:
            parser.error(f"{args.space}: {e}")
    if exported is not None:  # the export ran these stages already: changing them would change nothing
        fixed = [k for k in [*spaces["bert"], *(c.partition("=")[0] for c in args.ablate)] if fixed_by_export(k)]
        if fixed:
            parser.error(f"--input: fixed when the export was written (it holds the text embeddings, and only "
                         f"fine-tuning runs): {', '.join(fixed)}; tune or ablate them through the pipeline")
    args.study_db.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{args.study_db.resolve()}"
    work = args.workdir / args.dataset
    results: dict[str, Any] = {}
    out = {args.dataset: results}
    for model in models:
        if args.max_trials == 0:
            # The settings as given (the dataset's preset, --set): no study to run or to report.
            results[model] = {"study": None, "best": {}, "complete": 0}
            log.info("%s: --max-trials 0, no study: the settings as given", model)
            continue
        start = time.perf_counter()
        results[model] = tune_model(model, params, spaces[model], work, storage, args.dataset, args.minutes,
                                    args.max_trials, args.jobs, exported)
        write_preset(args.out.with_name(f"{args.out.stem}.{model}.yaml"), args.dataset, model, results[model],
                     args.study_db)
        print(f"{args.dataset} {model}: best inner-holdout NDCG@10 {results[model]['best_value']:.4f} "
              f"({results[model]['complete']} complete, {results[model]['pruned']} pruned; "
              f"{time.perf_counter() - start:.0f} s this call) with {results[model]['best']}")
        save(out, args.out, plot)
    if args.ablate:
        model = models[0]
        log.info("ablation on the inner holdout: the tuned settings and %s, %d seed(s) each", ", ".join(args.ablate),
                 args.seeds)
        results[model]["ablation"] = ablate(model, results[model]["best"], args.ablate, params, work, args.seeds,
                                            exported, args.jobs)
        save(out, args.out, plot)
    if args.score_test:
        def scored(model: str, test: dict[str, Any]) -> None:
            results[model]["test"] = test
            sd = f" ± {test['sd']:.4f}" if test["sd"] is not None else ""
            print(f"{args.dataset} {model}: test NDCG@10 {test['mean']:.4f}{sd} over {args.seeds} seed(s)")
            save(out, args.out, plot)

        test_params = (params if test_exported is None else
                       export_settings(test_exported, "test", args.overrides, args.override_files))
        log.info("the test split, scored once: %s with the best settings, %d seed(s)", ", ".join(models), args.seeds)
        test, per_user = score_test(results, test_params, work, args.seeds, scored, test_exported, args.jobs)
        for model in models:
            save_per_user(args.out.with_name(f"{args.out.stem}.{model}.test.npz"), model, test[model], per_user[model])
        if "bert_over_mf" in test:
            results["bert_over_mf"] = test["bert_over_mf"]
            per_seed = ", ".join(f"{r['ratio']:.3f}" for r in test["bert_over_mf"]["per_seed"])
            print(f"{args.dataset}: bert / mf {test['bert_over_mf']['mean']:.3f} (per seed: {per_seed})")
        save(out, args.out, plot)
    return 0


def _main_terminable() -> int:
    try:
        return main()
    except Terminated:
        log.error("terminated: the study keeps every finished trial, and the same command resumes it")
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    run_main(_main_terminable)
