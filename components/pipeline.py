"""The pipeline, declared once: where every artifact lives, and every stage.

A stage is one row of `STAGES`: the component function it runs, the settings it is handed (by
dotted params key: a component gets its own section), the artifacts it reads and writes (by name
in `LAYOUT`), and whether it runs in its own process (the Lightning stages: Lightning's DDP
launcher re-executes the command line). Everything that runs the pipeline is read off this table:

- the Prefect flow (`flows/training.py`) submits one task per stage, each waiting only for the
  stages that write its inputs, so MF and the text/BERT branch run at the same time;
- `dvc.yaml` is generated from it (`python -m components.pipeline dvc`; a test fails when the
  committed file differs);
- the benchmarks call `run(params, Artifacts(workdir), until=...)`;
- every `python -m components.<step>` CLI runs its stage through `main`.

A stage is up to date when its key matches the one recorded after it last ran and its outputs are
still the ones it wrote. The key hashes the stage's declared inputs (file contents), its declared
settings, and the source of every project module it imports (read off the import statements, so
the code that counts is the code that runs). DVC is handed the same three lists as deps and
params, so the flow and `dvc repro` agree on when a stage is stale. The BERT stages resume a
killed run only when it had the same key.

    python -m components.pipeline show              # what each stage reads, writes and depends on
    python -m components.pipeline status            # which stages are stale, and why
    python -m components.pipeline run --until evaluate
    python -m components.pipeline dvc               # regenerate dvc.yaml
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import MissingInput, Params

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# The layout: every artifact's place under the root (`artifacts/` by default)
# --------------------------------------------------------------------------------------------

LAYOUT: dict[str, str] = {
    "validation": "validation",  # Great Expectations report and Data Docs
    "data": "data",  # the validated snapshot
    "features": "features",  # ids, splits, sequences, CSR matrix, stats
    "mf": "mf",  # ALS factors
    "text_embeddings": "text_embeddings",  # frozen item-text vectors
    "pretrain": "pretrain",  # the cloze pre-trained network
    "bert": "bert",  # the recommender: deployable and selected models, factors, curve plot
    "compress": "compress",  # every pruned / quantized variant and the choice
    "bundle": "bundle",  # the ONNX serving bundle
    "eval": "eval",  # every model's metrics, slices, Recall@K, fusion weight
    # Kept across runs so that a killed training resumes; no stage reads them as inputs.
    "pretrain_checkpoints": "checkpoints/pretrain_bert",
    "finetune_checkpoints": "checkpoints/finetune_bert",
    # Small files to compare runs by (tracked by git, DVC metrics and plots): each stage's
    # `metrics/<stage>.json` and these curves.
    "metrics": "metrics",
    "pretrain_epochs": "metrics/pretrain_bert_epochs.csv",
    "finetune_epochs": "metrics/finetune_bert_epochs.csv",
    "recall_at_k": "metrics/recall_at_k.csv",
    # The stages' keys and results (what `status` and skipping read).
    "state": ".pipeline",
}


@dataclass(frozen=True)
class Artifacts:
    """The layout under one root: `Artifacts("artifacts").features` is `artifacts/features`."""

    root: Path = Path("artifacts")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def path(self, name: str) -> Path:
        if name not in LAYOUT:
            raise KeyError(f"no artifact named {name!r} in the layout")
        return self.root / LAYOUT[name]

    def __getattr__(self, name: str) -> Path:
        if name in LAYOUT:
            return self.root / LAYOUT[name]
        raise AttributeError(name)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Stage:
    name: str
    # "module:function": the component function the stage runs.
    function: str
    # Function argument -> dotted params key (a section, or one setting).
    params: Mapping[str, str]
    # Function argument -> artifact name: what it reads, what it writes.
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    # Function argument -> artifact kept across runs (checkpoints): neither read nor produced.
    state: Mapping[str, str] = field(default_factory=dict)
    # Parts of the handed settings that cannot change the outputs (not in the key).
    unkeyed: tuple[str, ...] = ()
    # A params key naming an outside path the stage reads (the data source).
    source: str | None = None
    # The module `python -m` runs (DVC's command; the own-process runner); default: the function's.
    cli: str | None = None
    own_process: bool = False
    # Retries sit on I/O (reading the source, the embedding cache), not on deterministic math.
    retries: int = 0

    @property
    def module(self) -> str:
        return self.function.split(":")[0]

    @property
    def command(self) -> str:
        return self.cli or self.module

    def resolve(self) -> Callable[..., Any]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


# How kernels run, not what they compute: where the text embeddings are computed (the same fp32
# vectors on either device), whether training compiles its encoder (the same network and
# steps, fused kernels) and whether the text tower keeps its frozen layers' output (the same
# vectors, computed once). Changing them makes nothing stale.
DEVICE_ONLY = ("bert.text_encoder.device", "bert.trainer.compile", "bert.trainer.compile_mode",
               "bert.text_encoder.cache_frozen")

# Which engine validates and builds the features, and how its session is set up: both engines
# give identical outputs (tests/integration/test_spark.py holds them to it), so switching makes nothing stale.
ENGINE_ONLY = ("data.engine", "data.spark")

STAGES: tuple[Stage, ...] = (
    Stage(
        "validate", "components.validate:validated_snapshot",
        params={"source": "data", "cfg": "validation", "seed": "seed"},
        unkeyed=ENGINE_ONLY,
        outputs={"data_dir": "data", "out_dir": "validation"},
        source="data.path", retries=1,
    ),
    Stage(
        "features", "components.features:build_features",
        # `data`, `seed`: the snapshot must come from the source the settings name.
        params={"cfg": "features", "source": "data", "seed": "seed"},
        unkeyed=ENGINE_ONLY,
        inputs={"data_dir": "data"}, outputs={"out_dir": "features"},
    ),
    Stage(
        "train_mf", "components.train_mf:train_mf",
        params={"cfg": "mf", "seed": "seed"},
        inputs={"features_dir": "features"}, outputs={"out_dir": "mf"},
    ),
    Stage(
        "item_text_embeddings", "components.bert.text_embeddings:embed_item_texts",
        params={"cfg": "bert.text_encoder"},
        unkeyed=DEVICE_ONLY,
        inputs={"features_dir": "features"}, outputs={"out_dir": "text_embeddings"},
        retries=1,
    ),
    Stage(
        "pretrain_bert", "components.bert.train:pretrain", cli="components.bert.pretrain",
        params={"cfg": "bert", "seed": "seed", "eval_batch_size": "evaluation.batch_size"},
        # What happens after pre-training does not change it.
        unkeyed=("bert.finetune", "bert.refit", "bert.refit_epochs", *DEVICE_ONLY),
        inputs={"features_dir": "features", "text_dir": "text_embeddings"},
        outputs={"out_dir": "pretrain", "epochs_file": "pretrain_epochs"},
        state={"checkpoint_dir": "pretrain_checkpoints"},
        own_process=True,
    ),
    Stage(
        "finetune_bert", "components.bert.train:finetune", cli="components.bert.finetune",
        params={"cfg": "bert", "seed": "seed", "eval_batch_size": "evaluation.batch_size"},
        unkeyed=DEVICE_ONLY,
        inputs={"features_dir": "features", "text_dir": "text_embeddings", "pretrain_dir": "pretrain",
                "pretrain_curve": "pretrain_epochs"},
        outputs={"out_dir": "bert", "epochs_file": "finetune_epochs"},
        state={"checkpoint_dir": "finetune_checkpoints"},
        own_process=True,
    ),
    Stage(
        "compress", "components.compress:compress",
        params={"cfg": "compress", "export": "export", "bert": "bert", "seed": "seed"},
        unkeyed=DEVICE_ONLY,
        inputs={"features_dir": "features", "bert_dir": "bert"}, outputs={"out_dir": "compress"},
    ),
    Stage(
        "export", "components.export:export_bundle",
        # `validation`: the bundle carries what training accepts of an event (the service checks).
        params={"cfg": "export", "rules": "validation"},
        inputs={"features_dir": "features", "bert_dir": "bert", "mf_dir": "mf", "compress_dir": "compress"},
        outputs={"out_dir": "bundle"},
    ),
    Stage(
        "evaluate", "components.evaluate:evaluate_models",
        params={"cfg": "evaluation", "fusion": "fusion"},
        inputs={"features_dir": "features", "mf_dir": "mf", "bert_dir": "bert"},
        outputs={"out_dir": "eval", "curve_file": "recall_at_k"},
    ),
)
STAGE: dict[str, Stage] = {s.name: s for s in STAGES}

# DVC plot definitions of the curve files (`dvc plots show` / `dvc plots diff`).
PLOTS: dict[str, dict[str, Any]] = {
    "recall_at_k": {"title": "Recall@K on test (full ranking)", "template": "linear", "x": "k",
                    "y": "${evaluation.models}"},
    "finetune_epochs": {"title": "BERT fine-tuning, validation NDCG@10 per epoch", "template": "linear",
                        "x": "epoch", "y": ["val_ndcg10"]},
    "pretrain_epochs": {"title": "BERT cloze pre-training, validation NDCG@10 per epoch", "template": "linear",
                        "x": "epoch", "y": ["val_ndcg10"]},
}


def upstream(stage: Stage) -> list[Stage]:
    """The stages that write what `stage` reads."""
    writers = {name: s for s in STAGES for name in s.outputs.values()}
    return list({writers[n].name: writers[n] for n in stage.inputs.values() if n in writers}.values())


def plan(until: str | Iterable[str] | None = None) -> list[Stage]:
    """The stages to run for `until` (names; None: all): them and everything they need, in
    declaration order."""
    if until is None:
        return list(STAGES)
    wanted = [until] if isinstance(until, str) else list(until)
    unknown = [n for n in wanted if n not in STAGE]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGE)}")
    needed: set[str] = set()
    todo = deque(wanted)
    while todo:
        name = todo.popleft()
        if name not in needed:
            needed.add(name)
            todo.extend(s.name for s in upstream(STAGE[name]))
    return [s for s in STAGES if s.name in needed]


# --------------------------------------------------------------------------------------------
# What a stage depends on: code, settings, inputs
# --------------------------------------------------------------------------------------------

PROJECT_PACKAGES = ("components", "serving")
# Orchestration plumbing, not computation: settings enter a key by value (the params part), and
# the layout by the paths it yields.
PLUMBING = frozenset({"components.pipeline", "components.cli", "components.config"})


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# CPython 3.11's parser is not safe to call from several threads at once (it fails with
# "AST constructor recursion depth mismatch"); the flow computes keys in its task threads.
_PARSE_LOCK = threading.Lock()


def _imported_modules(path: Path, module: str) -> set[str]:
    """Project modules `path` imports, at module level or inside functions (both run)."""
    with _PARSE_LOCK:
        return set(_imports_of(path, module, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=None)
def _imports_of(path: Path, module: str, mtime_ns: int) -> frozenset[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [f"{base}.{a.name}" for a in node.names]
            # `from package import module` imports the module; `from module import name`, the module.
            if any(_module_file(n) is None for n in names):
                names.append(base)
        for name in names:
            while name and _module_file(name) is None:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PROJECT_PACKAGES:
                found.add(name)
    return frozenset(found)


def code_files(stage: Stage) -> list[str]:
    """Source files (relative to the repository) whose code the stage runs."""
    seen: set[str] = set()
    todo = deque([stage.module, stage.command])
    while todo:
        module = todo.popleft()
        if module in seen or module in PLUMBING:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen.add(module)
        todo.extend(_imported_modules(path, module) - seen)
    return sorted(str(_module_file(m).relative_to(REPO)) for m in seen)


def _schema_field(dotted: str) -> Any:
    tp: Any = Params
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def param_keys(stage: Stage) -> list[str]:
    """The dotted settings a stage's outputs depend on (its handed sections minus `unkeyed`)."""

    def expand(dotted: str) -> list[str]:
        if dotted in stage.unkeyed:
            return []
        if not any(u.startswith(dotted + ".") for u in stage.unkeyed):
            return [dotted]
        return [k for f in dataclasses.fields(_schema_field(dotted)) for k in expand(f"{dotted}.{f.name}")]

    return [k for dotted in dict.fromkeys(stage.params.values()) for k in expand(dotted)]


