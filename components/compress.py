"""Compression of the BERT recommender and its text encoder: pruning, INT8, graph optimisation,
and the choice of the variant that goes into the bundle.

Every variant is built twice from the same recipe: once from the *selected* model (the one
chosen on validation, which never saw the validation targets) to measure validation NDCG@10 /
Recall@10 and top-10 overlap with fp32, and once from the *deployable* model (refitted on
training + validation) to ship. The measurement decides; the deployable files are what export
bundles.

Sequence-model variants (`sequence/<variant>.onnx`):
    onnx_fp32          the exported graph (parity with PyTorch checked here, gates in params)
    onnx_fp32_opt      onnxruntime's offline graph optimisations (constant folding, fusions)
    onnx_int8          dynamic INT8, per-channel weights (value_info of the dynamo graph cleared)
    onnx_int8_static   static QDQ INT8 calibrated on validation sequences (optional)
    pruned_onnx_int8   heads and FFN neurons removed by magnitude, recovery fine-tune, then INT8
    sparse_onnx_fp32   global unstructured magnitude pruning (report only: zeros in dense
                       matrices are not faster, the benchmark shows it)

Text-encoder variants (`text_encoder/<variant>.onnx`): onnx_fp32, onnx_fp32_opt (onnxruntime's
transformer optimizer: SkipLayerNorm and BiasGelu fusions), onnx_int8.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components import metrics
from components.bert.model import GatedOutput, SeqRecModel, load_model, save_model, shrink_layer
from components.config import BertRecConfig, CompressConfig, ExportConfig
from components.onnx_graphs import (
    TextGraph,
    export_sequence,
    export_text_encoder,
    check_sequence_parity,
    check_text_parity,
    copy_tokenizer,
    cosine,
    sequence_inputs,
    session,
    text_encoder_for,
    tokenize,
)
from components.sequences import Sequences, load_sequences
from serving.bundle_format import sequence_feeds

log = logging.getLogger(__name__)

SEQUENCE_VARIANTS = ("onnx_fp32", "onnx_fp32_opt", "onnx_int8", "onnx_int8_static", "pruned_onnx_int8", "sparse_onnx_fp32")
TEXT_VARIANTS = ("onnx_fp32", "onnx_fp32_opt", "onnx_int8")


@dataclass(frozen=True)
class CompressResult:
    out_dir: Path
    sequence_variant: str
    text_variant: str | None
    reason: str
    # Per sequence variant: validation NDCG@10, Recall@10, top-10 overlap with fp32, size, latency.
    quality_valid: dict[str, dict[str, Any]]
    text_reason: str | None

    def metrics(self) -> dict[str, Any]:
        chosen = self.quality_valid[self.sequence_variant]
        return {"chosen": {k: chosen[k] for k in ("ndcg@10", "recall@10", "size_mb")} | {
                    "latency_b1_p50_ms": chosen["latency_b1"]["p50_ms"]},
                "variants": {v: {k: q[k] for k in ("ndcg@10", "size_mb")} for v, q in self.quality_valid.items()}}

    def describe(self) -> str:
        lines = [f"{name:18s} valid NDCG@10 {row['ndcg@10']:.4f}  Recall@10 {row['recall@10']:.4f}  "
                 f"top-10 overlap {row['top10_overlap']:.3f}  {row['size_mb']:.2f} MB  p50 b1 "
                 f"{row['latency_b1']['p50_ms']:.2f} ms" for name, row in self.quality_valid.items()]
        lines.append(f"sequence model: {self.sequence_variant} ({self.reason})")
        if self.text_variant:
            lines.append(f"text encoder: {self.text_variant} ({self.text_reason})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


def head_importance(layer: nn.Module) -> torch.Tensor:
    """Per-head magnitude: |value rows of the head| * |output columns of the head| (Frobenius).
    A head whose values or output projection are small contributes little to the residual."""
    attn = layer.attention.self
    size = attn.attention_head_size
    v = attn.value.weight.detach().view(attn.num_attention_heads, size, -1)
    o = layer.attention.output.dense.weight.detach().view(-1, attn.num_attention_heads, size)
    return v.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)


def neuron_importance(layer: nn.Module) -> torch.Tensor:
    """Per-FFN-neuron magnitude: |input row| * |output column|."""
    return layer.intermediate.dense.weight.detach().norm(dim=1) * layer.output.dense.weight.detach().norm(dim=0)


def prune_bert_layers(layers: nn.ModuleList, heads_ratio: float, ffn_ratio: float) -> tuple[list[int], list[int]]:
    """Remove `heads_ratio` of each `BertLayer`'s attention heads (at least one kept) and
    `ffn_ratio` of its FFN neurons, smallest magnitude first, in place; returns the kept sizes."""
    if not (0 <= heads_ratio < 1 and 0 <= ffn_ratio < 1):
        raise ValueError("pruning ratios must be in [0, 1)")
    heads, widths = [], []
    for layer in layers:
        h_imp, n_imp = head_importance(layer), neuron_importance(layer)
        keep_h = max(1, round(h_imp.numel() * (1 - heads_ratio)))
        keep_n = max(1, round(n_imp.numel() * (1 - ffn_ratio)))
        shrink_layer(layer, torch.topk(h_imp, keep_h).indices.sort().values,
                     torch.topk(n_imp, keep_n).indices.sort().values)
        heads.append(keep_h)
        widths.append(keep_n)
    return heads, widths


def prune_structured(model: SeqRecModel, heads_ratio: float, ffn_ratio: float) -> SeqRecModel:
    """A copy of `model` with its encoder layers pruned (`prune_bert_layers`); the config records
    the new sizes, so the pruned model saves and loads as usual."""
    pruned = copy.deepcopy(model).eval()
    heads, widths = prune_bert_layers(pruned.encoder.encoder.layer, heads_ratio, ffn_ratio)
    pruned.cfg = dataclasses.replace(model.cfg, layer_heads=heads, layer_intermediate=widths)
    return pruned


def _encoder_linears(model: SeqRecModel) -> list[tuple[nn.Module, str]]:
    """The encoder's linear weights, the gates of a gated residual left out: they start at zero
    and stay small, so a global magnitude threshold would take them first, and their zero is
    not "no connection" but an open gate (g = 1)."""
    gates = {id(m.gate) for m in model.encoder.modules() if isinstance(m, GatedOutput)}
    return [(m, "weight") for m in model.encoder.modules() if isinstance(m, nn.Linear) and id(m) not in gates]


def prune_unstructured(model: SeqRecModel, amount: float) -> tuple[SeqRecModel, dict[str, Any]]:
    """Global L1 magnitude pruning of the encoder's linear weights; returns the pruned copy and
    a sparsity report (overall and per matrix)."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model).eval()
    targets = _encoder_linears(pruned)
    if amount > 0:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in targets:
            prune.remove(module, name)  # bake the mask into the weights
    names = {id(m): n for n, m in pruned.encoder.named_modules()}
    per_matrix = {names[id(m)]: float((m.weight == 0).float().mean()) for m, _ in targets}
    total = sum(m.weight.numel() for m, _ in targets)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    return pruned, {"target": amount, "global_sparsity": zeros / max(total, 1), "per_matrix": per_matrix}


