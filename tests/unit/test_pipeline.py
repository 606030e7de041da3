"""The pipeline declaration: one table drives the flow, DVC and the benchmarks, so it must be
consistent with itself, with the code and with the committed dvc.yaml."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import pipeline
from components.pipeline import LAYOUT, STAGE, STAGES, Artifacts
from tests.conftest import REPO, tiny_params

PACKAGES = ("components", "flows", "serving", "benchmarks")


def test_dvc_yaml_and_the_readme_table_are_generated_from_the_declaration():
    fix = "run `python -m components.pipeline dvc`"
    assert (REPO / "dvc.yaml").read_text() == pipeline.dvc_yaml(), f"dvc.yaml differs from components/pipeline.py: {fix}"
    readme = (REPO / "README.md").read_text()
    assert pipeline.README_BEGIN in readme and readme == pipeline.readme_with_table(readme), f"README's table: {fix}"


def test_every_stage_is_wired_to_real_arguments_artifacts_and_settings():
    params = tiny_params()
    written: set[str] = set()
    for stage in STAGES:
        names = [*stage.inputs.values(), *stage.outputs.values(), *stage.state.values()]
        assert set(names) <= set(LAYOUT), stage.name
        # Declaration order is a valid run order: every input exists before its reader runs.
        assert set(stage.inputs.values()) <= written, f"{stage.name} reads what no earlier stage writes"
        written |= set(stage.outputs.values())
        declared = {*stage.inputs, *stage.outputs, *stage.state, *stage.params}
        signature = inspect.signature(stage.resolve())
        required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
        assert required <= declared <= set(signature.parameters), stage.name
        for key in [*stage.params.values(), *pipeline.param_keys(stage), *stage.unkeyed]:
            params.get(key)  # every settings key exists
        assert (REPO / Path(*stage.command.split("."))).with_suffix(".py").is_file(), stage.command


def test_plan_runs_a_stage_with_what_it_needs_and_nothing_else():
    names = [s.name for s in pipeline.plan("evaluate")]
    assert names == ["validate", "features", "train_mf", "item_text_embeddings", "pretrain_bert", "finetune_bert",
                     "evaluate"]
    assert [s.name for s in pipeline.plan("train_mf")] == ["validate", "features", "train_mf"]
    assert {u.name for u in pipeline.upstream(STAGE["export"])} == {"features", "train_mf", "finetune_bert", "compress"}
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.plan("trian_mf")


def test_a_stage_depends_on_the_code_it_imports_and_nothing_else():
    finetune = pipeline.code_files(STAGE["finetune_bert"])
    assert {"components/bert/train.py", "components/bert/model.py", "components/bert/finetune.py"} <= set(finetune)
    features = pipeline.code_files(STAGE["features"])
    # The source's identity check reads datasets (and so synthetic), the Spark engine its
    # session module; no model code.
    assert features == ["components/datasets.py", "components/feature_table.py", "components/features.py",
                        "components/npz.py", "components/sequences.py", "components/spark.py",
                        "components/spark_features.py", "components/synthetic.py"]
    # Validation's code does not include feature building's (a change there stales features only).
    assert "components/features.py" not in pipeline.code_files(STAGE["validate"])
    # Models read the features through their contract module, not the code that builds them.
    assert "components/features.py" not in pipeline.code_files(STAGE["finetune_bert"])
    for stage in STAGES:
        files = pipeline.code_files(stage)
        assert not {"components/pipeline.py", "components/cli.py", "components/config.py"} & set(files)
        assert all(not f.startswith(("flows/", "benchmarks/", "tests/")) for f in files)


def test_the_key_follows_declared_settings_only(tmp_path):
    params = tiny_params()
    art = Artifacts(tmp_path)
    key = pipeline.stage_key(STAGE["pretrain_bert"], params, art).value
    # Fine-tuning settings cannot change pre-training: same key.
    assert pipeline.stage_key(STAGE["pretrain_bert"], tiny_params("bert.finetune.lr=0.1"), art).value == key
    assert pipeline.stage_key(STAGE["pretrain_bert"], tiny_params("bert.hidden_size=8"), art).value != key
    assert pipeline.stage_key(STAGE["finetune_bert"], tiny_params("bert.finetune.lr=0.1"), art).value != \
        pipeline.stage_key(STAGE["finetune_bert"], params, art).value
    # Where the text embeddings are computed, and whether training compiles its encoder, change
    # none of them (the same vectors, the same network and steps).
    for name in ("item_text_embeddings", "pretrain_bert", "finetune_bert", "compress"):
        for setting in ("bert.text_encoder.device=cpu", "bert.trainer.compile=true",
                        "bert.trainer.compile_mode=reduce-overhead"):
            assert pipeline.stage_key(STAGE[name], tiny_params(setting), art).value == \
                pipeline.stage_key(STAGE[name], params, art).value, (name, setting)
    # How batches are drawn is part of training.
    assert pipeline.stage_key(STAGE["finetune_bert"], tiny_params("bert.bucket_batches=4"), art).value != \
        pipeline.stage_key(STAGE["finetune_bert"], params, art).value
    assert pipeline.stage_key(STAGE["item_text_embeddings"], tiny_params("bert.text_encoder.max_length=9"), art).value \
        != pipeline.stage_key(STAGE["item_text_embeddings"], params, art).value
    # An input's content is part of the key.
    before = pipeline.stage_key(STAGE["features"], params, art).value
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "interactions.parquet").write_bytes(b"x")
    pipeline.DIGESTS.__init__()
    assert pipeline.stage_key(STAGE["features"], params, art).value != before


def _imports(path: Path, module: str) -> set[str]:
    """Project modules a file imports, anywhere in it (function bodies and `__main__` blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


MODULES = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
           for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def test_no_import_cycles():
    graph = {m: _imports(p, m) for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_serving_imports_nothing_from_training():
    for module, path in MODULES.items():
        if module.startswith("serving"):
            assert all(m.startswith("serving") for m in _imports(path, module)), module


def test_artifacts_layout():
    art = Artifacts("x")
    assert art.features == Path("x/features") and art.path("finetune_checkpoints") == Path("x/checkpoints/finetune_bert")
    with pytest.raises(AttributeError):
        art.featurez  # noqa: B018
    assert dataclasses.replace(art, root=Path("y")).bert == Path("y/bert")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stage_process_dies_with_the_process_that_started_it(tmp_path):
    """`kill -9` of a flow or tuner runs no handler: Linux itself must stop its stage process,
    or it trains on unwatched (and a second call would train beside it in the same folder)."""
    import psutil

    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "from components.pipeline import die_with_parent\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=die_with_parent())\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(120)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert child.is_running()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        child.kill()
        pytest.fail("the stage process outlived the process that started it")


def test_a_missing_input_is_explained_only_when_the_stage_failed_on_it(tmp_path):
    """The stage to run is named for a file inside an absent input; a file elsewhere (say a
    text encoder's folder) is the stage's own error, left as it was."""
    from components.pipeline import STAGE, Artifacts, missing_inputs

    art = Artifacts(tmp_path)
    for name in ("data", "validation"):  # validate ran
        art.path(name).mkdir()
        (art.path(name) / "x").touch()
    (tmp_path / "features").mkdir()  # a failed features run left it empty
    evaluate = STAGE["evaluate"]
    error = missing_inputs(evaluate, art, str(tmp_path / "mf" / "factors.npz"))
    assert str(error).startswith(f"evaluate reads {tmp_path / 'mf'}, missing or empty: run features and train_mf first")
    assert error.exit_code == 2
    assert missing_inputs(evaluate, art, "/elsewhere/config.json") is None
    assert f"reads {tmp_path / 'features'}, {tmp_path / 'mf'}, {tmp_path / 'bert'}," in str(missing_inputs(evaluate, art))
    (tmp_path / "features" / "sequences.npz").touch()
    assert missing_inputs(STAGE["train_mf"], art) is None
