"""The serving bundle's on-disk contract, written by `components/export.py`, read by
`serving/bundle.py`. numpy only: the service imports it without PyTorch.

A bundle folder holds:

- `sequence.onnx`: `items` [B, L] int64 item indices, `mask` [B, L] int64 (1 = item, 0 =
  padding; histories are left-padded, most recent item last), `exclude` [B, E] int64 (item
  indices not to recommend, padded with -1) -> `user_vectors` [B, H], `topk_items` [B, K],
  `topk_scores` [B, K];
- `text_encoder.onnx` (text modes): `input_ids`, `attention_mask` [B, T] int64 ->
  `text_embedding` [B, D] and `item_vector` [B, H], with its tokenizer in `tokenizer/`;
- `mf.onnx` (when MF was trained): `user_index` [B], `exclude` [B, E] -> `topk_items`,
  `topk_scores`, with the user ids in `users.json`;
- `item_vectors.npy` (the vectors the sequence graph scores against), `items.json` (titles and
  training popularity, in item-index order);
- `bundle.json`: the manifest (item id map, model config, the graphs' inputs and outputs, K,
  package versions) and the sha256 of every other file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
MANIFEST = "bundle.json"
SEQUENCE_INPUTS = ["items", "mask", "exclude"]
SEQUENCE_OUTPUTS = ["user_vectors", "topk_items", "topk_scores"]
TEXT_INPUTS = ["input_ids", "attention_mask"]
TEXT_OUTPUTS = ["text_embedding", "item_vector"]
MF_INPUTS = ["user_index", "exclude"]
MF_OUTPUTS = ["topk_items", "topk_scores"]
# `exclude` rows are padded with this (no item).
NO_ITEM = -1
PADDING_RULE = "left; mask 1 = item, 0 = padding; exclude -1 = none"
TITLE_CHARS = 200


class BundleError(RuntimeError):
    """A bundle that is incomplete, corrupt or inconsistent; it is refused."""


def title(text: str | None) -> str:
    """An item's display title: the first sentence of its text (texts are title, categories and
    description joined by ". ")."""
    return (text or "").split(". ")[0][:TITLE_CHARS]


def sequence_feeds(histories: Sequence[Sequence[int]], length: int,
                   excludes: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """The sequence graph's inputs for a batch: each history's last `length` items, left-padded,
    and the items to exclude per row, padded with -1 (None: exclude nothing)."""
    n = len(histories)
    items = np.zeros((n, length), dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    for r, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-length:] if length else np.zeros(0, np.int64)
        if h.size:
            items[r, length - h.size:] = h
            mask[r, length - h.size:] = 1
    return {"items": items, "mask": mask, "exclude": exclusion_matrix(excludes or [[]] * n)}


def exclusion_matrix(excludes: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, E] item indices, rows padded with -1 (at least one column: the graph needs one)."""
    width = max(1, max((len(e) for e in excludes), default=1))
    out = np.full((len(excludes), width), NO_ITEM, dtype=np.int64)
    for r, e in enumerate(excludes):
        out[r, : len(e)] = e
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 of every file in the bundle and write `bundle.json`."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "format": FORMAT,
                "files": {str(p.relative_to(bundle)): sha256_file(p) for p in files}}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def manifest_sha256(bundle: Path) -> str:
    """One hash for the whole bundle: the manifest lists every other file's sha256."""
    return sha256_file(bundle / MANIFEST)


def verify(bundle: Path) -> dict[str, Any]:
    """The manifest, after checking every listed file's sha256 (and that none is missing)."""
    manifest_path = bundle / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{bundle}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: not JSON ({exc})") from None
    for rel, expected in manifest.get("files", {}).items():
        path = bundle / rel
        if not path.exists():
            raise BundleError(f"{bundle}: {rel} is missing")
        if sha256_file(path) != expected:
            raise BundleError(f"{bundle}: {rel} does not match its sha256 in {MANIFEST}")
    return manifest
