"""Typed settings: `params.yaml` parsed once into frozen dataclasses.

`params.yaml` is the single source of settings (DVC reads the same file). The dataclasses below
carry no defaults on purpose: a key missing from the file is an error, so the file and the code
cannot silently disagree. Unknown keys and wrong types are errors that name the dotted key.

Overrides use the syntax of `dvc exp run -S`: `dotted.key=value`, the value parsed as YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """Settings that cannot work: a file or override that does not match the schema, or values
    that leave nothing to do (k-core thresholds above every count). The message names the key."""

    exit_code = 2  # a CLI prints the message and exits with this, no traceback


class MissingInput(FileNotFoundError):
    """An input an earlier step writes is not there; the message names the step to run."""

    exit_code = 2  # a CLI prints the message and exits with this, no traceback


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int
    n_items: int
    n_interactions: int
    n_topics: int
    # Zipf exponent of item popularity inside a topic (0 = uniform).
    popularity_exponent: float
    # Probability, per interaction, that the user moves on to a new topic phase.
    topic_switch_prob: float
    # Probability that the next item is the successor of the previous one in its topic's
    # chain (series, sequels, accessories): the signal only an order-aware model can use.
    successor_prob: float
    start_timestamp: int
    mean_gap_seconds: float


@dataclass(frozen=True)
class FileColumns:
    user_id: str
    item_id: str
    timestamp: str
    weight: str | None
    split: str | None


@dataclass(frozen=True)
class FilesConfig:
    interactions: str
    items: str
    columns: FileColumns
    item_id_column: str
    text_columns: list[str]
    encoding: str


@dataclass(frozen=True)
class SparkConfig:
    # local[*] (this machine's cores), spark://host:7077, yarn, k8s://https://host:443.
    master: str
    # Spark settings by their Spark names, passed to the session as they are.
    conf: dict[str, str]

    def __post_init__(self) -> None:
        wrong = sorted(k for k in self.conf if not k.startswith("spark."))
        if wrong:
            raise ParamsError(f"data.spark.conf: Spark settings start with 'spark.', got {', '.join(wrong)}")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "movielens-100k", "unisrec", "files"]
    path: str
    download: bool
    unisrec_name: str | None
    synthetic: SyntheticConfig
    files: FilesConfig
    # What validation and feature building run on: `default` (Polars, streaming, this machine)
    # or `spark` (a Spark session, `spark` below). Both give identical outputs.
    engine: Literal["default", "spark"]
    spark: SparkConfig


@dataclass(frozen=True)
class ValidationConfig:
    min_interactions: int
    min_users: int
    max_duplicate_fraction: float
    min_timestamp: int
    # Timestamps later than "now + max_future_seconds" are rejected (clock skew allowance).
    max_future_seconds: int
    weight_min: float | None
    weight_max: float | None
    sample_size: int
    # Interactions reach Great Expectations (pandas) in batches of about this many rows.
    batch_rows: int

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise ParamsError(f"validation.batch_rows must be at least 1, got {self.batch_rows}")


@dataclass(frozen=True)
class FeaturesConfig:
    min_user_interactions: int
    min_item_interactions: int
    split: Literal["leave_one_out", "temporal"]
    temporal_valid_fraction: float
    temporal_test_fraction: float
    holdout: Literal["test", "inner"]


@dataclass(frozen=True)
class EvaluationConfig:
    ks: list[int]
    models: list[str]
    batch_size: int
    short_history_max: int
    head_fraction: float
    # Users scored per split: null = every user with a target; N = a uniform sample of N users
    # (the same for every model), drawn with `sample_seed`.
    max_users: int | None
    sample_seed: int


@dataclass(frozen=True)
class MFConfig:
    factors: int
    regularization: float
    alpha: float
    iterations: int
    use_weights: bool
    # Confidence x (1 + boost * 0.5^(k / half_life)), k = later interactions of the user; 0 = off.
    recency_half_life: float
    recency_boost: float
    num_threads: int
    # The test model (fitted on training + validation): retrain = a fresh fit of `iterations`;
    # continue = `refit_iterations` more from the validation model's factors (cheaper at scale).
    refit: Literal["retrain", "continue"]
    refit_iterations: int
    # Where ALS fits: auto (implicit's CUDA build when it finds a GPU), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"]

    def __post_init__(self) -> None:
        if self.refit_iterations < 0:
            raise ParamsError(f"mf.refit_iterations must be at least 0, got {self.refit_iterations}")


@dataclass(frozen=True)
class TextEncoderConfig:
    # A local Hugging Face BERT folder; null = the bundled all-MiniLM-L6-v2.
    path: str | None
    max_length: int
    batch_size: int
    cache_dir: str
    # Top layers of the text encoder trained with the recommender (0 = frozen embeddings).
    finetune_layers: int
    # With finetune_layers: the frozen layers' output computed once for the catalogue (memory:
    # items x longest text x width floats) instead of every step.
    cache_frozen: bool
    # Where the frozen embeddings are computed: auto (the GPU when there is one), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class StageConfig:
    enabled: bool
    max_epochs: int
    lr: float
    # Epochs without a better validation NDCG@10 before stopping.
    patience: int


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu"]
    devices: int
    num_nodes: int
    strategy: Literal["auto", "ddp", "ddp_spawn"]
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
    # torch intra-op threads (0 = torch's default).
    num_threads: int
    # Compare parameter hashes across DDP ranks after the first step.
    check_replicas: bool
    # Training on a CPU: dropout masks four elements to a 64-bit random draw
    # (`components.bert.dropout`), attention weights included. GPUs keep torch's own dropout.
    packed_dropout: bool
    # torch.compile of the sequence encoder in training (dynamic shapes: one graph for every
    # batch width). Off by default: on an H100 it cost ~40 s per run for 7-18 % more fp32
    # throughput over fixed steps (benchmarks/README.md "GPU").
    compile: bool
    # torch.compile's mode: reduce-overhead also replays each batch shape's kernels as one CUDA
    # graph (GPU only; a graph is recorded per distinct batch width).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(frozen=True)
class BertRecConfig:
    text_encoder: TextEncoderConfig
    mode: Literal["text", "id", "text+id"]
    max_len: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    positions: Literal["absolute", "relative", "absolute+relative"]
    residual: Literal["plain", "gated"]
    dropout: float
    # Dropout on the attention weights, apart from the rest: on a CPU it keeps attention off the
    # fused kernel (see benchmarks/README.md "CPU fine-tuning speed").
    attention_dropout: float
    text_whitening: bool
    text_adaptor: Literal["linear", "moe"]
    text_experts: int
    similarity: Literal["dot", "cosine"]
    temperature: float
    loss: Literal["full", "sampled"]
    num_negatives: int
    negative_sampling: Literal["uniform", "popularity"]
    batch_size: int
    # Training batches of similar-length histories: pools of this many batches sorted by length
    # (0: a plain shuffle). Batches are padded to their longest history, so this skips padding.
    bucket_batches: int
    weight_decay: float
    warmup_fraction: float
    grad_clip: float
    # Targets weighted by recency as MF's confidence is (0: every target alike).
    recency_half_life: float
    recency_boost: float
    mask_prob: float
    pretrain: StageConfig
    finetune: StageConfig
    refit: Literal["continue", "retrain"]
    refit_epochs: int
    trainer: TrainerConfig

    def __post_init__(self) -> None:
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ParamsError(f"bert.{name} must be in [0, 1), got {getattr(self, name)}")
            # Packed masks draw in steps of 2^-16 (components/bert/dropout.py): a rate that rounds
            # to 1 would drop everything.
            if self.trainer.packed_dropout and getattr(self, name) >= 1.0 - 2.0 ** -17:
                raise ParamsError(f"bert.{name} must be below 1 - 2^-17 with bert.trainer.packed_dropout, "
                                  f"got {getattr(self, name)}")
        if self.text_experts < 1:
            raise ParamsError(f"bert.text_experts must be at least 1, got {self.text_experts}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ParamsError(f"bert.hidden_size ({self.hidden_size}) must be a multiple of bert.num_heads "
                              f"({self.num_heads}): each head takes an equal share")
        if self.recency_half_life < 0 or self.recency_boost < 0:
            raise ParamsError(f"bert.recency_half_life and bert.recency_boost must be >= 0, got "
                              f"{self.recency_half_life} and {self.recency_boost}")
        if self.loss != "full" and self.num_negatives < 1:
            raise ParamsError(f"bert.num_negatives must be at least 1 with bert.loss={self.loss}, got {self.num_negatives}")
        if not self.pretrain.enabled and not self.finetune.enabled:
            raise ParamsError("bert.pretrain.enabled and bert.finetune.enabled are both false: enable at least one "
                              "(nothing would train the sequence model)")


@dataclass(frozen=True)
class FusionConfig:
    models: list[str]
    # Candidate weights of the first model: 0, 1/(n-1), ..., 1.
    grid_size: int


@dataclass(frozen=True)
class PruneConfig:
    # Structured: fraction of attention heads (per layer, at least one kept) and of FFN neurons
    # removed, by weight magnitude; the layers are rebuilt smaller.
    heads: float
    ffn: float
    # Unstructured global magnitude pruning of the encoder's linear weights (measured, reported;
    # dense kernels do not get faster from zeros).
    unstructured: float
    # Short next-item fine-tune of the structurally pruned model.
    recovery_epochs: int
    recovery_lr: float


@dataclass(frozen=True)
class QuantizationConfig:
    per_channel: bool
    # Static QDQ INT8, calibrated on validation sequences (an extra variant).
    static: bool
    calibration_users: int
    # Quantize the item-embedding lookup table too (Gather), not only the matrix products.
    int8_embedding_table: bool


@dataclass(frozen=True)
class CompressConfig:
    prune: PruneConfig
    quantization: QuantizationConfig
    # Which sequence-model variant is bundled: auto = onnx_int8 when its validation NDCG@10 is
    # within `int8_tolerance` (relative) of onnx_fp32, else onnx_fp32.
    select: Literal["auto", "onnx_fp32", "onnx_fp32_opt", "onnx_int8", "onnx_int8_static", "pruned_onnx_int8"]
    int8_tolerance: float
    # The INT8 text encoder is bundled when its mean cosine to fp32 on the item texts reaches
    # text_min_cosine and the item vectors it yields (after the projection) reach
    # text_item_min_cosine.
    text_min_cosine: float
    text_item_min_cosine: float
    # Users of the validation split used to measure the variants (0 = all).
    eval_users: int


@dataclass(frozen=True)
class ExportConfig:
    # Items returned by one call of the sequence / MF graphs (the service's largest k).
    k: int
    # Parity gates (fp32 ONNX against PyTorch), checked on validation users.
    max_abs_diff: float
    min_top10_identical: float
    parity_users: int


@dataclass(frozen=True)
class TrackingConfig:
    # MLflow tracking server and model registry; null: $MLFLOW_TRACKING_URI, else a local
    # SQLite store (mlflow/mlflow.db).
    uri: str | None
    experiment: str
    # The registered model every run's bundle becomes a version of.
    model_name: str


@dataclass(frozen=True)
class GateConfig:
    # The challenger must beat the champion's validation NDCG@10 and Recall@10 by this much
    # (relative; 0 = at least equal).
    min_relative_improvement: float
    # Relative differences within this count as ties (two trainings of one model differ in
    # the last digits).
    tolerance: float
    # p50 latency of the bundled sequence model, batch 1, one thread.
    latency_budget_ms: float


@dataclass(frozen=True)
class OnlineConfig:
    # The service's event store (its --db) that the monitor flow and the online promotion read.
    db: str
    k: int
    # An event this long after a list at most counts for it (the service's attribution).
    attribution_seconds: float
    # The period decisions look at (hours back from now).
    window_hours: float
    # Users needed on each side before any decision is made.
    min_users: int
    # Promotion: the 95 % interval of the challenger's online NDCG@k minus the champion's
    # (over users) must lie above this (absolute).
    min_ndcg_lift: float
    # Rollback: the champion's online NDCG@k over the window below this moves `champion` back
    # to the version it replaced (null: never).
    rollback_below: float | None


@dataclass(frozen=True)
class IncrementalConfig:
    # Fewer new events than this: no update (the window is kept for the next run).
    min_events: int
    # Drift past any of these sends the window to a full retrain instead of an update:
    # Jensen-Shannon divergence (base 2, 0..1) of item popularity, champion's data vs window;
    popularity_divergence: float
    # share of the window's events on items the champion has never seen;
    unseen_item_share: float
    # window events per hour / the champion's training data's (null: not a reason).
    event_rate_ratio: float | None
    # Incremental updates in a row before the next one is a full retrain.
    max_updates_between_full: int
    # The update: optimiser steps over the changed sequences and the replay sample, at this rate.
    steps: int
    lr: float
    batch_size: int
    # Older sequences (of users not in the window) trained beside each changed one, against
    # forgetting.
    replay_ratio: float
    # Events are taken once received at least this long ago: with several service replicas on
    # PostgreSQL, event numbers can commit out of order, and a watermark must not pass an event
    # still being written.
    settle_seconds: float
    # Update roots (`<artifacts>/incremental/<time>/`) kept: the newest this many, plus those of
    # the versions holding an alias and of the champion's rollback target (null: keep every one).
    keep_roots: int | None
    # How long the training flow waits for an incremental run holding the artifacts folder
    # before it fails (the incremental flow never waits: it skips its hour). An incremental run
    # that decided on a full retrain holds it as long as a nightly run takes.
    lock_wait_seconds: float

    def __post_init__(self) -> None:
        # `not >= 0` also refuses NaN (no settling, a wait that never ends).
        if not (self.settle_seconds >= 0 and self.lock_wait_seconds >= 0):
            raise ParamsError("incremental.settle_seconds and incremental.lock_wait_seconds must be numbers >= 0, got "
                              f"{self.settle_seconds} and {self.lock_wait_seconds}")
        if self.keep_roots is not None and self.keep_roots < 1:
            raise ParamsError(f"incremental.keep_roots must be at least 1 (null: keep every root), got {self.keep_roots}")


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataConfig
    validation: ValidationConfig
    features: FeaturesConfig
    evaluation: EvaluationConfig
    mf: MFConfig
    bert: BertRecConfig
    fusion: FusionConfig
    compress: CompressConfig
    export: ExportConfig
    tracking: TrackingConfig
    gate: GateConfig
    online: OnlineConfig
    incremental: IncrementalConfig

    def get(self, dotted: str) -> Any:
        """A setting or section by dotted key (`bert.text_encoder`)."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping ({tp.__name__}), got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if typing.get_args(tp) != (str, str):
            raise TypeError(f"unsupported annotation {tp!r} at {key}: mappings are dict[str, str]")
        # Free-form settings handed on as text (Spark's own): only the shape is checked here.
        if not isinstance(value, dict) or any(isinstance(v, (dict, list)) or v is None for v in value.values()):
            raise ParamsError(f"{key}: expected a mapping of names to values, got {value!r}")
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        # bool is a subclass of int; `n_users: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-7` as a string (it wants `1.0e-7`); accept it.
            try:
                return float(value)
            except ValueError:
                raise ParamsError(f"{key}: expected float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected str, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a schema bug, not user input


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" under {prefix}" if prefix else ""
        raise ParamsError(
            f"unknown key{'s' if len(unknown) > 1 else ''}{where}: "
            + ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        )
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            raise ParamsError(f"{key}: missing (every setting must be present in the params file)")
        kwargs[name] = _convert(hints[name], data[name], key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `dotted.key=value` (the `dvc exp run -S` syntax) into key path and YAML value."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    # `dvc exp run -S params.yaml:key=value` names the file; only params.yaml exists here.
    if ":" in key:
        file_part, key = key.split(":", 1)
        if Path(file_part).name != DEFAULT_PARAMS.name:
            raise ParamsError(f"override {text!r}: only params.yaml keys can be set")
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: value is not valid YAML ({yaml_problem(exc)})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw params mapping with `dotted.key=value` overrides applied.

    Only existing keys can be overridden, so a typo fails here with the key's name instead of
    being silently added.
    """
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_key(out, path, value)
        except ParamsError as exc:
            raise ParamsError(f"override {text!r}: {exc}") from None
    return out


def set_key(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """raw[a][b][c] = value for the path [a, b, c], in place: an existing setting only, else a
    ParamsError naming the first unknown part."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            raise ParamsError(f"unknown key {'.'.join(path[: i + 1])}")
        node = child
    if path[-1] not in node:
        raise ParamsError(f"unknown key {'.'.join(path)}")
    node[path[-1]] = value


def read_yaml(path: Path | str, what: str) -> Any:
    """A YAML file's content, or a one-line ParamsError naming the file (`what` it should be)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{what} not found: {path}")
    if not path.is_file():
        raise ParamsError(f"{path}: a folder, not a {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None


def yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans several)."""
    where = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return problem + (f" at line {where.line + 1}, column {where.column + 1}" if where is not None else "")


def read_raw(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    raw = read_yaml(path, "params file")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return raw


def params_from_dict(raw: dict[str, Any]) -> Params:
    return _build(Params, raw, "")


def merge_file(raw: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """`raw` with the settings of a partial params file (a preset) laid over it; its keys must
    exist in `raw`, so a typo fails naming the key and the file."""
    patch = read_raw(path)
    out = copy.deepcopy(raw)

    def lay(node: dict[str, Any], over: dict[str, Any], prefix: str) -> None:
        for key, value in over.items():
            dotted = f"{prefix}{key}"
            if key not in node:
                raise ParamsError(f"{path}: unknown key {dotted}")
            if isinstance(value, dict) and isinstance(node[key], dict):
                lay(node[key], value, dotted + ".")
            else:
                node[key] = value

    lay(out, patch, "")
    return out


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None,
                override_files: list[Path] | None = None) -> Params:
    """Read a params file, lay the override files (presets) over it in order, then the `--set`
    overrides, and check everything against the schema."""
    raw = read_raw(path)
    for file in override_files or []:
        raw = merge_file(raw, file)
    raw = apply_overrides(raw, overrides or [])
    try:
        return params_from_dict(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the shape MLflow and `--set` use."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
