"""ONNX export of the recommenders, parity checks, and the serving bundle.

Graphs (torch 2.13's dynamo exporter, opset 18, dynamic batch and sequence axes):

- `sequence.onnx`: `items` [B, L] int64 item indices, `mask` [B, L] int64 (1 = item, 0 =
  padding, left-padded), `exclude` [B, E] int64 (item indices not to recommend, -1 = none) ->
  `user_vectors` [B, H], `topk_items` [B, K], `topk_scores` [B, K]. The item table is a constant
  of the graph: one call turns a history into recommendations.
- `text_encoder.onnx`: `input_ids`, `attention_mask` [B, T] int64 -> `text_embedding` [B, D]
  (mean-pooled BERT) and `item_vector` [B, H] (the recommender's projection included), so the
  service embeds a new item's text without PyTorch. The tokenizer files travel with it.
- `mf.onnx`: `user_index` [B] int64, `exclude` [B, E] -> `topk_items`, `topk_scores`, so MF is
  served and compared the same way.

A bundle folder holds the graphs, the tokenizer, `items.json` (ids and titles) and `bundle.json`
(item id map, model config, input/output names, K, package versions, sha256 of every file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.bert.model import PAD, SeqRecModel, left_pad

log = logging.getLogger(__name__)

OPSET = 18
SEQUENCE_INPUTS = ["items", "mask", "exclude"]
SEQUENCE_OUTPUTS = ["user_vectors", "topk_items", "topk_scores"]
TEXT_INPUTS = ["input_ids", "attention_mask"]
TEXT_OUTPUTS = ["text_embedding", "item_vector"]
MF_INPUTS = ["user_index", "exclude"]
MF_OUTPUTS = ["topk_items", "topk_scores"]


# --------------------------------------------------------------------------------------------
# Export wrappers: the exact computation each graph performs
# --------------------------------------------------------------------------------------------


def _exclude_and_topk(scores: torch.Tensor, exclude: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of excluded items -> -inf (exclude = -1 means none), then the top k."""
    padded = torch.cat([scores, torch.zeros_like(scores[:, :1])], dim=1)
    sink = torch.full_like(exclude, scores.shape[1])  # -1 entries land on the dropped column
    index = torch.where(exclude < 0, sink, exclude)
    padded = padded.scatter(1, index, float("-inf"))
    values, indices = torch.topk(padded[:, :-1], k, dim=1)
    return indices, values


class SequenceGraph(nn.Module):
    """History -> user vector and top-k items, the item table baked in."""

    def __init__(self, model: SeqRecModel, k: int):
        super().__init__()
        self.model = model.eval()
        self.k = min(k, model.cfg.n_items)
        with torch.no_grad():
            table = model.item_representations()
            self.register_buffer("table", table.detach().clone())
            self.register_buffer("output_table", model.output_items(table).detach().clone())

    def forward(self, items: torch.Tensor, mask: torch.Tensor, exclude: torch.Tensor):
        items = torch.where(mask > 0, items, torch.full_like(items, PAD))
        users = self.model.user_vectors(items, self.table)
        indices, values = _exclude_and_topk(users @ self.output_table.T, exclude, self.k)
        return users, indices, values


class TextGraph(nn.Module):
    """Token ids -> mean-pooled text embedding and the recommender's item vector."""

    def __init__(self, encoder: nn.Module, model: SeqRecModel | None):
        super().__init__()
        self.encoder = encoder.eval()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from components.bert.text_embeddings import mean_pool

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = mean_pool(hidden, attention_mask)
        if self.model is None:
            return text, text
        return text, self.model.output_items(self.model.project_text(text))


class MFGraph(nn.Module):
    def __init__(self, user_factors: np.ndarray, item_factors: np.ndarray, k: int):
        super().__init__()
        self.register_buffer("users", torch.as_tensor(user_factors, dtype=torch.float32))
        self.register_buffer("items", torch.as_tensor(item_factors, dtype=torch.float32))
        self.k = min(k, item_factors.shape[0])

    def forward(self, user_index: torch.Tensor, exclude: torch.Tensor):
        scores = self.users[user_index] @ self.items.T
        return _exclude_and_topk(scores, exclude, self.k)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per folded constant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, dynamo=True, optimize=True, opset_version=OPSET, verbose=False,
        )
    # Weights live inside the .onnx file (one file per graph is what the bundle hashes).
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    onnx.save(proto, str(path), save_as_external_data=False)
    for stray in path.parent.glob(path.name + ".data"):
        stray.unlink()