def recover(model: SeqRecModel, features_dir: Path, cfg: CompressConfig, bert: BertRecConfig, seed: int,
            train_until: str) -> SeqRecModel:
    """A short next-item fine-tune of a pruned model (Lightning, the training module's loss)."""
    epochs = cfg.prune.recovery_epochs
    if epochs <= 0:
        return model
    import pytorch_lightning as pl_

    from components.bert.data import SequenceDataModule
    from components.bert.module import SeqRecModule
    from components.bert.train import interactive, loss_settings, trainer_kwargs

    pl_.seed_everything(seed, workers=True, verbose=False)
    dm = SequenceDataModule(features_dir, model.cfg.max_len, bert.batch_size, "next", train_until=train_until,
                            validate=False, bucket_batches=bert.bucket_batches)
    dm.setup()
    module = SeqRecModule(
        dataclasses.asdict(model.cfg), objective="next", lr=cfg.prune.recovery_lr,
        warmup_fraction=bert.warmup_fraction, item_counts=dm.item_counts, **loss_settings(bert),
    )
    module.model.load_state_dict(model.state_dict())
    module.packed_dropout_setting = bert.trainer.packed_dropout
    trainer = pl_.Trainer(
        max_epochs=epochs, gradient_clip_val=bert.grad_clip or None, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_model_summary=False, enable_progress_bar=interactive(),
        **{**trainer_kwargs(bert.trainer), "devices": 1, "num_nodes": 1, "strategy": "auto"},
    )
    log.info("recovery fine-tune: %d epochs on the %s sequences", epochs, "training + validation" if train_until == "test" else "training")
    trainer.fit(module, datamodule=dm)
    return module.model.cpu().eval()