def _jsonable(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class _Digests:
    """sha256 of files and folders, each file read once per (path, size, mtime)."""

    def __init__(self) -> None:
        self._files: dict[tuple, str] = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._files:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._files[key] = digest.hexdigest()
        return self._files[key]

    def tree(self, path: Path) -> str | None:
        """Digest of a file or a folder (names and contents); None when it does not exist."""
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return None
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(f.relative_to(path)).encode() + b"\0" + self.file(f).encode())
        return digest.hexdigest()


DIGESTS = _Digests()


@dataclass(frozen=True)
class Key:
    value: str
    parts: dict[str, Any]


def stage_key(stage: Stage, params: Params, art: Artifacts) -> Key:
    """Hash of the stage's code, settings and inputs (see the module docstring)."""
    parts: dict[str, Any] = {
        "code": {f: DIGESTS.file(REPO / f) for f in code_files(stage)},
        "params": {k: _jsonable(params.get(k)) for k in param_keys(stage)},
        "inputs": {n: DIGESTS.tree(art.path(n)) for n in stage.inputs.values()},
    }
    if stage.source:
        parts["source"] = DIGESTS.tree(Path(params.get(stage.source)))
    value = hashlib.sha256(json.dumps([stage.name, parts], sort_keys=True, default=str).encode()).hexdigest()
    return Key(value, parts)