def export_sequence(model: SeqRecModel, path: Path, k: int) -> None:
    graph = SequenceGraph(model, k)
    L = model.cfg.max_len
    items = torch.zeros((2, L), dtype=torch.long)
    mask = torch.ones((2, L), dtype=torch.long)
    exclude = torch.full((2, 3), -1, dtype=torch.long)
    B = torch.export.Dim("batch", min=1, max=1 << 16)
    S = torch.export.Dim("sequence", min=1, max=L)
    E = torch.export.Dim("excluded", min=1, max=1 << 20)
    _export(graph, (items, mask, exclude), path, SEQUENCE_INPUTS, SEQUENCE_OUTPUTS,
            {"items": {0: B, 1: S}, "mask": {0: B, 1: S}, "exclude": {0: B, 1: E}})


def export_text_encoder(encoder: nn.Module, model: SeqRecModel | None, path: Path, max_length: int) -> None:
    graph = TextGraph(encoder, model)
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    B = torch.export.Dim("batch", min=1, max=1 << 16)
    T = torch.export.Dim("tokens", min=1, max=max_length)
    _export(graph, (ids, mask), path, TEXT_INPUTS, TEXT_OUTPUTS, {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: T}})


def export_mf(user_factors: np.ndarray, item_factors: np.ndarray, path: Path, k: int) -> None:
    graph = MFGraph(user_factors, item_factors, k)
    B = torch.export.Dim("batch", min=1, max=1 << 16)
    E = torch.export.Dim("excluded", min=1, max=1 << 20)
    _export(graph, (torch.zeros(2, dtype=torch.long), torch.full((2, 3), -1, dtype=torch.long)), path,
            MF_INPUTS, MF_OUTPUTS, {"user_index": {0: B}, "exclude": {0: B, 1: E}})


def text_encoder_for(model: SeqRecModel, encoder_path: Path) -> nn.Module:
    """The text encoder the recommender's item texts went through: its fine-tuned tower, or the
    pretrained encoder the frozen embeddings came from."""
    if model.text_tower is not None:
        return model.text_tower.encoder
    from transformers import AutoModel

    return AutoModel.from_pretrained(encoder_path, attn_implementation="eager")


# --------------------------------------------------------------------------------------------
# Parity: ONNX Runtime against PyTorch
# --------------------------------------------------------------------------------------------


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def sequence_inputs(histories: list[np.ndarray], length: int, exclude_width: int = 1) -> dict[str, np.ndarray]:
    items = left_pad(histories, length)
    mask = (items != PAD).long()
    items = torch.where(mask > 0, items, torch.zeros_like(items))
    exclude = np.full((len(histories), exclude_width), -1, dtype=np.int64)
    for r, h in enumerate(histories):
        h = np.asarray(h)[-exclude_width:]
        exclude[r, : h.size] = h
    return {"items": items.numpy(), "mask": mask.numpy(), "exclude": exclude}