# --------------------------------------------------------------------------------------------
# ONNX transformations
# --------------------------------------------------------------------------------------------


def _without_value_info(src: Path, dst: Path) -> None:
    """The dynamo exporter records intermediate shapes that onnxruntime's quantizer trusts and
    then contradicts; clearing them lets it re-infer."""
    import onnx

    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save(proto, str(dst))


def quantize_int8(src: Path, dst: Path, per_channel: bool, embedding_table: bool = False) -> None:
    """Dynamic INT8: weights quantized offline (per output channel), activations per call."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_suffix(".clean.onnx")
    _without_value_info(src, tmp)
    ops = ["MatMul", "Gemm", "Attention"] + (["Gather"] if embedding_table else [])
    quantize_dynamic(
        str(tmp), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )
    tmp.unlink()


def quantize_static_qdq(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], per_channel: bool) -> None:
    """Static INT8 in QDQ format, activation ranges calibrated on validation sequences."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    tmp = dst.with_suffix(".clean.onnx")
    _without_value_info(src, tmp)
    quantize_static(
        str(tmp), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )
    tmp.unlink()


def optimize_generic(src: Path, dst: Path) -> dict[str, int]:
    """onnxruntime's offline graph optimisations (extended level: portable across CPUs)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    before = len(onnx.load(str(src)).graph.node)
    after = len(onnx.load(str(dst)).graph.node)
    return {"nodes_before": before, "nodes_after": after}


def optimize_transformer(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's BERT optimizer; returns the fusions it found (attention itself does not fuse
    on the dynamo exporter's graph; LayerNorm and GELU do)."""
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
    opt.save_model_to_file(str(dst))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def eval_users(seqs: Sequences, split: str, limit: int) -> np.ndarray:
    targets = seqs.target_matrix(split)
    users = np.flatnonzero(np.diff(targets.indptr) > 0)
    return users[:limit] if limit > 0 else users


def onnx_topk(path: Path, seqs: Sequences, split: str, users: np.ndarray, max_len: int, k: int = 10,
              batch_size: int = 256) -> np.ndarray:
    """Top-k of the sequence graph for `users`, their whole history excluded (the evaluation
    protocol)."""
    sess = session(path)
    histories = seqs.histories(split, max_len)
    exclude = seqs.history_matrix(split).tocsr()
    out = []
    for lo in range(0, users.size, batch_size):
        block = users[lo : lo + batch_size]
        ex = exclude[block]
        feeds = sequence_feeds([histories[u] for u in block], max_len,
                               [ex.indices[ex.indptr[r] : ex.indptr[r + 1]] for r in range(block.size)])
        out.append(sess.run(["topk_items"], feeds)[0][:, :k])
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def ranking_quality(topk: np.ndarray, seqs: Sequences, split: str, users: np.ndarray) -> dict[str, float]:
    targets = seqs.target_matrix(split)[users]
    n = np.diff(targets.indptr)
    hit = metrics.hits(topk, targets)
    k = topk.shape[1]
    return {"ndcg@10": float(metrics.ndcg_at_k(hit, n, k).mean()), "recall@10": float(metrics.recall_at_k(hit, n, k).mean())}


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared items between two top-k lists, row by row."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())])) if len(a) else 1.0