# --------------------------------------------------------------------------------------------
# Running a stage
# --------------------------------------------------------------------------------------------


class StageFailed(RuntimeError):
    exit_code = 1


@dataclass(frozen=True)
class Outcome:
    stage: str
    result: Any
    skipped: bool
    # What the run that produced `result` took (an earlier one when skipped).
    seconds: float


def _stamp_path(stage: Stage, art: Artifacts) -> Path:
    return art.state / f"{stage.name}.json"


def _result_path(stage: Stage, art: Artifacts) -> Path:
    return art.state / f"{stage.name}.result.pkl"


def _outputs(stage: Stage, art: Artifacts) -> dict[str, str | None]:
    return {n: DIGESTS.tree(art.path(n)) for n in stage.outputs.values()}


def load_result(stage: str | Stage, art: Artifacts) -> Any:
    """The result the stage returned when it last ran in `art` (any runner: flow, CLI, DVC)."""
    stage = STAGE[stage] if isinstance(stage, str) else stage
    path = _result_path(stage, art)
    if not path.exists():
        raise MissingInput(f"{stage.name} has not run in {art.root}: run the pipeline first")
    with path.open("rb") as f:
        return pickle.load(f)


def staleness(stage: Stage, params: Params, art: Artifacts, key: Key | None = None) -> list[str]:
    """Why the stage must run (empty: up to date)."""
    stamp_path = _stamp_path(stage, art)
    if not stamp_path.exists() or not _result_path(stage, art).exists():
        return ["never ran here"]
    stamp = json.loads(stamp_path.read_text())
    key = key or stage_key(stage, params, art)
    reasons = []
    if stamp.get("key") != key.value:
        old = stamp.get("parts", {})
        for part in ("code", "params", "inputs", "source"):
            before, now = old.get(part), key.parts.get(part)
            if before == now:
                continue
            if isinstance(now, dict) and isinstance(before, dict):
                changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
                reasons.append(f"{part} changed: {', '.join(changed)}")
            else:
                reasons.append(f"{part} changed")
        reasons = reasons or ["key changed"]
    outputs = _outputs(stage, art)
    changed = sorted(n for n, d in outputs.items() if d != stamp.get("outputs", {}).get(n))
    if changed:
        reasons.append(f"outputs missing or modified: {', '.join(changed)}")
    return reasons


