"""The service's state: the model being served and its hot swap, the catalogue of items added
since training, the event store, the response cache, micro-batching, and the ranking with
explanations. No HTTP here (`serving/http.py`), no PyTorch anywhere in `serving/`.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import HTTPException

from serving import champion
from serving.batching import Batcher
from serving.bundle import Bundle, BundleError
from serving.bundle_format import CHECKSUM, title
from serving.cache import ResponseCache
from serving.impressions import ImpressionLog
from serving.retrieval import RetrievalConfig, exact_topk
from serving.schemas import MAX_HISTORY, NewItem, RecommendRequest
from serving.store import DataRules, EventStore, StoreBusy

log = logging.getLogger("serving")


@dataclass(frozen=True)
class Settings:
    """Everything the service is started with; the CLI's defaults are these."""

    bundle: Path | None = None
    model_name: str | None = None
    tracking_uri: str | None = None
    cache_dir: Path = Path("artifacts/serving/bundles")
    db: Path | str = Path("artifacts/serving/events.db")  # or a postgresql:// URL
    admin_token: str | None = None
    poll_seconds: float = 30.0
    max_batch: int = 64
    max_wait_ms: float = 0.0
    batch_workers: int = 2
    # Memory for cached answers (MB; 0 = no cache).
    cache_mb: float = 64.0
    # How often items added through any process sharing the store are picked up (0 = never).
    catalog_poll_seconds: float = 1.0
    threads: int = 1
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    index_cache_dir: Path = Path("artifacts/serving/ann")
    # Share of /recommend answers (to a user_id) logged as impressions (0 = none), and how many
    # may wait for the store before more are dropped.
    impression_rate: float = 1.0
    impression_queue: int = 10_000
    # Online metrics in /metrics: an event within `attribution_seconds` of a list counts for it;
    # recomputed every `online_refresh_seconds` (0 = never) over the last `online_window_seconds`.
    attribution_seconds: float = 1800.0
    online_k: int = 10
    online_refresh_seconds: float = 60.0
    online_window_seconds: float = 86_400.0
    # A challenger beside the champion: `ab` answers a stable `challenger_fraction` of users
    # with it; `shadow` has it rank that fraction of requests off the hot path, logged, never
    # shown. From `challenger_bundle`, or the registry's `@challenger` alias with `model_name`.
    challenger: str | None = None
    challenger_bundle: Path | None = None
    challenger_fraction: float = 0.5


@dataclass
class Catalog:
    """Items added through /items (by any process sharing the store): recommendable at once,
    scored from their text."""

    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))
    index: dict[str, int] = field(default_factory=dict)


