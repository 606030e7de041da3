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
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


CHECKSUM = "manifest_sha256"
# Manifest entries that name a file of the bundle: each must be listed (and so hashed).
FILE_FIELDS = (("sequence", "file"), ("text_encoder", "file"), ("text_encoder", "tokenizer"), ("mf", "file"),
               ("mf", "users"), ("item_vectors",), ("items",))


def _checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest itself (canonical JSON, without this field)."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 of every file in the bundle and of the manifest itself; write `bundle.json`."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {k: v for k, v in manifest.items() if k not in ("files", CHECKSUM)}
    manifest = {**manifest, "format": FORMAT,
                "files": {str(p.relative_to(bundle)): sha256_file(p) for p in files}}
    manifest[CHECKSUM] = _checksum(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def bundle_sha256(bundle: Path) -> str:
    """One hash for the whole bundle: the manifest lists every other file's sha256. The registry
    records it with each version, and the service checks a download against it."""
    return sha256_file(bundle / MANIFEST)


def _inside(bundle: Path, rel: str) -> Path:
    path = (bundle / rel).resolve()
    if not isinstance(rel, str) or Path(rel).is_absolute() or not path.is_relative_to(bundle.resolve()):
        raise BundleError(f"{bundle}: {rel!r} points outside the bundle")
    return path


def verify(bundle: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """The manifest, once everything it says holds: its own checksum (an edited manifest is
    refused), the sha256 of `bundle.json` itself when the registry recorded one, every listed
    file present inside the bundle with its sha256, every file the manifest uses listed."""
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}")
    if expected_sha256 is not None and sha256_file(manifest_path) != expected_sha256:
        raise BundleError(f"{bundle}: {MANIFEST} is not the one registered (sha256 differs from the registry's)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a manifest")
    if manifest.get(CHECKSUM) != _checksum(manifest):
        raise BundleError(f"{manifest_path}: edited after export (its {CHECKSUM} does not match its content)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{manifest_path}: no file list")
    for rel, expected in files.items():
        path = _inside(bundle, rel)
        if not path.is_file():
            raise BundleError(f"{bundle}: {rel} is missing")
        if sha256_file(path) != expected:
            raise BundleError(f"{bundle}: {rel} does not match its sha256 in {MANIFEST}")
    for field in FILE_FIELDS:
        value: Any = manifest
        for part in field:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and value not in files:
            raise BundleError(f"{manifest_path}: {'.'.join(field)} names {value!r}, which is not a listed file")
    return manifest