def _is_rank_zero() -> bool:
    # Lightning's DDP launcher starts the other ranks with LOCAL_RANK / NODE_RANK set.
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def call(stage: Stage, params: Params, art: Artifacts, run_key: str | None = None) -> Any:
    """Run the stage's function in this process with its declared arguments."""
    fn = stage.resolve()
    kwargs: dict[str, Any] = {arg: art.path(name)
                              for mapping in (stage.inputs, stage.outputs, stage.state)
                              for arg, name in mapping.items()}
    kwargs.update({arg: params.get(key) for arg, key in stage.params.items()})
    if "run_key" in inspect.signature(fn).parameters:
        kwargs["run_key"] = run_key
    return fn(**kwargs)


def downstream(stage: Stage) -> list[Stage]:
    """Every stage that depends on `stage`, directly or not, in declaration order."""
    found: set[str] = {stage.name}
    for s in STAGES:
        if any(u.name in found for u in upstream(s)):
            found.add(s.name)
    return [s for s in STAGES if s.name in found - {stage.name}]


def _invalidate_downstream(stage: Stage, art: Artifacts) -> None:
    """After a stage failed in a way that voids its old outputs (a failed validation removes the
    snapshot): no later stage counts as up to date, and what was built straight from those
    outputs goes. Models and bundles further on stay (the service may be serving one)."""
    import shutil

    for later in downstream(stage):
        _stamp_path(later, art).unlink(missing_ok=True)
        if stage in upstream(later):
            for name in later.outputs.values():
                path = art.path(name)
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                log.info("removed %s: it was built from what %s no longer vouches for", path, stage.name)


