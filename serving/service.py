"""The service's state: the model being served and its hot swap, the catalogue of items added
since training, the event store, the response cache, micro-batching, and the ranking with
explanations. No HTTP here (`serving/http.py`), no PyTorch anywhere in `serving/`.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from serving import champion
from serving.batching import Batcher
from serving.bundle import Bundle, BundleError
from serving.bundle_format import title
from serving.cache import ResponseCache
from serving.retrieval import RetrievalConfig, exact_topk
from serving.schemas import MAX_HISTORY, NewItem, RecommendRequest
from serving.store import EventStore

log = logging.getLogger("serving")


@dataclass(frozen=True)
class Settings:
    """Everything the service is started with; the CLI's defaults are these."""

    bundle: Path | None = None
    model_name: str | None = None
    tracking_uri: str | None = None
    cache_dir: Path = Path("artifacts/serving/bundles")
    db: Path = Path("artifacts/serving/events.db")
    admin_token: str | None = None
    poll_seconds: float = 30.0
    max_batch: int = 64
    max_wait_ms: float = 0.0
    batch_workers: int = 2
    cache_size: int = 10_000
    threads: int = 1
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    index_cache_dir: Path = Path("artifacts/serving/ann")


@dataclass
class Catalog:
    """Items added through /items: recommendable at once, scored from their text."""

    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.catalog = Catalog()
        self.store = EventStore(settings.db)
        self.cache = ResponseCache(settings.cache_size)
        self.user_versions: dict[str, int] = {}
        self.catalog_version = 0
        self.lock = threading.Lock()
        self.last_error: str | None = None
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.metrics = CollectorRegistry()
        self.latency = Histogram("recforge_request_seconds", "request latency", ["endpoint"], registry=self.metrics,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.requests = Counter("recforge_requests_total", "requests", ["endpoint", "status"], registry=self.metrics)
        self.model_version = Gauge("recforge_model_version", "served model version (0 = local bundle)", registry=self.metrics)
        self.swaps = Counter("recforge_model_swaps_total", "hot swaps", ["result"], registry=self.metrics)
        self.batch_size = Histogram("recforge_batch_size", "requests per ONNX call", registry=self.metrics,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batcher = Batcher(settings.max_batch, settings.max_wait_ms, settings.batch_workers, self.batch_size.observe)

    # ---- loading ---------------------------------------------------------------------------

    def _load(self, path: Path, version: str) -> Bundle:
        s = self.settings
        return Bundle.load(path, version, s.threads, s.retrieval, s.index_cache_dir)

    def load_initial(self) -> None:
        s = self.settings
        if s.bundle is not None:
            self._install(self._load(s.bundle, "local"))
            return
        try:
            self.refresh()
        except Exception as exc:  # registry down, or a bad champion: the last good bundle serves
            cached = champion.last_good(s.cache_dir)
            if cached is None:
                raise RuntimeError(f"no model: the registry failed ({exc}) and no cached bundle exists") from exc
            log.warning("registry unavailable (%s): serving the cached bundle version %s", exc, cached[0])
            self._install(self._load(cached[1], cached[0]))

    def refresh(self) -> bool:
        """Load the registry's champion if it changed; True when swapped. A bad bundle raises
        and the current one keeps serving."""
        s = self.settings
        version, artifact = champion.current(s.tracking_uri, s.model_name)
        if self.bundle is not None and self.bundle.version == version:
            return False
        try:
            path = champion.fetch(s.tracking_uri, s.model_name, s.cache_dir, version, artifact)
            bundle = self._load(path, version)
        except Exception as exc:
            self.swaps.labels("refused").inc()
            self.last_error = f"version {version} refused: {exc}"
            raise
        champion.remember(s.cache_dir, version, path)
        self._install(bundle)
        return True

    def reload_local(self) -> None:
        self._install(self._load(self.settings.bundle, "local"))

    def _install(self, bundle: Bundle) -> None:
        catalog = Catalog(vectors=np.zeros((0, bundle.item_vectors.shape[1]), np.float32))
        added = [(i, t) for i, t in self.store.items() if i not in bundle.index]
        if added and bundle.text_encoder is not None:
            catalog.ids = [i for i, _ in added]
            catalog.titles = [title(t) for _, t in added]
            catalog.vectors = bundle.embed_text([t for _, t in added])
        with self.lock:
            old = self.bundle
            self.bundle, self.catalog = bundle, catalog
            self.cache.clear()
            self.catalog_version += 1
        self.model_version.set(float(bundle.version) if bundle.version.isdigit() else 0)
        if old is not None:
            self.swaps.labels("swapped").inc()
        # A catalogue is millions of long-lived Python objects (ids, titles, the id map): moved
        # out of the collector's reach, so that full collections do not walk them (each walk
        # was a latency spike). The old bundle's objects stay frozen: a few MB per swap.
        gc.collect()
        gc.freeze()
        log.info("serving bundle %s (%d items, %d added)", bundle.version, len(bundle.item_ids), len(catalog.ids))

    # ---- recommendation --------------------------------------------------------------------

    async def recommend(self, req: RecommendRequest) -> dict[str, Any]:
        with self.lock:
            bundle, catalog, catalog_version = self.bundle, self.catalog, self.catalog_version
        if bundle is None:
            raise HTTPException(503, "no model loaded yet")
        stored = self.store.history(req.user_id, MAX_HISTORY) if req.user_id else []
        raw = (stored + list(req.history or []))[-MAX_HISTORY:]
        key = (req.user_id, tuple(raw), req.k, req.exclude_seen, self.user_versions.get(req.user_id or "", 0),
               catalog_version, bundle.version)
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}

        # Items past the graph's catalogue (embedded from text) are excluded when seen but cannot
        # be encoded as history.
        known = [bundle.index[i] for i in raw if bundle.index.get(i, bundle.graph_items) < bundle.graph_items]
        added_ids = set(catalog.ids)
        added = {i for i in raw if i in added_ids}
        ignored = sorted({i for i in raw if i not in bundle.index and i not in added})
        seen = set(raw) if req.exclude_seen else set()
        if not known:
            result = self._popular(bundle, catalog, req.k, seen)
        else:
            history = known[-bundle.max_len:]
            exclude = sorted({bundle.index[i] for i in seen if i in bundle.index})
            user, top, scores = await self.batcher.submit(bundle, history, exclude, req.k)
            result = self._rank(bundle, catalog, user, top, scores, history, req.k, seen)
        result.update({"model_version": bundle.version, "history_used": len(known),
                       "ignored_items": ignored, "cached": False,
                       "user_known": bool(stored)})
        self.cache.put(key, result)
        return result

    def _rank(self, bundle: Bundle, catalog: Catalog, user, top, scores, history, k, seen) -> dict[str, Any]:
        # Only the first k can be returned (the graph's top-K is sorted): no Python loop over K.
        top, scores = top[:k], scores[:k]
        keep = np.isfinite(scores)
        cands = [(s, i, None) for i, s in zip(top[keep].tolist(), scores[keep].tolist())]
        if catalog.ids:
            extra = catalog.vectors @ user
            cands += [(float(s), None, j) for j, s in enumerate(extra) if catalog.ids[j] not in seen]
            cands.sort(key=lambda c: -c[0])
        cands = cands[:k]
        if not cands:
            return {"items": [], "fallback": None}
        # Explanations for all k at once: cosine of each recommended item to each history item.
        vecs = np.stack([bundle.unit_vectors[idx] if idx is not None else catalog.vectors[j] / (
            np.linalg.norm(catalog.vectors[j]) + 1e-12) for _, idx, j in cands])
        sims = vecs @ bundle.unit_vectors[history].T
        best = sims.argmax(axis=1)
        best_sims = sims[np.arange(len(cands)), best].tolist()
        items = []
        for (score, idx, extra_j), b, sim in zip(cands, best.tolist(), best_sims):
            items.append({
                "item_id": bundle.item_ids[idx] if idx is not None else catalog.ids[extra_j],
                "score": score,
                "title": bundle.titles[idx] if idx is not None else catalog.titles[extra_j],
                "explanation": {"because_you_interacted_with": bundle.item_ids[history[b]],
                                "title": bundle.titles[history[b]], "similarity": sim},
            })
        return {"items": items, "fallback": None}

    def _popular(self, bundle: Bundle, catalog: Catalog, k: int, seen: set[str]) -> dict[str, Any]:
        out = []
        for idx in bundle.popular:
            if bundle.item_ids[idx] in seen:
                continue
            out.append({"item_id": bundle.item_ids[idx], "score": float(bundle.popularity[idx]),
                        "title": bundle.titles[idx], "explanation": {"popular": True}})
            if len(out) == k:
                break
        return {"items": out, "fallback": "popularity"}

    def similar(self, item_id: str, k: int) -> dict[str, Any]:
        with self.lock:
            bundle, catalog = self.bundle, self.catalog
        if bundle is None:
            raise HTTPException(503, "no model loaded yet")
        if item_id in bundle.index:
            vec = bundle.unit_vectors[bundle.index[item_id]]
        elif item_id in catalog.ids:
            v = catalog.vectors[catalog.ids.index(item_id)]
            vec = v / (np.linalg.norm(v) + 1e-12)
        else:
            raise HTTPException(404, f"unknown item {item_id!r}")
        top, sims = exact_topk(vec[None, :].astype(np.float32), bundle.unit_vectors, k + 1)
        pairs = [(i, sim) for i, sim in zip(top[0].tolist(), sims[0].tolist())
                 if i >= 0 and bundle.item_ids[i] != item_id][:k]
        return {"item_id": item_id, "similar": [
            {"item_id": bundle.item_ids[i], "title": bundle.titles[i], "similarity": sim} for i, sim in pairs]}

    def add_item(self, item: NewItem) -> dict[str, Any]:
        with self.lock:
            bundle = self.bundle
        if bundle is None:
            raise HTTPException(503, "no model loaded yet")
        if item.item_id in bundle.index:
            raise HTTPException(409, f"item {item.item_id!r} is already in the model's catalogue")
        try:
            vec = bundle.embed_text([item.text])[0]
        except BundleError as exc:
            raise HTTPException(422, str(exc)) from None
        self.store.add_item(item.item_id, item.text if not item.title else f"{item.title}. {item.text}")
        with self.lock:
            cat = self.catalog
            ids, titles = list(cat.ids), list(cat.titles)
            vectors = cat.vectors
            if item.item_id in ids:
                j = ids.index(item.item_id)
                vectors = vectors.copy()
                vectors[j] = vec
                titles[j] = item.title or title(item.text)
            else:
                ids.append(item.item_id)
                titles.append(item.title or title(item.text))
                vectors = np.vstack([vectors, vec[None, :]])
            self.catalog = Catalog(ids, titles, vectors)
            self.catalog_version += 1
            self.cache.clear()
        return {"item_id": item.item_id, "added": True, "catalog_added_items": len(ids)}