def _share(user_id: str) -> float:
    """A user's stable place in [0, 1): the same on every replica and every restart."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, person=b"recforge-ab").digest()
    return int.from_bytes(digest, "big") / 2**64


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.catalog = Catalog()
        self.store = EventStore(settings.db)
        self.cache = ResponseCache(int(settings.cache_mb * 1e6))
        self.rules = DataRules()
        # Event writes wait on SQLite's lock: one thread of their own, never the event loop.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-writer")
        self._items_version: tuple[int, int] | None = None
        self._embedded: dict[tuple[str, str, str], np.ndarray] = {}
        self.user_versions: dict[str, int] = {}
        self.catalog_version = 0
        self.lock = threading.Lock()
        self.last_error: str | None = None
        # The challenger and the catalogue as its text encoder embeds it (None: no challenger).
        self.challenger: Bundle | None = None
        self.challenger_catalog = Catalog()
        self._shadow_tasks: set[asyncio.Task] = set()
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
        Gauge("recforge_cache_bytes", "memory held by cached answers", registry=self.metrics).set_function(
            lambda: self.cache.bytes)
        Gauge("recforge_cache_entries", "cached answers", registry=self.metrics).set_function(lambda: len(self.cache))
        self.impression_count = Counter("recforge_impressions_total", "impressions by outcome (logged, dropped, "
                                        "sampled_out)", ["result"], registry=self.metrics)
        self.online = Gauge("recforge_online", "online metrics over the last online window", ["metric", "model_version",
                            "variant"], registry=self.metrics)
        self._sample = random.Random().random
        self.impressions = (ImpressionLog(self.store, settings.impression_rate, settings.impression_queue,
                                          lambda result, n: self.impression_count.labels(result).inc(n))
                            if settings.impression_rate > 0 else None)

    # ---- loading ---------------------------------------------------------------------------

    def _load(self, path: Path, version: str) -> Bundle:
        s = self.settings
        return Bundle.load(path, version, s.threads, s.retrieval, s.index_cache_dir)

    def load_initial(self) -> None:
        s = self.settings
        if s.bundle is not None:
            self._install(self._load(s.bundle, "local"))
            self._first_challenger()
            return
        try:
            self.refresh()
        except Exception as exc:  # registry down, or a bad champion: the last good bundle serves
            try:
                cached = champion.last_good(s.cache_dir)
            except BundleError as bad:
                raise RuntimeError(f"no model: the registry failed ({exc}), and the cached bundle is unusable "
                                   f"({bad})") from exc
            if cached is None:
                raise RuntimeError(f"no model: the registry failed ({exc}) and no cached bundle exists") from exc
            log.warning("registry unavailable (%s): serving the cached bundle version %s", exc, cached[0])
            self._install(self._load(cached[1], cached[0]))
        self._first_challenger()

    def _first_challenger(self) -> None:
        # Without its challenger the service still serves: every user gets the champion.
        try:
            self.load_challenger()
        except Exception as exc:
            log.warning("no challenger: %s", exc)

    def load_challenger(self) -> bool:
        """Load (or swap to) the challenger: the local one, or the registry's `@challenger`
        version when it changed. True when swapped; a bad bundle raises, the old one serves on."""
        s = self.settings
        if s.challenger is None:
            return False
        if s.challenger_bundle is not None:
            bundle = self._refusing("the challenger bundle", lambda: self._load(s.challenger_bundle, "local"))
        else:
            current = champion.current(s.tracking_uri, s.model_name, alias="challenger")
            if self.challenger is not None and self.challenger.version == current.version:
                return False
            bundle, _ = self._refusing(f"challenger version {current.version}",
                                       lambda: self._fetch_and_load(current))
        catalog, _ = self._catalog_from_store(bundle)
        with self.lock:
            self.challenger, self.challenger_catalog = bundle, catalog
            self.cache.clear()
            self.catalog_version += 1
        log.info("challenger (%s, %.0f%%): bundle %s", s.challenger, 100 * s.challenger_fraction, bundle.version)
        return True

    def refresh(self) -> bool:
        """Load the registry's champion if it changed; True when swapped. A bad bundle raises
        and the current one keeps serving."""
        s = self.settings
        current = champion.current(s.tracking_uri, s.model_name)
        if self.bundle is not None and self.bundle.version == current.version:
            return False
        bundle, path = self._refusing(f"version {current.version}", lambda: self._fetch_and_load(current))
        champion.remember(s.cache_dir, current, path)
        self._install(bundle)
        return True

    def refresh_all(self) -> bool:
        """The champion poll: champion, then challenger (one failing does not stop the other)."""
        swapped, failure = False, None
        for load in (self.refresh, self.load_challenger):
            try:
                swapped = load() or swapped
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise failure
        return swapped

    def _fetch_and_load(self, current: champion.Champion) -> tuple[Bundle, Path]:
        path = champion.fetch(self.settings.tracking_uri, self.settings.cache_dir, current)
        return self._load(path, current.version), path

    def reload_local(self) -> None:
        self._install(self._refusing("the local bundle", lambda: self._load(self.settings.bundle, "local")))

    def _refusing(self, what: str, load):
        """`load()`, with a refusal counted and kept for /ready (the current model serves on)."""
        try:
            return load()
        except Exception as exc:
            self.swaps.labels("refused").inc()
            self.last_error = f"{what} refused: {exc}"
            raise

    def _install(self, bundle: Bundle) -> None:
        catalog, version = self._catalog_from_store(bundle)
        rules = DataRules(**bundle.manifest.get("data_rules", {}))
        with self.lock:
            old = self.bundle
            self.bundle, self.catalog, self.rules, self._items_version = bundle, catalog, rules, version
            self.cache.clear()
            self.catalog_version += 1
        try:  # what the event export checks against
            self.store.set_rules(rules)
        except StoreBusy as exc:
            log.warning("the data rules were not recorded in the store: %s", exc)
        self.model_version.set(float(bundle.version) if bundle.version.isdigit() else 0)
        if old is not None:
            self.swaps.labels("swapped").inc()
        # A catalogue is millions of long-lived Python objects (ids, titles, the id map): moved
        # out of the collector's reach, so that full collections do not walk them (each walk
        # was a latency spike). The old bundle's objects stay frozen: a few MB per swap.
        gc.collect()
        gc.freeze()
        log.info("serving bundle %s (%d items, %d added)", bundle.version, len(bundle.item_ids), len(catalog.ids))

    def _catalog_from_store(self, bundle: Bundle) -> tuple[Catalog, tuple[int, int]]:
        """The added items as the store holds them now, each text embedded once."""
        version = self.store.items_version()
        added = [(i, t) for i, t in self.store.items() if i not in bundle.index]
        catalog = Catalog(vectors=np.zeros((0, bundle.item_vectors.shape[1]), np.float32))
        if not added or bundle.text_encoder is None:
            return catalog, version
        # Vectors depend on the model's text encoder: keyed by the bundle (its manifest checksum
        # covers every file), so a vector is never reused across models.
        model = bundle.manifest.get(CHECKSUM)
        keys = [(model, i, t) for i, t in added]
        known = self._embedded  # a sync and a swap may both be here: each works on its own copy
        vectors = {k: known[k] for k in keys if k in known}
        new = [k for k in keys if k not in vectors]
        if new:
            vectors.update(zip(new, bundle.embed_text([t for _, _, t in new])))
        self._embedded = {**{k: v for k, v in known.items() if k[0] == model}, **vectors}
        catalog.ids = [i for i, _ in added]
        catalog.titles = [title(t) for _, t in added]
        catalog.vectors = np.stack([vectors[k] for k in keys])
        catalog.index = {i: j for j, i in enumerate(catalog.ids)}
        return catalog, version

    def sync_catalog(self) -> bool:
        """Pick up items added or replaced through any process sharing the store; True when the
        catalogue changed. Cheap when nothing did (one query)."""
        with self.lock:
            bundle = self.bundle
        if bundle is None or self.store.items_version() == self._items_version:
            return False
        catalog, version = self._catalog_from_store(bundle)
        challenger = self.challenger
        challenger_catalog = self._catalog_from_store(challenger)[0] if challenger is not None else Catalog()
        with self.lock:
            if self.bundle is not bundle or self.challenger is not challenger:  # swapped meanwhile
                return False
            self.catalog, self._items_version = catalog, version
            self.challenger_catalog = challenger_catalog
            self.catalog_version += 1
            self.cache.clear()
        return True

    async def add_event(self, user_id: str, item_id: str, timestamp: int, weight: float | None) -> None:
        """Append an event off the event loop; `StoreBusy` when the store stays locked."""
        await asyncio.get_running_loop().run_in_executor(self.writer, self.store.add, user_id, item_id, timestamp,
                                                         weight)
        self.user_versions[user_id] = self.user_versions.get(user_id, 0) + 1

    def refresh_online(self) -> list:
        """Recompute the online metrics of the last window into /metrics."""
        from serving import online

        s = self.settings
        now = time.time()
        rows = online.from_store(self.store, now - s.online_window_seconds, now, s.online_k, s.attribution_seconds)
        self.online.clear()
        for m in rows:
            for name, value in m.flat().items():
                if isinstance(value, (int, float)) and not name.endswith(("_low", "_high")):
                    self.online.labels(name, m.model_version, m.variant).set(value)
        return rows

    def close(self) -> None:
        if self.impressions is not None:
            self.impressions.close()
        self.writer.shutdown(wait=True)
        self.store.close()

    # ---- recommendation --------------------------------------------------------------------

    def variant(self, user_id: str | None) -> str:
        """`challenger` for the users A/B assigns to it (a stable hash of the id), else `champion`."""
        s = self.settings
        if s.challenger != "ab" or not user_id or self.challenger is None:
            return "champion"
        return "challenger" if _share(user_id) < s.challenger_fraction else "champion"

    async def recommend(self, req: RecommendRequest) -> bytes:
        """The answer as JSON bytes (what the cache holds and the response sends)."""
        with self.lock:
            bundle, catalog, catalog_version = self.bundle, self.catalog, self.catalog_version
            challenger, challenger_catalog = self.challenger, self.challenger_catalog
        if bundle is None:
            raise HTTPException(503, "no model loaded yet")
        stored = self.store.history(req.user_id, MAX_HISTORY) if req.user_id else []
        variant = self.variant(req.user_id)
        if variant == "challenger":
            bundle, catalog = challenger, challenger_catalog
        elif (self.settings.challenger == "shadow" and challenger is not None and req.user_id
              and self.impressions is not None and self._sample() < self.settings.challenger_fraction):
            # Ranked after this answer is sent, on the same workers: the user never waits for it.
            task = asyncio.get_running_loop().create_task(
                self._shadow(req, stored, challenger, challenger_catalog, catalog_version, time.time()))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
        body, cached = await self._answer(req, stored, bundle, catalog, catalog_version, variant)
        return self._shown(req, bundle, catalog, body, variant, cached)

    async def _shadow(self, req: RecommendRequest, stored: list[str], bundle: Bundle, catalog: Catalog,
                      catalog_version: int, shown_at: float) -> None:
        await asyncio.sleep(0)  # let the champion's answer go first
        try:
            body, _ = await self._answer(req, stored, bundle, catalog, catalog_version, "shadow")
            self.impressions.offer(uuid.uuid4().hex, req.user_id, bundle.version, "shadow", body,
                                   len(bundle.item_ids) + len(catalog.ids), shown_at)
        except Exception as exc:  # a failing shadow must never touch the champion's answers
            log.warning("shadow ranking failed: %s", exc)

    async def _answer(self, req: RecommendRequest, stored: list[str], bundle: Bundle, catalog: Catalog,
                      catalog_version: int, variant: str) -> tuple[bytes, bool]:
        """(the answer's JSON, whether it came from the cache) of one model."""
        raw = (stored + list(req.history or []))[-MAX_HISTORY:]
        key = ResponseCache.key(req.user_id, raw, req.k, req.exclude_seen, self.user_versions.get(req.user_id or "", 0),
                                catalog_version, f"{variant}:{bundle.version}")
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True

        # Items past the graph's catalogue (embedded from text) are excluded when seen but cannot
        # be encoded as history.
        known = [bundle.index[i] for i in raw if bundle.index.get(i, bundle.graph_items) < bundle.graph_items]
        added = {i for i in raw if i in catalog.index}
        ignored = sorted({i for i in raw if i not in bundle.index and i not in added})
        seen = set(raw) if req.exclude_seen else set()
        if not known:
            result = self._popular(bundle, catalog, req.k, seen)
        else:
            history = known[-bundle.max_len:]
            exclude = sorted({bundle.index[i] for i in seen if i in bundle.index})
            user, top, scores = await self.batcher.submit(bundle, history, exclude, req.k)
            result = self._rank(bundle, catalog, user, top, scores, history, req.k, seen)
        result.update({"model_version": bundle.version, "variant": variant, "history_used": len(known),
                       "ignored_items": ignored, "user_known": bool(stored)})
        body = orjson.dumps(result)
        self.cache.put(key, body)
        return body, False

    def _shown(self, req: RecommendRequest, bundle: Bundle, catalog: Catalog, body: bytes, variant: str,
               cached: bool) -> bytes:
        """The answer as sent: logged as an impression (for a user, when sampled) under a request
        id the client can quote."""
        tail = b',"cached":true' if cached else b',"cached":false'
        if self.impressions is None or not req.user_id or not self.impressions.sampled():
            return body[:-1] + tail + b',"request_id":null}'
        request_id = uuid.uuid4().hex
        self.impressions.offer(request_id, req.user_id, bundle.version, variant, body,
                               len(bundle.item_ids) + len(catalog.ids))
        return body[:-1] + tail + b',"request_id":"' + request_id.encode() + b'"}'

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
        elif item_id in catalog.index:
            v = catalog.vectors[catalog.index[item_id]]
            vec = v / (np.linalg.norm(v) + 1e-12)
        else:
            raise HTTPException(404, f"unknown item {item_id!r}")
        top, sims = exact_topk(vec[None, :].astype(np.float32), bundle.unit_vectors, k + 1)
        pairs = [(i, sim) for i, sim in zip(top[0].tolist(), sims[0].tolist())
                 if i >= 0 and bundle.item_ids[i] != item_id][:k]
        return {"item_id": item_id, "similar": [
            {"item_id": bundle.item_ids[i], "title": bundle.titles[i], "similarity": sim} for i, sim in pairs]}

    def add_item(self, item: NewItem) -> dict[str, Any]:
        """Embed a new item's text and record it in the store: recommendable at once here, and
        within `catalog_poll_seconds` in every process sharing the store."""
        with self.lock:
            bundle = self.bundle
        if bundle is None:
            raise HTTPException(503, "no model loaded yet")
        if item.item_id in bundle.index:
            raise HTTPException(409, f"item {item.item_id!r} is already in the model's catalogue")
        if bundle.text_encoder is None:
            raise HTTPException(422, "this bundle has no text encoder (an id-only model): items cannot be added from text")
        self.store.add_item(item.item_id, item.text if not item.title else f"{item.title}. {item.text}")
        self.sync_catalog()
        return {"item_id": item.item_id, "added": True, "catalog_added_items": len(self.catalog.ids)}