def _absent(path: Path) -> bool:
    # An empty folder counts: a writer that failed may leave one.
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def missing_inputs(stage: Stage, art: Artifacts, filename: str | None = None) -> MissingInput | None:
    """The error naming the stages to run first when an artifact the stage reads is absent, else
    None; with `filename` (the file the stage failed to find), only when it lies in such an
    artifact. Some inputs matter only under some settings (evaluate reads bert's factors only when
    it scores bert), so this explains a stage's failure to find a file rather than refusing to
    start it."""
    missing = [name for name in dict.fromkeys(stage.inputs.values()) if _absent(art.path(name))]
    if filename:
        failed = Path(os.path.abspath(filename))
        missing = [n for n in missing if failed.is_relative_to(os.path.abspath(art.path(n)))]
    if not missing:
        return None
    writers = {name: s.name for s in STAGES for name in s.outputs.values()}
    # Every stage on the way whose outputs are absent too (in a fresh folder: from validate on).
    before = [s.name for s in plan([writers[n] for n in missing if n in writers])
              if any(_absent(art.path(o)) for o in s.outputs.values())]
    run = " and ".join([", ".join(before[:-1]), before[-1]] if len(before) > 1 else before)
    return MissingInput(f"{stage.name} reads {', '.join(str(art.path(n)) for n in missing)}, missing or empty: "
                        f"run {run} first (`python -m components.pipeline run --until {stage.name} --artifacts "
                        f"{art.root}` runs what it needs)")


def execute(stage: Stage, params: Params, art: Artifacts) -> Any:
    """Run the stage here, then record its key, outputs, result and metrics (rank 0)."""
    key = stage_key(stage, params, art)
    _stamp_path(stage, art).unlink(missing_ok=True)  # a failed run leaves no valid stamp
    start = time.perf_counter()
    try:
        result = call(stage, params, art, run_key=key.value)
    except Exception as exc:
        if getattr(exc, "stales_downstream", False) and _is_rank_zero():
            _invalidate_downstream(stage, art)
        if isinstance(exc, FileNotFoundError):
            explained = missing_inputs(stage, art, exc.filename)  # a stage run by hand before its inputs
            if explained is not None:
                raise explained from exc
        raise
    if _is_rank_zero():
        _record(stage, art, key, result, time.perf_counter() - start)
    return result


