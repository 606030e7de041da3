"""The ONNX graphs of the recommenders, how they are exported, and their parity with PyTorch.

Graphs (torch 2.13's dynamo exporter, opset 18, dynamic batch and sequence axes); their inputs
and outputs are the bundle contract's (`serving/bundle_format.py`):

- sequence graph: a history in, the user vector and the top-K items out; the item table is a
  constant of the graph, so one call turns a history into recommendations;
- text graph: token ids in, the mean-pooled text embedding and the recommender's item vector out
  (the projection included), so the service embeds a new item's text without PyTorch;
- MF graph: a user index in, the top-K items out, so MF is served and compared the same way.

Compression builds its variants from these; export assembles the chosen ones into a bundle.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.bert.model import PAD, SeqRecModel
from serving.bundle_format import (
    MF_INPUTS,
    MF_OUTPUTS,
    SEQUENCE_INPUTS,
    SEQUENCE_OUTPUTS,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    sequence_feeds,
)

log = logging.getLogger(__name__)

OPSET = 18


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
    # Traced without autograd: an inference graph. With it, a mask computed from a parameter
    # (the relative-position bias) requires grad, and SDPA's decomposition for ONNX then fails
    # on a non-contiguous view.
    with warnings.catch_warnings(), torch.no_grad():
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


def sequence_inputs(histories: list[np.ndarray], length: int, exclude_last: int = 1) -> dict[str, np.ndarray]:
    """Sequence-graph feeds for parity checks and calibration: each row also excludes its
    history's last `exclude_last` items, so exclusion is exercised."""
    return sequence_feeds(histories, length, [np.asarray(h)[-exclude_last:].tolist() for h in histories])


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
            feeds = sequence_inputs(rows, length, exclude_last=8)
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
