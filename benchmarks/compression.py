"""Speed, size and quality of the compressed variants, side by side in one run.

    python -m benchmarks.compression --dataset movielens-100k --data-dir DIR --out compression.json

Runs the pipeline up to export on the dataset's preset (`presets/<dataset>.yaml`; stages already
up to date in `--workdir` are reused), then measures on the test split:

- sequence model: PyTorch fp32 eager, ONNX fp32, ONNX fp32 optimised, ONNX INT8, pruned + ONNX
  INT8 (and the unstructured-sparse fp32 graph, to show that zeros do not speed up dense kernels):
  p50/p99 latency at batch 1 and batch 64 with 1 thread (`*_t2` keys: 2 threads), file size,
  NDCG@10, Recall@10, top-10 overlap with PyTorch fp32;
- text encoder (all-MiniLM-L6-v2 + the projection): the same rows at batch 1 and 32, with the
  mean cosine of the text embedding to PyTorch fp32 on the item texts;
- end to end, one request: a history in, the top-10 out (padding, exclusion, ranking included).

Latencies are medians over interleaved rounds, so a background hiccup hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import dataset_params, datasets, machine, write_json
from components import pipeline
from components.cli import add_params_arguments, run_main
from components.config import Params
from components.pipeline import Artifacts

log = logging.getLogger("benchmarks.compression")

SEQ_VARIANTS = ("onnx_fp32", "onnx_fp32_opt", "onnx_int8", "pruned_onnx_int8", "sparse_onnx_fp32")
TEXT_VARIANTS = ("onnx_fp32", "onnx_fp32_opt", "onnx_int8", "pruned_onnx_int8")


def prepare(params: Params, work: Path) -> dict[str, pipeline.Outcome]:
    """The pipeline up to the bundle in `work` (what is up to date there is reused)."""
    return pipeline.run(params, Artifacts(work), until=["export", "evaluate"])


def timed(fn: Callable[[], Any], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def interleaved(cases: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """p50/p99 of each case, the cases run in turn so that noise is shared."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    chunk = max(1, rounds // 10)
    for _ in range(0, rounds, chunk):
        for name, fn in cases.items():
            samples[name] += timed(fn, chunk)
    return {n: {"p50": float(np.percentile(s, 50)), "p99": float(np.percentile(s, 99))} for n, s in samples.items()}