def _record(stage: Stage, art: Artifacts, key: Key, result: Any, seconds: float) -> None:
    art.state.mkdir(parents=True, exist_ok=True)
    art.metrics.mkdir(parents=True, exist_ok=True)
    (art.metrics / f"{stage.name}.json").write_text(json.dumps(_finite(metrics_of(result)), indent=2) + "\n")
    with _result_path(stage, art).open("wb") as f:
        pickle.dump(result, f)
    _stamp_path(stage, art).write_text(json.dumps(
        {"key": key.value, "parts": key.parts, "outputs": _outputs(stage, art), "seconds": round(seconds, 3),
         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2, default=str))


def metrics_of(result: Any) -> dict[str, Any]:
    """What a stage's result offers for comparing runs: its `metrics()`, else its numbers."""
    if hasattr(result, "metrics"):
        return result.metrics()

    def numbers(value: Any) -> Any:
        if isinstance(value, dict):
            kept = {k: numbers(v) for k, v in value.items()}
            return {k: v for k, v in kept.items() if v is not None and v != {}}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return None

    return numbers(dataclasses.asdict(result)) if dataclasses.is_dataclass(result) else {}


def _finite(value: Any) -> Any:
    # JSON has no NaN; DVC and git diffs read these files.
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resolved_params_file(stage: Stage, params: Params, art: Artifacts) -> Path:
    """The settings, resolved (presets and overrides applied), for a stage's own process."""
    path = art.state / f"{stage.name}.params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


def _run_own_process(stage: Stage, params: Params, art: Artifacts, key: Key, emit: Callable[[str], None]) -> Any:
    """`python -m <cli>` with the resolved settings; its output lines go to `emit` as they come
    (an exception out of `emit` kills the process and propagates)."""
    cmd = [sys.executable, "-m", stage.command, "--params", str(resolved_params_file(stage, params, art).resolve()),
           "--artifacts", str(art.root.resolve())]
    from components.cli import PLAIN_LOGS

    env = {**os.environ, "PYTHONUNBUFFERED": "1", PLAIN_LOGS: "1"}
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          preexec_fn=die_with_parent()) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    tail.append(line)
                    emit(line)
        except BaseException:
            # `emit` stopped the run (a tuner pruning a trial) or this process is being
            # interrupted: the stage's process must not go on training unwatched, nor the
            # processes it started (Lightning's DDP ranks, which would hold their GPUs).
            _kill_tree(proc.pid)
            raise
        code = proc.wait()
    if code != 0:
        raise StageFailed(f"{stage.name} failed (`python -m {stage.command}` exit {code}):\n" + "\n".join(tail))
    stamp = json.loads(_stamp_path(stage, art).read_text())
    if stamp["key"] != key.value:
        raise StageFailed(f"{stage.name}: its process ran with other inputs than planned (a file changed meanwhile?)")
    return load_result(stage, art)


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux SIGKILL the child when the process that started it dies,
    however it dies (`kill -9` included, where no handler runs), so that no stage trains on
    unwatched; None elsewhere. libc is looked up here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (children first found, then killed: a
    child reparented meanwhile is still in the list)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def run_stage(stage: Stage, params: Params, art: Artifacts, force: bool = False,
              emit: Callable[[str], None] | None = None) -> Outcome:
    """Run one stage unless it is up to date (`force`: run anyway). Lines of a stage running in
    its own process go to `emit` (default: this module's logger) as they are printed."""
    emit = emit or log.info
    start = time.perf_counter()
    key = stage_key(stage, params, art)
    reasons = ["forced"] if force else staleness(stage, params, art, key)
    if not reasons:
        emit(f"{stage.name}: up to date, skipped")
        ran = json.loads(_stamp_path(stage, art).read_text()).get("seconds", 0.0)
        return Outcome(stage.name, load_result(stage, art), True, ran)
    emit(f"{stage.name}: running ({'; '.join(reasons)})")
    if stage.own_process:
        result = _run_own_process(stage, params, art, key, emit)  # it printed its own summary
    else:
        result = execute(stage, params, art)
        for line in describe(result).splitlines():
            emit(line)
    seconds = time.perf_counter() - start
    return Outcome(stage.name, result, False, seconds)


def run(params: Params, art: Artifacts, until: str | Iterable[str] | None = None, force: bool = False,
        emit: Callable[[str], None] | None = None) -> dict[str, Outcome]:
    """Run the pipeline (or what `until` needs) in order, skipping what is up to date."""
    return {s.name: run_stage(s, params, art, force, emit) for s in plan(until)}


# --------------------------------------------------------------------------------------------
# Generated: dvc.yaml
# --------------------------------------------------------------------------------------------

DVC_ROOT = "artifacts"


def _dvc_path(name: str) -> str:
    return f"{DVC_ROOT}/{LAYOUT[name]}"


def dvc_yaml() -> str:
    """`dvc.yaml`, from the declaration: the same code, settings and inputs the key hashes."""
    stages: dict[str, Any] = {}
    for s in STAGES:
        deps = code_files(s) + [_dvc_path(n) for n in dict.fromkeys(s.inputs.values())]
        if s.source:
            deps.append("${" + s.source + "}")
        entry: dict[str, Any] = {"cmd": f"python -m {s.command}", "deps": deps, "params": param_keys(s)}
        outs = [n for n in s.outputs.values() if n not in PLOTS]
        entry["outs"] = [_dvc_path(n) for n in outs]
        entry["metrics"] = [{f"{DVC_ROOT}/{LAYOUT['metrics']}/{s.name}.json": {"cache": False}}]
        plots = [n for n in s.outputs.values() if n in PLOTS]
        if plots:
            entry["plots"] = [{_dvc_path(n): {"cache": False}} for n in plots]
        stages[s.name] = entry
    plots_section = []
    for name, spec in PLOTS.items():
        spec = dict(spec)
        y = spec.pop("y")
        plots_section.append({name: {**spec, "y": {_dvc_path(name): y}}})
    header = ("# Generated from components/pipeline.py by `python -m components.pipeline dvc`: edit the\n"
              "# declaration there, not this file (a test fails when the two differ).\n"
              "# Settings come from params.yaml (`dvc exp run -S key=value` to try a change).\n")
    return header + yaml.safe_dump({"stages": stages, "plots": plots_section}, sort_keys=False, width=110)


README_BEGIN, README_END = "<!-- stages: generated by `python -m components.pipeline dvc` -->", "<!-- stages end -->"


