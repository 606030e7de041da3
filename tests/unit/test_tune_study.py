"""benchmarks.tune's study bookkeeping, on Optuna's in-memory storage: the trial a study starts
from (the dataset's own settings), queued once, again when it failed, partly where the space
lacks a setting; the per-user score files `--ratio` pairs, refused when wrong; the study's name, and
what a new study says about the settings that differ from the one before it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest

from benchmarks.tune import (
    SETTINGS, START, TuningError, load_per_user, ratio, save_per_user, start_from, study_name, study_settings,
    why_a_new_study,
)
from tests.conftest import tiny_params

SPACE = {"mf.factors": {"choice": [8, 16]}, "mf.regularization": {"log": [0.01, 100.0]}}


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize")


def _run_queued(study: optuna.Study, fail: bool = False) -> None:
    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("mf.factors", [8, 16])
        trial.suggest_float("mf.regularization", 0.01, 100.0, log=True)
        if fail:
            raise RuntimeError("out of memory")
        return 0.5

    study.optimize(objective, n_trials=1, catch=(RuntimeError,))


def test_the_starting_trial_is_queued_once_and_again_when_it_failed():
    params = tiny_params()
    study = _study()
    start_from(study, SPACE, params)
    start_from(study, SPACE, params)  # already waiting: not twice
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs == {START: True}
    _run_queued(study, fail=True)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.params == {"mf.factors": params.mf.factors, "mf.regularization": params.mf.regularization}
    # Failed (a lost machine, memory): the next call queues it again; run to its end, never again.
    start_from(study, SPACE, params)
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1
    _run_queued(study)
    assert study.trials[1].state == optuna.trial.TrialState.COMPLETE and study.trials[1].params == first.params
    start_from(study, SPACE, params)
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))


def test_a_setting_outside_the_space_is_left_to_the_sampler_the_rest_queued(caplog):
    params = tiny_params("mf.regularization=0.0")  # outside a log range: TPE cannot hold 0
    study = _study()
    with caplog.at_level("INFO", logger="benchmarks.tune"):
        start_from(study, SPACE, params)
    assert "mf.regularization=0.0" in caplog.text
    _run_queued(study)
    trial = study.trials[0]
    assert trial.user_attrs == {START: True} and trial.params["mf.factors"] == params.mf.factors
    assert 0.01 <= trial.params["mf.regularization"] <= 100.0
    # Nothing of the space held: nothing to start from.
    study = _study()
    start_from(study, {"mf.regularization": {"log": [0.01, 100.0]}}, params)
    assert not study.trials


def test_per_user_scores_pair_only_as_written(tmp_path):
    splits = {"seeds": [42, 43], "test_splits": ["aaaa", "bbbb"]}
    rng = np.random.default_rng(0)
    bert = [rng.random(50), rng.random(50)]
    mf = [rng.random(50), rng.random(50)]
    save_per_user(tmp_path / "b.npz", "bert", splits, bert)
    save_per_user(tmp_path / "m.npz", "mf", splits, mf)
    loaded = load_per_user(tmp_path / "b.npz", "bert")
    assert loaded["splits"] == {42: "aaaa", 43: "bbbb"} and np.array_equal(loaded[43], bert[1])
    out = ratio(tmp_path / "b.npz", tmp_path / "m.npz")
    assert out["seeds"] == [42, 43] and out["left_out"] == {"bert": [], "mf": []}
    assert out["bert_over_mf"]["per_seed"][0]["ratio"] == pytest.approx(bert[0].mean() / mf[0].mean())
    # A seed one file lacks is left out, and said.
    save_per_user(tmp_path / "m1.npz", "mf", {"seeds": [42], "test_splits": ["aaaa"]}, mf[:1])
    one = ratio(tmp_path / "b.npz", tmp_path / "m1.npz")
    assert one["seeds"] == [42] and one["left_out"] == {"bert": [43], "mf": []}
    # Swapped, missing, or not such a file: an error naming it, no traceback.
    with pytest.raises(TuningError, match="holds mf's scores where bert's belong"):
        ratio(tmp_path / "m.npz", tmp_path / "b.npz")
    with pytest.raises(TuningError, match="nope.npz: no such file"):
        ratio(tmp_path / "nope.npz", tmp_path / "m.npz")
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(TuningError, match="junk.npz: not the per-user test scores"):
        ratio(tmp_path / "b.npz", tmp_path / "junk.npz")
    np.save(tmp_path / "array.npy", mf[0])
    with pytest.raises(TuningError, match="array.npy: not the per-user test scores"):
        ratio(tmp_path / "b.npz", tmp_path / "array.npy")
    np.savez(tmp_path / "old.npz", seeds=np.asarray([42]), test_splits=np.asarray(["aaaa"]), seed42=mf[0])
    with pytest.raises(TuningError, match="old.npz: not the per-user test scores"):
        ratio(tmp_path / "b.npz", tmp_path / "old.npz")


def test_a_study_is_named_by_what_changes_results():
    """Where and how the work runs (device, compilation, the cached text layers, the feature
    engine) opens no new study, nor does the other model's setting; a setting that changes the
    trials (the model's own, or one of a stage before its training), or the space, does."""
    base = tiny_params()
    name = study_name("d", "bert", base, SPACE)
    assert name.startswith("d-bert-")
    for same in ("bert.trainer.compile=true", "bert.text_encoder.cache_frozen=false", "data.engine=spark"):
        assert study_name("d", "bert", tiny_params(same), SPACE) == name, same
    assert study_name("d", "bert", tiny_params("bert.dropout=0.3"), SPACE) != name
    assert study_name("d", "bert", base, {"mf.factors": {"choice": [8]}}) != name
    # What the stages before training read counts; the other model's settings do not.
    assert study_name("d", "bert", tiny_params("features.min_item_interactions=3"), SPACE) != name
    assert study_name("d", "bert", tiny_params("mf.factors=3"), SPACE) == name
    mf = study_name("d", "mf", base, {})
    assert study_name("d", "mf", tiny_params("bert.dropout=0.3", "bert.trainer.compile=true"), {}) == mf
    assert study_name("d", "mf", tiny_params("features.min_user_interactions=2"), {}) != mf
    assert study_name("d", "mf", tiny_params("mf.recency_boost=2"), {}) != mf
    # Pinned: a refactor that changed the hash's input would orphan every stored study silently.
    # (A changed default of an MF, feature or data setting in params.yaml moves it rightly: re-pin.)
    # With k-core off (both real datasets' presets) the name is the one of before 2026-11-29's
    # inner-split change; with it on the inner split changed, and so did the name (it was
    # d-mf-7cb0252ffd), so no study mixes trials of the two.
    assert mf == "d-mf-af7f640d27"
    no_core = ("features.min_user_interactions=0", "features.min_item_interactions=0")
    assert study_name("d", "mf", tiny_params(*no_core), {}) == "d-mf-26f3c66ada"


def test_a_new_study_names_the_settings_that_differ_from_the_one_run_last(tmp_path):
    """A changed setting opens a new, empty study, which looks like a lost one: the call says
    which settings differ from the other study of the same dataset and model that ran a trial
    last (recorded with each study), or that it recorded none. Other models' studies, studies
    that never ran a trial (a queued one only) and the study itself are not compared."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"

    def stored(name: str, settings: dict | None, trials: int = 1) -> optuna.Study:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        if settings is not None:
            study.set_user_attr(SETTINGS, settings)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
        return study

    current = tiny_params("bert.dropout=0.3", "bert.positions=absolute+relative")
    first = study_settings("bert", tiny_params("bert.dropout=0.2"), SPACE)
    now = study_settings("bert", current, SPACE)
    name = study_name("d", "bert", current, SPACE)
    assert why_a_new_study(storage, name, now) is None  # nothing before it
    stored("d-mf-0000000000", study_settings("mf", tiny_params(), {}))  # another model's
    stored("d-bert-empty00000", first, trials=0)  # never ran a trial
    stored("d-bert-queued0000", first, trials=0).enqueue_trial({"x": 0.5})  # a killed call's
    assert why_a_new_study(storage, name, now) is None
    stored("d-bert-9999999999", None)  # from before the settings were recorded
    assert "'d-bert-9999999999' (1 trial), recorded no settings" in why_a_new_study(storage, name, now)
    # Run last, though it sorts first by name; the study resumed last counts, not the one begun last.
    resumed = stored("d-bert-0000000001", first, trials=2)
    stored(name, now)  # the study itself is not compared with itself
    why = why_a_new_study(storage, name, now)
    assert "the other study of d-bert run last, 'd-bert-0000000001' (2 trials)" in why
    assert why.endswith("ran with other settings: bert.dropout 0.2 -> 0.3; bert.positions 'absolute' -> "
                        "'absolute+relative'")
    optuna.load_study(study_name="d-bert-9999999999", storage=storage).optimize(lambda t: 0.0, n_trials=1)
    assert "'d-bert-9999999999' (2 trials), recorded no settings" in why_a_new_study(storage, name, now)
    resumed.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    wider = {**SPACE, "mf.alpha": {"log": [1.0, 10.0]}}
    assert why_a_new_study(storage, name, study_settings("bert", tiny_params("bert.dropout=0.2"), wider)).endswith(
        "ran with other settings: the search space (mf.alpha.log unset -> [1.0, 10.0])")


def test_an_exported_study_is_named_alike_wherever_the_export_lies(tmp_path):
    """An export's own encoder (the path `exported_params` writes) is hashed as the path the
    export recorded: the same export given by another path, or moved, resumes its study; an
    export of another encoder, or another encoder set, does not."""
    import json

    def export(folder: Path, encoder: str) -> Path:
        (folder / "d").mkdir(parents=True)
        (folder / "d" / "params.json").write_text(json.dumps({"bert": {"text_encoder": {"path": encoder}}}))
        return folder / "d"

    def name(encoder: str, exported: Path) -> str:
        return study_name("d", "bert", tiny_params(f"bert.text_encoder.path={encoder}"), SPACE, exported)

    minilm = export(tmp_path / "x", "/venv/minilm")
    here = name(str(tmp_path / "x" / "text-encoder"), minilm)
    moved = export(tmp_path / "moved", "/venv/minilm")
    assert name(str(tmp_path / "moved" / "text-encoder"), moved) == here
    other = export(tmp_path / "other", "/venv/mpnet")
    assert name(str(tmp_path / "other" / "text-encoder"), other) != here
    assert name("/work/other-encoder", minilm) != here