def run(params: Params, work: Path, rounds_b1: int, rounds_batch: int) -> dict[str, Any]:
    import torch

    from components.bert.model import left_pad, load_model
    from components.compress import (
        cosine, eval_users, onnx_topk, overlap, prune_bert_layers, quantize_int8, ranking_quality, size_mb,
    )
    from components.onnx_graphs import (
        TextGraph, export_text_encoder, sequence_inputs, session, text_encoder_for, tokenize,
    )
    from components.bert.text_embeddings import resolve_encoder_path
    from components.sequences import load_sequences

    outcomes = prepare(params, work)
    compress_seconds = outcomes["compress"].seconds
    bundle_manifest = json.loads((work / "bundle" / "bundle.json").read_text())
    seqs = load_sequences(work / "features")
    model = load_model(work / "bert" / "model")
    L = model.cfg.max_len
    seq_dir = work / "compress" / "sequence"
    paths = {v: seq_dir / f"{v}.onnx" for v in SEQ_VARIANTS if (seq_dir / f"{v}.onnx").exists()}

    # ---- quality on test (the deployable models, as the quality benchmark evaluates) ----------
    users = eval_users(seqs, "test", 0)
    hist_test = seqs.histories("test", L)
    exclude = seqs.history_matrix("test").tocsr()
    torch.set_num_threads(1)
    with torch.no_grad():
        table = model.item_representations()
        out_table = model.output_items(table)
        t_top = []
        for lo in range(0, users.size, 256):
            block = users[lo : lo + 256]
            scores = model.user_vectors(left_pad([hist_test[u] for u in block], L), table) @ out_table.T
            ex = exclude[block]
            rows = np.repeat(np.arange(block.size), np.diff(ex.indptr))
            scores[rows, ex.indices] = float("-inf")
            t_top.append(torch.topk(scores, 10, dim=1).indices.numpy())
    t_top = np.concatenate(t_top)
    sequence: dict[str, dict[str, float]] = {"torch_fp32": {**ranking_quality(t_top, seqs, "test", users), "top10_overlap": 1.0}}
    for v, path in paths.items():
        top = onnx_topk(path, seqs, "test", users, L)
        sequence[v] = {**ranking_quality(top, seqs, "test", users), "top10_overlap": overlap(top, t_top)}

    sequence["torch_fp32"]["size_mb"] = size_mb(work / "bert" / "model" / "model.safetensors")
    for v, path in paths.items():
        sequence[v]["size_mb"] = size_mb(path)

    # ---- latency: sequence model ----------------------------------------------------------
    rng = np.random.default_rng(0)
    pick = rng.choice(users, size=64, replace=False) if users.size >= 64 else users
    h1, h64 = [hist_test[pick[0]]], [hist_test[u] for u in pick]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sessions = {v: session(p, threads) for v, p in paths.items()}
        cases = {}
        for bs, hs, rounds in ((1, h1, rounds_b1), (64, h64, rounds_batch)):
            items = left_pad(hs, L)
            feeds = sequence_inputs(hs, L)

            def torch_case(items=items):
                with torch.no_grad():
                    u = model.user_vectors(items, model.item_representations())
                    return torch.topk(u @ model.output_items(model.item_representations()).T, 10)

            cases[("torch_fp32", bs)] = torch_case
            for v, s in sessions.items():
                cases[(v, bs)] = lambda s=s, feeds=feeds: s.run(None, feeds)
            res = interleaved({k: fn for k, fn in cases.items() if k[1] == bs}, rounds)
            suffix = "" if threads == 1 else "_t2"
            for (v, _), r in res.items():
                sequence[v][f"p50_ms_b{bs}{suffix}"] = r["p50"]
                sequence[v][f"p99_ms_b{bs}{suffix}"] = r["p99"]
    log.info("sequence model measured")

    # ---- text encoder ---------------------------------------------------------------------
    import polars as pl

    text_dir = work / "compress" / "text_encoder"
    encoder_path = resolve_encoder_path(params.bert.text_encoder.path)
    encoder = text_encoder_for(model, encoder_path)
    max_length = model.cfg.text_max_length
    # Pruned + INT8 text encoder: the same magnitude pruning (heads and FFN), no recovery training
    # (the encoder is not trained here), then INT8.
    import copy

    pruned_encoder = copy.deepcopy(encoder).eval()
    prune_bert_layers(pruned_encoder.encoder.layer, params.compress.prune.heads, params.compress.prune.ffn)
    export_text_encoder(pruned_encoder, model, work / "pruned_text_fp32.onnx", max_length)
    quantize_int8(work / "pruned_text_fp32.onnx", text_dir / "pruned_onnx_int8.onnx", params.compress.quantization.per_channel,
                  embedding_table=True)
    (work / "pruned_text_fp32.onnx").unlink()
    text_paths = {v: text_dir / f"{v}.onnx" for v in TEXT_VARIANTS if (text_dir / f"{v}.onnx").exists()}
    texts = pl.read_parquet(work / "features" / "items.parquet").sort("item_idx")["text"].fill_null("").to_list()[:512]
    graph = TextGraph(encoder, model).eval()
    feeds_all = tokenize(text_dir / "tokenizer", texts, max_length)
    with torch.no_grad():
        ref = graph(torch.from_numpy(feeds_all["input_ids"]), torch.from_numpy(feeds_all["attention_mask"]))[0].numpy()
    text: dict[str, dict[str, float]] = {"torch_fp32": {"cosine_to_fp32": 1.0, "size_mb": sum(
        p.numel() * 4 for p in encoder.parameters()) / 1e6}}
    for v, p in text_paths.items():
        got = session(p).run(None, feeds_all)[0]
        text[v] = {"cosine_to_fp32": float(cosine(got, ref).mean()), "size_mb": size_mb(p)}
    one = tokenize(text_dir / "tokenizer", texts[:1], max_length)
    many = tokenize(text_dir / "tokenizer", texts[:32], max_length)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sessions = {v: session(p, threads) for v, p in text_paths.items()}
        suffix = "" if threads == 1 else "_t2"
        for bs, feeds, rounds in ((1, one, rounds_b1 // 2), (32, many, max(10, rounds_batch // 2))):
            tens = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def torch_text(tens=tens):
                with torch.no_grad():
                    return graph(tens["input_ids"], tens["attention_mask"])

            cases = {"torch_fp32": torch_text, **{v: (lambda s=s, f=feeds: s.run(None, f)) for v, s in sessions.items()}}
            for v, r in interleaved(cases, rounds).items():
                text[v][f"p50_ms_b{bs}{suffix}"] = r["p50"]
                text[v][f"p99_ms_b{bs}{suffix}"] = r["p99"]
    log.info("text encoder measured")

    # ---- end to end: one request, history in -> top-10 out ----------------------------------
    torch.set_num_threads(1)
    sessions = {v: session(p, 1) for v, p in paths.items() if v != "sparse_onnx_fp32"}
    request = hist_test[pick[1]] if pick.size > 1 else hist_test[pick[0]]
    seen = np.asarray(request, dtype=np.int64)

    def eager():
        with torch.no_grad():
            tbl = model.item_representations()
            u = model.user_vectors(left_pad([request], L), tbl)
            scores = u @ model.output_items(tbl).T
            scores[0, torch.from_numpy(seen)] = float("-inf")
            return torch.topk(scores, 10).indices[0].tolist()

    def onnx_request(s):
        feeds = sequence_inputs([request], L)
        feeds["exclude"] = seen[None, :]
        return s.run(["topk_items"], feeds)[0][0, :10].tolist()

    cases = {"torch_fp32": eager, **{v: (lambda s=s: onnx_request(s)) for v, s in sessions.items()}}
    e2e = {v: {"p50_ms": r["p50"], "p99_ms": r["p99"]} for v, r in interleaved(cases, rounds_b1).items()}
    chosen = bundle_manifest["sequence"]["variant"]
    e2e["bundle"] = {**e2e[chosen], "variant": chosen}

    seq = sequence
    summary = {
        "text_int8_speedup_b1": text["onnx_fp32"]["p50_ms_b1"] / text["onnx_int8"]["p50_ms_b1"],
        "text_int8_speedup_b32": text["onnx_fp32"]["p50_ms_b32"] / text["onnx_int8"]["p50_ms_b32"],
        "text_int8_size_ratio": text["onnx_fp32"]["size_mb"] / text["onnx_int8"]["size_mb"],
        "text_int8_cosine": text["onnx_int8"]["cosine_to_fp32"],
        "seq_int8_ndcg_change": seq["onnx_int8"]["ndcg@10"] / seq["onnx_fp32"]["ndcg@10"] - 1,
        "seq_pruned_int8_ndcg_change": (seq["pruned_onnx_int8"]["ndcg@10"] / seq["onnx_fp32"]["ndcg@10"] - 1
                                        if "pruned_onnx_int8" in seq else None),
        "seq_pruned_int8_speedup_b1": (seq["onnx_fp32"]["p50_ms_b1"] / seq["pruned_onnx_int8"]["p50_ms_b1"]
                                       if "pruned_onnx_int8" in seq else None),
        "seq_sparse_speedup_b64": (seq["onnx_fp32"]["p50_ms_b64"] / seq["sparse_onnx_fp32"]["p50_ms_b64"]
                                   if "sparse_onnx_fp32" in seq else None),
        "end_to_end_speedup": e2e["torch_fp32"]["p50_ms"] / e2e["bundle"]["p50_ms"],
    }
    report = json.loads((work / "compress" / "report.json").read_text())
    return {
        "sequence": sequence, "text_encoder": text, "end_to_end": e2e, "summary": summary,
        "choice": {"sequence": report["sequence"]["variant"], "sequence_reason": report["sequence"]["reason"],
                   "text_encoder": report["text_encoder"]["variant"] if report["text_encoder"] else None,
                   "text_reason": report["text_encoder"]["reason"] if report["text_encoder"] else None},
        "validation": report["sequence"]["quality_valid"], "parity": report["sequence"]["parity"],
        "pruning": report["sequence"]["build"], "compress_seconds": compress_seconds, "test_users": int(users.size),
        "machine": machine(),
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| sequence model | p50 b1 ms | p99 b1 ms | p50 b64 ms | size MB | NDCG@10 | Recall@10 | top-10 overlap |",
             "|---|---|---|---|---|---|---|---|"]
    for v, r in result["sequence"].items():
        lines.append(f"| {v} | {r['p50_ms_b1']:.2f} | {r['p99_ms_b1']:.2f} | {r['p50_ms_b64']:.2f} | {r['size_mb']:.2f} | "
                     f"{r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {r['top10_overlap']:.3f} |")
    lines += ["", "| text encoder | p50 b1 ms | p50 b32 ms | size MB | cosine to fp32 |", "|---|---|---|---|---|"]
    for v, r in result["text_encoder"].items():
        lines.append(f"| {v} | {r['p50_ms_b1']:.2f} | {r['p50_ms_b32']:.1f} | {r['size_mb']:.1f} | {r['cosine_to_fp32']:.4f} |")
    lines += ["", "| end to end (1 request, 1 thread) | p50 ms | p99 ms |", "|---|---|---|"]
    for v, r in result["end_to_end"].items():
        lines.append(f"| {v} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_params_arguments(parser, artifacts=False)
    parser.add_argument("--dataset", default="movielens-100k", choices=datasets())
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="default: artifacts/bench/compression/<dataset>")
    parser.add_argument("--rounds", type=int, default=300, help="batch-1 repetitions per variant")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = dataset_params(args.params, args.dataset, args.data_dir, args.overrides, args.override_files)
    work = args.workdir or Path("artifacts/bench/compression") / args.dataset
    result = run(params, work, args.rounds, max(20, args.rounds // 10))
    result["dataset"] = args.dataset
    print(table(result))
    print(json.dumps(result["summary"], indent=2))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    run_main(main)