def stage_table() -> str:
    """The README's table of stages, from the declaration."""
    rows = ["| stage (flow task, DVC stage) | component | reads | writes | settings |", "|---|---|---|---|---|"]
    for s in STAGES:
        reads = ", ".join(f"`{LAYOUT[n]}`" for n in s.inputs.values()) or f"the source (`{s.source}`)"
        writes = ", ".join(f"`{LAYOUT[n]}`" for n in s.outputs.values())
        settings = ", ".join(f"`{k}`" for k in dict.fromkeys(s.params.values()))
        own = " (own process)" if s.own_process else ""
        rows.append(f"| `{s.name}`{own} | `{s.function.replace(':', '.')}` | {reads} | {writes} | {settings} |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    return f"{head}{README_BEGIN}\n{stage_table()}\n{README_END}{tail}"


# --------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------


def main(stage_name: str) -> None:
    """`python -m components.<step>`: run that stage here (what DVC's command does)."""
    from components.cli import base_parser, params_from_args, run_main

    stage = STAGE[stage_name]

    def run_cli() -> int:
        parser = base_parser(f"Run the {stage_name} stage (components/pipeline.py declares what it reads and writes).")
        parser.add_argument("--show", action="store_true", help="print the stage's last result instead of running it")
        args = parser.parse_args()
        art = Artifacts(args.artifacts)
        if args.show:
            print(describe(load_result(stage, art)))
            return 0
        result = execute(stage, params_from_args(args), art)
        if _is_rank_zero():
            print(describe(result))
        return 0

    run_main(run_cli)


def describe(result: Any) -> str:
    return result.describe() if hasattr(result, "describe") else repr(result)


def _show() -> str:
    lines = []
    for s in STAGES:
        lines += [f"{s.name}  ({s.function}{', own process' if s.own_process else ''})",
                  f"  reads:    {', '.join(_dvc_path(n) for n in s.inputs.values()) or '-'}"
                  + (f" + the source at {s.source}" if s.source else ""),
                  f"  writes:   {', '.join(_dvc_path(n) for n in s.outputs.values())}, "
                  f"{DVC_ROOT}/{LAYOUT['metrics']}/{s.name}.json",
                  f"  settings: {', '.join(param_keys(s))}",
                  f"  code:     {', '.join(code_files(s))}",
                  f"  after:    {', '.join(u.name for u in upstream(s)) or '-'}", ""]
    return "\n".join(lines)


def cli() -> int:
    import argparse

    from components.cli import add_params_arguments, params_from_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="what each stage reads, writes and depends on")
    status = sub.add_parser("status", help="which stages are stale here, and why")
    add_params_arguments(status)
    runner = sub.add_parser("run", help="run the stages (without Prefect), skipping what is up to date")
    add_params_arguments(runner)
    runner.add_argument("--until", action="append", default=None, metavar="STAGE", choices=list(STAGE),
                        help=f"only this stage and what it needs (repeatable): {', '.join(STAGE)}")
    runner.add_argument("--force", action="store_true", help="rerun every stage")
    gen = sub.add_parser("dvc", help="write dvc.yaml and the README's stage table from the declaration")
    gen.add_argument("--check", action="store_true", help="exit 1 when either differs (writes nothing)")
    args = parser.parse_args()

    if args.command == "show":
        print(_show())
    elif args.command == "dvc":
        readme = REPO / "README.md"
        generated = {REPO / "dvc.yaml": dvc_yaml(), readme: readme_with_table(readme.read_text())}
        stale = [p.name for p, text in generated.items() if not p.exists() or p.read_text() != text]
        if args.check:
            if stale:
                print(f"{', '.join(stale)} differ from components/pipeline.py: run `python -m components.pipeline dvc`",
                      file=sys.stderr)
                return 1
            print("dvc.yaml and the README's stage table match the declaration")
        else:
            for path, text in generated.items():
                path.write_text(text)
            print(f"wrote {', '.join(p.name for p in generated)}")
    elif args.command == "status":
        params, art = params_from_args(args), Artifacts(args.artifacts)
        for s in STAGES:
            reasons = staleness(s, params, art)
            print(f"{s.name:22s} {'up to date' if not reasons else 'stale: ' + '; '.join(reasons)}")
    else:
        run(params_from_args(args), Artifacts(args.artifacts), until=args.until, force=args.force, emit=print)
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(cli)