def latency_ms(path: Path, feeds: dict[str, np.ndarray], runs: int = 50, threads: int = 1) -> dict[str, float]:
    sess = session(path, threads)
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def build_sequence_variants(model: SeqRecModel, out: Path, c: CompressConfig, k: int, bert: BertRecConfig, seed: int,
                            features_dir: Path, train_until: str,
                            calibration: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Every sequence-model variant of `model` under `out`; returns what was done to build them."""
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    export_sequence(model, out / "onnx_fp32.onnx", k)
    info["onnx_fp32_opt"] = optimize_generic(out / "onnx_fp32.onnx", out / "onnx_fp32_opt.onnx")
    quantize_int8(out / "onnx_fp32.onnx", out / "onnx_int8.onnx", c.quantization.per_channel, c.quantization.int8_embedding_table)
    if c.quantization.static:
        quantize_static_qdq(out / "onnx_fp32.onnx", out / "onnx_int8_static.onnx", calibration, c.quantization.per_channel)
    if c.prune.heads > 0 or c.prune.ffn > 0:
        pruned = recover(prune_structured(model, c.prune.heads, c.prune.ffn), features_dir, c, bert, seed, train_until)
        save_model(pruned, out / "pruned_model")
        export_sequence(pruned, out / "pruned_onnx_fp32.onnx", k)
        quantize_int8(out / "pruned_onnx_fp32.onnx", out / "pruned_onnx_int8.onnx", c.quantization.per_channel,
                      c.quantization.int8_embedding_table)
        (out / "pruned_onnx_fp32.onnx").unlink()
        info["pruned"] = {"layer_heads": pruned.cfg.layer_heads, "layer_intermediate": pruned.cfg.layer_intermediate,
                          "parameters": sum(p.numel() for p in pruned.encoder.parameters()),
                          "parameters_before": sum(p.numel() for p in model.encoder.parameters())}
    if c.prune.unstructured > 0:
        sparse, report = prune_unstructured(model, c.prune.unstructured)
        export_sequence(sparse, out / "sparse_onnx_fp32.onnx", k)
        info["sparse"] = report
    return info


def choose(select: str, quality: dict[str, dict[str, float]], tolerance: float) -> tuple[str, str]:
    """The bundled sequence variant and why."""
    if select != "auto":
        if select not in quality:
            raise ValueError(f"compress.select={select} but that variant was not built (check compress.prune / quantization)")
        return select, f"set by compress.select ({select}, validation NDCG@10 {quality[select]['ndcg@10']:.4f})"
    fp32, int8 = quality["onnx_fp32"]["ndcg@10"], quality["onnx_int8"]["ndcg@10"]
    change = (int8 - fp32) / fp32 if fp32 > 0 else 0.0
    if int8 >= fp32 * (1 - tolerance):
        return "onnx_int8", (f"INT8 validation NDCG@10 {int8:.4f} vs fp32 {fp32:.4f} ({change:+.2%}): "
                             f"within the {tolerance:.0%} tolerance")
    return "onnx_fp32", (f"INT8 validation NDCG@10 {int8:.4f} vs fp32 {fp32:.4f} ({change:+.2%}): "
                         f"outside the {tolerance:.0%} tolerance, fp32 kept")


def compress(features_dir: Path, bert_dir: Path, out_dir: Path, cfg: CompressConfig, export: ExportConfig,
             bert: BertRecConfig, seed: int) -> CompressResult:
    """Build, measure and choose; see the module docstring. Writes `report.json`. `export` holds
    the parity gates and K; `bert` the training settings of the pruned model's recovery."""
    from components.bert.text_embeddings import resolve_encoder_path

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    seqs = load_sequences(features_dir)
    selected, deploy = load_model(bert_dir / "selected_model"), load_model(bert_dir / "model")
    max_len = deploy.cfg.max_len
    ex = export
    users = eval_users(seqs, "valid", cfg.eval_users)
    valid_histories = seqs.histories("valid", max_len)
    calibration = [
        sequence_inputs([valid_histories[u] for u in block], max_len)
        for block in np.array_split(users[: cfg.quantization.calibration_users],
                                    max(1, min(users.size, cfg.quantization.calibration_users) // 32))
        if block.size
    ]

    # Measure on the selected model.
    measure_dir = out_dir / "measure"
    build_info = build_sequence_variants(selected, measure_dir, cfg, ex.k, bert, seed, features_dir, "valid", calibration)
    parity = check_sequence_parity(selected, measure_dir / "onnx_fp32.onnx",
                                   [valid_histories[u] for u in users[: ex.parity_users]], ex.k)
    if parity["max_abs_diff"] > ex.max_abs_diff or parity["min_top10_identical"] < ex.min_top10_identical:
        raise RuntimeError(f"ONNX fp32 does not match PyTorch: {json.dumps({k: parity[k] for k in ('max_abs_diff', 'min_top10_identical')})}")
    topk = {v: onnx_topk(measure_dir / f"{v}.onnx", seqs, "valid", users, max_len)
            for v in SEQUENCE_VARIANTS if (measure_dir / f"{v}.onnx").exists()}
    quality = {v: {**ranking_quality(t, seqs, "valid", users), "top10_overlap": overlap(t, topk["onnx_fp32"]),
                   "size_mb": size_mb(measure_dir / f"{v}.onnx")} for v, t in topk.items()}
    probe = sequence_inputs([valid_histories[users[0]]] if users.size else [[0]], max_len)
    for v in quality:
        quality[v]["latency_b1"] = latency_ms(measure_dir / f"{v}.onnx", probe)
    variant, reason = choose(cfg.select, quality, cfg.int8_tolerance)
    log.info("sequence model: %s (%s)", variant, reason)

    # Build the deployable variants; the measured choice decides which one ships.
    deploy_dir = out_dir / "sequence"
    build_sequence_variants(deploy, deploy_dir, cfg, ex.k, bert, seed, features_dir, "test", calibration)
    deploy_parity = check_sequence_parity(deploy, deploy_dir / "onnx_fp32.onnx",
                                          [valid_histories[u] for u in users[: ex.parity_users]], ex.k, batch_sizes=(1, 64))
    shutil.rmtree(measure_dir)  # measured; the deployable twins are what is kept

    text_report, text_variant = None, None
    (out_dir / "text_encoder").mkdir()  # empty for an id-only model (no cold start from text)
    if "text" in deploy.cfg.mode:
        text_report, text_variant = _text_variants(deploy, out_dir / "text_encoder",
                                                   resolve_encoder_path(bert.text_encoder.path), features_dir, cfg,
                                                   ex.max_abs_diff)
    report = {
        "sequence": {"variant": variant, "reason": reason, "quality_valid": quality, "build": build_info,
                     "parity": parity, "deploy_parity": {k: deploy_parity[k] for k in ("max_abs_diff", "min_top10_identical")},
                     "eval_users": int(users.size)},
        "text_encoder": text_report,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return CompressResult(out_dir, variant, text_variant, reason, quality,
                          text_report["reason"] if text_report else None)


def _text_variants(model: SeqRecModel, out: Path, encoder_path: Path, features_dir: Path,
                   c: CompressConfig, max_abs_diff: float) -> tuple[dict[str, Any], str]:
    import polars as pl

    encoder = text_encoder_for(model, encoder_path)
    max_length = model.cfg.text_max_length
    export_text_encoder(encoder, model, out / "onnx_fp32.onnx", max_length)
    copy_tokenizer(encoder_path, out / "tokenizer")
    texts = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")["text"].fill_null("").to_list()[:512]
    parity = check_text_parity(TextGraph(encoder, model).eval(), out / "onnx_fp32.onnx", out / "tokenizer", texts[:64], max_length)
    if max(parity.values()) > max_abs_diff * 10:
        # Twelve fp32 layers accumulate more rounding than the two-layer recommender.
        raise RuntimeError(f"text encoder ONNX does not match PyTorch: {parity}")
    cfg = encoder.config
    fusions = optimize_transformer(out / "onnx_fp32.onnx", out / "onnx_fp32_opt.onnx", cfg.num_attention_heads, cfg.hidden_size)
    # The word-piece table is half of MiniLM's weights: quantizing its lookup (Gather) too is
    # what makes the INT8 encoder ~4x smaller, at cosine ~0.99.
    quantize_int8(out / "onnx_fp32.onnx", out / "onnx_int8.onnx", c.quantization.per_channel,
                  embedding_table=True)
    feeds = tokenize(out / "tokenizer", texts, max_length)
    ref = session(out / "onnx_fp32.onnx").run(None, feeds)
    variants = {}
    for v in TEXT_VARIANTS:
        got = session(out / f"{v}.onnx").run(None, feeds)
        variants[v] = {"size_mb": size_mb(out / f"{v}.onnx"),
                       "cosine_to_fp32": float(cosine(got[0], ref[0]).mean()),
                       "item_vector_cosine_to_fp32": float(cosine(got[1], ref[1]).mean())}
    # Serving ranks with the item vector: a projection trained on whitened text can amplify the
    # encoder's INT8 error in low-variance directions, so both outputs must keep the cosine.
    int8 = variants["onnx_int8"]
    good = (int8["cosine_to_fp32"] >= c.text_min_cosine
            and int8["item_vector_cosine_to_fp32"] >= c.text_item_min_cosine)
    chosen = "onnx_int8" if good else "onnx_fp32"
    reason = (f"INT8 mean cosine to fp32 on {len(texts)} item texts: text {int8['cosine_to_fp32']:.4f} "
              f"(needs {c.text_min_cosine}), item vector {int8['item_vector_cosine_to_fp32']:.4f} "
              f"(needs {c.text_item_min_cosine}): {'INT8' if good else 'fp32 kept'}")
    return {"variant": chosen, "reason": reason, "variants": variants, "fusions": fusions, "parity": parity,
            "texts": len(texts)}, chosen


if __name__ == "__main__":
    from components.pipeline import main

    main("compress")
