"""A verified, loaded ONNX bundle (its contract: `serving/bundle_format.py`).

No PyTorch here: onnxruntime, numpy and the `tokenizers` library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle_format import BundleError, sequence_feeds, verify
from serving.retrieval import RetrievalConfig, Retriever


# Histories share an ONNX call when the longest is at most 1.25x the shortest + 8 items.
LENGTH_SLACK = 1.25
LENGTH_PAD = 8


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Idle worker threads must not spin: the event loop (and, in benchmarks, the load
    # generator) shares the cores with them.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    version: str
    threads: int = 1
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    index_cache_dir: Path | None = None
    item_ids: list[str] = field(init=False)
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        m = self.manifest
        self.item_ids = list(m["item_ids"])
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.max_len = int(m["sequence"]["max_len"])
        self.k = int(m["k"])
        self.sequence = _session(self.path / m["sequence"]["file"], self.threads)
        items = json.loads((self.path / m["items"]).read_text())
        self.titles: list[str] = items["titles"]
        popularity = np.asarray(items["popularity"], dtype=np.float64)
        self.popular = np.argsort(-popularity, kind="stable")
        self.popularity = popularity
        vectors = np.load(self.path / m["item_vectors"]).astype(np.float32)
        if vectors.shape[0] != len(self.item_ids):
            raise BundleError(f"{self.path}: {vectors.shape[0]} item vectors for {len(self.item_ids)} items")
        self.item_vectors = vectors
        self.unit_vectors = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
        # The sequence graph encodes histories over (and, for small catalogues, ranks) its first
        # `graph_items` items; a catalogue beyond the graph's (items embedded from text offline)
        # or over `exact_max_items` is ranked outside the graph, exactly or by FAISS.
        self.graph_items = int(m["sequence"].get("catalog_items", len(self.item_ids)))
        if not 0 < self.graph_items <= len(self.item_ids):
            raise BundleError(f"{self.path}: sequence.catalog_items {self.graph_items} outside 1..{len(self.item_ids)}")
        self.retriever: Retriever | None = None
        if (self.graph_items < len(self.item_ids) or len(self.item_ids) > self.retrieval.exact_max_items
                or self.retrieval.int8):
            key = m.get("files", {}).get(m["item_vectors"])
            self.retriever = Retriever(vectors, self.retrieval, key, self.index_cache_dir)
        self.text_encoder = None
        self.tokenizer = None
        text = m.get("text_encoder")
        if text:
            from tokenizers import Tokenizer

            self.text_encoder = _session(self.path / text["file"], self.threads)
            tok = Tokenizer.from_file(str(self.path / text["tokenizer"]))
            tok.enable_truncation(int(text["max_length"]))
            tok.enable_padding(pad_id=0)
            self.tokenizer = tok

    @classmethod
    def load(cls, path: Path, version: str = "local", threads: int = 1,
             retrieval: RetrievalConfig | None = None, index_cache_dir: Path | None = None) -> "Bundle":
        manifest = verify(path)
        try:
            bundle = cls(path, manifest, version, threads, retrieval or RetrievalConfig(), index_cache_dir)
            bundle.warm_up()
        except BundleError:
            raise
        except Exception as exc:  # a model that does not load or run is a bad bundle
            raise BundleError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None
        return bundle

    def warm_up(self) -> None:
        self.recommend_batch([[0]], [[0]])

    # ---- inference ----------------------------------------------------------------------

    @property
    def retrieval_kind(self) -> str:
        return "graph" if self.retriever is None else self.retriever.label

    def recommend_batch(self, histories: list[list[int]], excludes: list[list[int]],
                        k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user vectors, top-k indices, scores) for a batch, rows in order (see `recommend_parts`)."""
        users = top = scores = None
        for rows, u, t, sc in self.recommend_parts(histories, excludes, k):
            if users is None:
                n = len(histories)
                users = np.empty((n, u.shape[1]), u.dtype)
                top = np.empty((n, t.shape[1]), t.dtype)
                scores = np.empty((n, sc.shape[1]), sc.dtype)
            users[rows], top[rows], scores[rows] = u, t, sc
        return users, top, scores

    def recommend_parts(self, histories: list[list[int]], excludes: list[list[int]], k: int | None = None):
        """Yield (row indices, user vectors, top-k indices, scores) as parts of the batch are
        done. History indices must be below `graph_items`. The graph path returns the graph's K
        items per row, the external one `k`.

        Rows are padded to the longest history of their ONNX call, and the graph's cost grows
        with that length: histories of similar length share a call, very different ones do not
        (on MovieLens, batches of 8 real histories ran 1.7x faster so than padded together).
        The graph path yields each call's rows at once (short histories are answered first);
        the external path encodes every group, then searches the whole batch in one go."""
        groups = self.length_groups(histories)
        if self.retriever is None:
            for rows in groups:
                users, top, scores = self._graph([histories[r] for r in rows], [excludes[r] for r in rows])
                yield rows, users, top, scores
            return
        rows = [r for group in groups for r in group]
        users = np.concatenate([self._graph([histories[r] for r in group], None)[0] for group in groups])
        top, scores = self.retriever.search(users, min(k or self.k, len(self.item_ids)), [excludes[r] for r in rows])
        yield rows, users, top, scores

    def length_groups(self, histories: list[list[int]]) -> list[list[int]]:
        """Row indices grouped by history length, shortest first (see `recommend_parts`)."""
        lengths = [max(1, min(self.max_len, len(h))) for h in histories]
        groups: list[list[int]] = []
        for r in sorted(range(len(histories)), key=lengths.__getitem__):
            if groups and lengths[r] <= LENGTH_SLACK * lengths[groups[-1][0]] + LENGTH_PAD:
                groups[-1].append(r)
            else:
                groups.append([r])
        return groups

    def _graph(self, histories: list[list[int]], excludes: list[list[int]] | None):
        """One ONNX call: (users, top-K, scores); with `excludes` None, only the user vectors
        are wanted (the graph's own top-K then excludes nothing and is not returned)."""
        length = max(1, min(self.max_len, max((len(h) for h in histories), default=1)))
        feeds = sequence_feeds(histories, length, excludes)
        if excludes is None:
            return self.sequence.run(["user_vectors"], feeds)
        return self.sequence.run(None, feeds)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        if self.text_encoder is None:
            raise BundleError("this bundle has no text encoder (an id-only model): items cannot be added from text")
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        _, item_vectors = self.text_encoder.run(None, {"input_ids": ids, "attention_mask": mask})
        if self.manifest["model_config"].get("similarity") == "cosine":
            item_vectors = item_vectors / (np.linalg.norm(item_vectors, axis=1, keepdims=True) + 1e-12)
        return item_vectors.astype(np.float32)