def top10_agreement(onnx_top: np.ndarray, torch_top: np.ndarray, users: np.ndarray, items: np.ndarray,
                    torch_scores: np.ndarray, tie_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (ONNX's top-k is exactly PyTorch's, ONNX's items score under PyTorch what
    PyTorch's own top-k scores, to a relative tolerance). Two correct implementations may order
    items whose scores tie to float rounding differently (a barely trained model is full of such
    ties); a different, lower-scored item is a real mismatch. `torch_scores`: PyTorch's top-k
    scores, sorted as returned."""
    exact = (onnx_top == torch_top).all(axis=1)
    their_scores = np.einsum("bh,bkh->bk", users, items[onnx_top])
    tolerance = tie_tolerance * np.maximum(1.0, np.abs(torch_scores))
    return exact, (np.abs(their_scores - torch_scores) <= tolerance).all(axis=1)


def check_sequence_parity(
    model: SeqRecModel, onnx_path: Path, histories: list[np.ndarray], k: int,
    batch_sizes: tuple[int, ...] = (1, 7, 64), lengths: tuple[int, ...] | None = None,
    tie_tolerance: float = 1e-5,
) -> dict[str, Any]:
    """Max |user vector| difference and top-k agreement at several batch sizes and lengths.

    Several shapes, because an exporter that silently specialises a dynamic axis to the example
    shape fails only at other shapes."""
    graph = SequenceGraph(model, k).eval()
    sess = session(onnx_path)
    L = model.cfg.max_len
    lengths = lengths or tuple(sorted({L, max(1, L // 2), max(1, L // 4)}))
    results = []
    for length in lengths:
        for bs in batch_sizes:
            rows = histories[: max(bs, 1)]
            if not rows:
                continue
            feeds = sequence_inputs(rows, length, exclude_width=8)
            onnx_users, onnx_top, _ = sess.run(None, feeds)
            with torch.no_grad():
                t_users, t_top, t_vals = graph(*(torch.from_numpy(feeds[n]) for n in SEQUENCE_INPUTS))
            exact, tied = top10_agreement(onnx_top[:, :10], t_top.numpy()[:, :10], t_users.numpy(),
                                          graph.output_table.numpy(), t_vals.numpy()[:, :10], tie_tolerance)
            results.append({
                "batch": len(rows), "length": length,
                "max_abs_diff": float(np.abs(onnx_users - t_users.numpy()).max()),
                "top10_exact": float(exact.mean()),
                "top10_identical": float((exact | tied).mean()),
            })
    return {
        "shapes": results,
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "min_top10_identical": min(r["top10_identical"] for r in results),
        "min_top10_exact": min(r["top10_exact"] for r in results),
    }


def tokenize(tokenizer_dir: Path, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def check_text_parity(graph_model: TextGraph, onnx_path: Path, tokenizer_dir: Path, texts: list[str], max_length: int) -> dict[str, float]:
    feeds = tokenize(tokenizer_dir, texts, max_length)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    onnx_text, onnx_item = session(onnx_path).run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        t_text, t_item = graph_model(torch.from_numpy(ids), torch.from_numpy(mask))
    return {
        "max_abs_diff_text": float(np.abs(onnx_text - t_text.numpy()).max()),
        "max_abs_diff_item": float(np.abs(onnx_item - t_item.numpy()).max()),
    }


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "recforge"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_tokenizer(encoder_path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    found = False
    for name in TOKENIZER_FILES:
        if (encoder_path / name).exists():
            shutil.copy2(encoder_path / name, out / name)
            found = found or name == "tokenizer.json"
    if not found:
        # Slow-tokenizer-only folders: build the fast tokenizer once and save its JSON.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(encoder_path).backend_tokenizer.save(str(out / "tokenizer.json"))


def write_bundle_manifest(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 of every file in the bundle and write `bundle.json`."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "bundle.json")
    manifest = {**manifest, "files": {str(p.relative_to(bundle)): sha256_file(p) for p in files}}
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass(frozen=True)
class BundleResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    parity: dict[str, Any]


def _title(text: str) -> str:
    """The first sentence of an item's text (texts are title, categories, description joined)."""
    return (text or "").split(". ")[0][:200]


def export_bundle(features_dir: Path, bert_dir: Path, mf_dir: Path, compress_dir: Path, out_dir: Path, params) -> BundleResult:
    """Assemble the serving bundle from the compression stage's chosen variants and MF."""
    import polars as pl

    from components.bert.model import load_model
    from components.evaluate import FactorModel

    report = json.loads((compress_dir / "report.json").read_text())
    model = load_model(bert_dir / "model")
    k = min(params.export.k, model.cfg.n_items)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    seq_variant = report["sequence"]["variant"]
    shutil.copy2(compress_dir / "sequence" / f"{seq_variant}.onnx", out_dir / "sequence.onnx")
    text = report.get("text_encoder")
    if text:
        shutil.copy2(compress_dir / "text_encoder" / f"{text['variant']}.onnx", out_dir / "text_encoder.onnx")
        shutil.copytree(compress_dir / "text_encoder" / "tokenizer", out_dir / "tokenizer")

    # Item vectors the graph scores against: the service needs them too (similar items,
    # explanations, new items appended to the catalogue, ANN indexes).
    with torch.no_grad():
        item_vectors = model.output_items(model.item_representations()).float().numpy()
    np.save(out_dir / "item_vectors.npy", item_vectors)

    items = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")
    import scipy.sparse as sp

    counts = np.asarray((sp.load_npz(features_dir / "train_matrix.npz") > 0).sum(axis=0)).ravel()
    titles = [_title(t) for t in items["text"].fill_null("").to_list()]
    (out_dir / "items.json").write_text(json.dumps({
        "titles": titles,
        "popularity": counts.astype(int).tolist(),
    }))

    mf_parity = None
    mf_factors = mf_dir / "factors.npz"
    if mf_factors.exists():
        mf = FactorModel.load(mf_factors)
        export_mf(mf.users["test"], mf.items["test"], out_dir / "mf.onnx", k)
        users = pl.read_parquet(features_dir / "user_map.parquet").sort("user_idx")["user_id"].to_list()
        (out_dir / "users.json").write_text(json.dumps(users))
        mf_parity = check_mf_parity(mf.users["test"], mf.items["test"], out_dir / "mf.onnx", min(10, k))

    manifest = {
        "format": 1,
        "k": k,
        "item_ids": items["item_id"].to_list(),
        "model_config": dataclasses.asdict(model.cfg),
        "sequence": {"file": "sequence.onnx", "variant": seq_variant, "reason": report["sequence"]["reason"],
                     "inputs": SEQUENCE_INPUTS, "outputs": SEQUENCE_OUTPUTS, "max_len": model.cfg.max_len,
                     "padding": "left; mask 1 = item, 0 = padding; exclude -1 = none"},
        "text_encoder": ({"file": "text_encoder.onnx", "variant": text["variant"], "reason": text["reason"],
                          "inputs": TEXT_INPUTS, "outputs": TEXT_OUTPUTS, "tokenizer": "tokenizer/tokenizer.json",
                          "max_length": model.cfg.text_max_length} if text else None),
        "mf": ({"file": "mf.onnx", "inputs": MF_INPUTS, "outputs": MF_OUTPUTS, "users": "users.json"}
               if mf_parity is not None else None),
        "item_vectors": "item_vectors.npy",
        "items": "items.json",
        "validation": report["sequence"]["quality_valid"][seq_variant],
        "package_versions": package_versions(),
    }
    manifest = write_bundle_manifest(out_dir, manifest)
    parity = {"sequence": report["sequence"]["deploy_parity"], "mf": mf_parity}
    (out_dir.parent / f"{out_dir.name}_parity.json").write_text(json.dumps(parity, indent=2))
    return BundleResult(out_dir, manifest, parity)


def check_mf_parity(users: np.ndarray, items: np.ndarray, onnx_path: Path, k: int, n: int = 512) -> dict[str, float]:
    """MF graph against numpy on the first `n` users, with one excluded item each."""
    n = min(n, users.shape[0])
    idx = np.arange(n, dtype=np.int64)
    exclude = np.full((n, 1), -1, dtype=np.int64)
    scores = users[:n] @ items.T
    exclude[:, 0] = scores.argmax(1)  # the top item is excluded: the next k must follow
    top, _ = session(onnx_path).run(None, {"user_index": idx, "exclude": exclude})
    scores[np.arange(n), exclude[:, 0]] = -np.inf
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {"top10_identical": float((top[:, :k] == expected).all(axis=1).mean())}


def main() -> int:
    from components.cli import base_parser, params_from_args

    args = base_parser("Assemble the ONNX serving bundle (sequence model, text encoder, MF).").parse_args()
    params = params_from_args(args)
    art = args.artifacts
    res = export_bundle(art / "features", art / "bert", art / "mf", art / "compress", art / "bundle", params)
    m = res.manifest
    print(f"bundle {res.bundle_dir}: sequence {m['sequence']['variant']}, "
          f"text encoder {m['text_encoder']['variant'] if m['text_encoder'] else 'none'}, "
          f"{len(m['item_ids'])} items, {len(m['files'])} files")
    print(f"parity: {json.dumps(res.parity)}")
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
