"""The recommendation service: FastAPI + onnxruntime + numpy; nothing from training.

    python -m serving.app --bundle artifacts/bundle                 # a local bundle
    python -m serving.app --model-name recforge-recommender          # the registry's champion
        [--tracking-uri http://127.0.0.1:5000] [--poll-seconds 30]

Endpoints: POST /recommend, POST /events, POST /items (admin), POST /admin/reload (admin),
GET /items/{id}/similar, GET /health, GET /ready, GET /metrics, GET /docs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from serving import registry
from serving.bundle import Bundle, BundleError
from serving.retrieval import ANN_KINDS, RetrievalConfig, exact_topk
from serving.store import EventStore

log = logging.getLogger("serving")

MAX_K = 1000
MAX_HISTORY = 1000
MAX_BODY_BYTES = 256 * 1024


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"): valid Python strings that SQLite and the
    # response encoder cannot store or write.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return text


ID = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_encodable)]
Text = Annotated[str, AfterValidator(_encodable)]


@dataclass(frozen=True)
class Settings:
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


# ---- request / response models --------------------------------------------------------------


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ID | None = None
    history: list[ID] | None = Field(default=None, max_length=10_000, description="recent items, oldest first")
    k: int = Field(default=10, ge=1, le=MAX_K)
    exclude_seen: bool = True


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ID
    item_id: ID
    timestamp: int | None = Field(default=None, ge=0, le=4_102_444_800, description="unix seconds; default now")
    weight: float | None = Field(default=None, ge=-1e6, le=1e6)


class NewItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: ID
    text: Text = Field(min_length=1, max_length=20_000)
    title: Text | None = Field(default=None, max_length=500)


# ---- state ------------------------------------------------------------------------------------


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
        self.cache: OrderedDict[tuple, dict] = OrderedDict()
        self.user_versions: dict[str, int] = {}
        self.catalog_version = 0
        self.lock = threading.Lock()
        self.queue: asyncio.Queue | None = None
        self.running: set[asyncio.Task] = set()
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
            cached = registry.last_good(s.cache_dir)
            if cached is None:
                raise RuntimeError(f"no model: the registry failed ({exc}) and no cached bundle exists") from exc
            log.warning("registry unavailable (%s): serving the cached bundle version %s", exc, cached[0])
            self._install(self._load(cached[1], cached[0]))

    def refresh(self) -> bool:
        """Load the registry's champion if it changed; True when swapped. A bad bundle raises
        and the current one keeps serving."""
        s = self.settings
        version, artifact = registry.champion_version(s.tracking_uri, s.model_name)
        if self.bundle is not None and self.bundle.version == version:
            return False
        try:
            path = registry.fetch(s.tracking_uri, s.model_name, s.cache_dir, version, artifact)
            bundle = self._load(path, version)
        except Exception as exc:
            self.swaps.labels("refused").inc()
            self.last_error = f"version {version} refused: {exc}"
            raise
        registry.remember(s.cache_dir, version, path)
        self._install(bundle)
        return True

    def reload_local(self) -> None:
        self._install(self._load(self.settings.bundle, "local"))

    def _install(self, bundle: Bundle) -> None:
        catalog = Catalog(vectors=np.zeros((0, bundle.item_vectors.shape[1]), np.float32))
        added = [(i, t) for i, t in self.store.items() if i not in bundle.index]
        if added and bundle.text_encoder is not None:
            catalog.ids = [i for i, _ in added]
            catalog.titles = [t.split(". ")[0][:200] for _, t in added]
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

    # ---- micro-batching ----------------------------------------------------------------------

    async def batcher(self) -> None:
        """Concurrent requests share one ONNX call: wait for one and for a free worker, gather
        up to `max_batch` (optionally waiting up to `max_wait_ms`), run them in a worker thread.
        Up to `batch_workers` calls run at once (onnxruntime sessions take concurrent runs)."""
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        workers = asyncio.Semaphore(self.settings.batch_workers)
        while True:
            first = await self.queue.get()
            await workers.acquire()
            batch = [first]
            # Whatever queued up while the workers were busy joins at once; then, optionally,
            # wait up to max_wait_ms for more (0: never wait, the natural batching of a busy
            # server is enough and costs no latency).
            while len(batch) < self.settings.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch and self.settings.max_wait_ms > 0:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            task = asyncio.create_task(self._run_batch(batch))
            task.add_done_callback(lambda _: workers.release())
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run_batch(self, batch: list) -> None:
        by_bundle: dict[int, list] = {}
        for job in batch:  # a hot swap mid-batch: each request runs on the bundle it mapped ids with
            by_bundle.setdefault(id(job[0]), []).append(job)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._run_jobs, loop, list(by_bundle.values()))

    def _run_jobs(self, loop: asyncio.AbstractEventLoop, per_bundle: list[list]) -> None:
        """In a worker thread: each part of the batch is answered on the event loop as soon as
        it is done (one thread hand-off for the whole batch)."""
        for jobs in per_bundle:
            bundle = jobs[0][0]
            try:
                for rows, users, top, scores in bundle.recommend_parts(
                        [j[1] for j in jobs], [j[2] for j in jobs], max(j[4] for j in jobs)):
                    loop.call_soon_threadsafe(self._answer, [jobs[r] for r in rows], (users, top, scores))
            except Exception as exc:
                loop.call_soon_threadsafe(self._answer, jobs, exc)

    def _answer(self, jobs: list, result) -> None:
        self.batch_size.observe(len(jobs))
        for r, j in enumerate(jobs):
            if j[3].done():
                continue
            if isinstance(result, Exception):
                j[3].set_exception(result)
            else:
                j[3].set_result((result[0][r], result[1][r], result[2][r]))

    async def infer(self, bundle: Bundle, history: list[int], exclude: list[int], k: int):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((bundle, history, exclude, future, k))
        return await future

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
        hit = self.cache.get(key) if self.settings.cache_size else None
        if hit is not None:
            self.cache.move_to_end(key)
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
            user, top, scores = await self.infer(bundle, history, exclude, req.k)
            result = self._rank(bundle, catalog, user, top, scores, history, req.k, seen)
        result.update({"model_version": bundle.version, "history_used": len(known),
                       "ignored_items": ignored, "cached": False,
                       "user_known": bool(stored)})
        if self.settings.cache_size:
            self.cache[key] = result
            if len(self.cache) > self.settings.cache_size:
                self.cache.popitem(last=False)
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
                titles[j] = item.title or item.text.split(". ")[0][:200]
            else:
                ids.append(item.item_id)
                titles.append(item.title or item.text.split(". ")[0][:200])
                vectors = np.vstack([vectors, vec[None, :]])
            self.catalog = Catalog(ids, titles, vectors)
            self.catalog_version += 1
            self.cache.clear()
        return {"item_id": item.item_id, "added": True, "catalog_added_items": len(ids)}


# ---- the app ------------------------------------------------------------------------------------


class Guard:
    """Body-size limit, request metrics and the `POST /recommend` hot path, as a plain ASGI
    middleware (Starlette's `BaseHTTPMiddleware` costs a noticeable share of a sub-millisecond
    request)."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
            return await response(scope, receive, send)
        start = time.perf_counter()
        if scope["method"] == "POST" and scope["path"] == "/recommend":
            code = await self.recommend(receive, send)
            self.service.latency.labels("/recommend").observe(time.perf_counter() - start)
            self.service.requests.labels("/recommend", str(code)).inc()
            return None
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.service.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.service.requests.labels(endpoint, str(status["code"])).inc()


    async def recommend(self, receive, send) -> int:
        """`POST /recommend` without the framework's layers (routing, dependency solving, its
        middlewares cost as much as the model call on a short history): the same request
        model, the same 422 shape as FastAPI's, the same handler. The FastAPI route below
        documents it in the OpenAPI schema and serves it should this path be bypassed."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return await _send_json(send, 413, {"detail": f"request body over {MAX_BODY_BYTES} bytes"})
            chunks.append(chunk)
            more = message.get("more_body", False)
        try:
            req = RecommendRequest.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            errors = [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors(include_url=False, include_context=False)]
            return await _send_json(send, 422, {"detail": errors})
        try:
            payload = await self.service.recommend(req)
        except HTTPException as exc:
            return await _send_json(send, exc.status_code, {"detail": exc.detail})
        return await _send_json(send, 200, payload)


def _json_bytes(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:  # a 422 echoing odd input (64-bit overflow, lone surrogates)
        return json.dumps(payload, default=str).encode()


async def _send_json(send, status: int, payload: Any) -> int:
    body = _json_bytes(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    return status


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.queue = asyncio.Queue()
        batcher = asyncio.create_task(service.batcher())
        await asyncio.get_running_loop().run_in_executor(None, service.load_initial)
        poller = asyncio.create_task(poll()) if settings.model_name and settings.poll_seconds > 0 else None
        yield
        batcher.cancel()
        if poller:
            poller.cancel()
        service.store.close()

    async def poll() -> None:
        while True:
            await asyncio.sleep(settings.poll_seconds)
            try:
                await asyncio.get_running_loop().run_in_executor(None, service.refresh)
            except Exception as exc:  # keep serving the current model
                log.warning("champion poll: %s", exc)

    app = FastAPI(title="RecForge recommendation service", version="1", lifespan=lifespan)
    app.state.service = service

    app.add_middleware(Guard, service=service)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler fails (500) writing back input it cannot encode.
        errors = [{k: v for k, v in e.items() if k != "ctx"} for e in exc.errors()]
        return Response(_json_bytes({"detail": errors}), status_code=422, media_type="application/json")

    def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        token = settings.admin_token
        if not token:
            raise HTTPException(403, "admin endpoints are disabled (no admin token configured)")
        if authorization != f"Bearer {token}":
            raise HTTPException(401, "admin token required: Authorization: Bearer <token>")

    @app.post("/recommend")
    async def recommend(req: RecommendRequest) -> Response:
        """Top-k for a known user (history from the event store), an explicit recent history, or
        both; with neither, the most popular items, flagged `fallback: popularity`."""
        # Served by `Guard.recommend` (same model, same handler) before routing; this route
        # documents the endpoint in the OpenAPI schema and answers if the app runs unwrapped.
        return Response(_json_bytes(await service.recommend(req)), media_type="application/json")

    @app.post("/events", status_code=201)
    async def events(event: Event) -> dict[str, Any]:
        ts = event.timestamp if event.timestamp is not None else int(time.time())
        service.store.add(event.user_id, event.item_id, ts, event.weight)
        service.user_versions[event.user_id] = service.user_versions.get(event.user_id, 0) + 1
        bundle = service.bundle
        known = bundle is not None and (event.item_id in bundle.index or event.item_id in service.catalog.ids)
        return {"stored": True, "timestamp": ts, "item_known": known}

    @app.post("/items", status_code=201, dependencies=[Depends(admin)])
    async def items(item: NewItem) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, service.add_item, item)

    @app.post("/admin/reload", dependencies=[Depends(admin)])
    async def reload() -> dict[str, Any]:
        try:
            if settings.bundle is not None:
                await asyncio.get_running_loop().run_in_executor(None, service.reload_local)
                swapped = True
            else:
                swapped = await asyncio.get_running_loop().run_in_executor(None, service.refresh)
        except (BundleError, Exception) as exc:
            raise HTTPException(409, f"reload refused, the current model keeps serving: {exc}") from None
        return {"swapped": swapped, "model_version": service.bundle.version}

    @app.get("/items/{item_id}/similar")
    async def similar(item_id: Annotated[str, Field(max_length=256)], k: int = 10) -> dict[str, Any]:
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be in [1, {MAX_K}]")
        return service.similar(item_id, k)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.bundle is None:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "model_version": service.bundle.version, "items": len(service.bundle.item_ids),
                "retrieval": service.bundle.retrieval_kind,
                "index_build_s": (round(service.bundle.retriever.build_seconds, 1)
                                  if service.bundle.retriever is not None and service.bundle.retriever.index is not None
                                  else None),
                "added_items": len(service.catalog.ids), "last_error": service.last_error}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(service.metrics).decode(), media_type="text/plain; version=0.0.4")

    return app


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, str, int]:
    p = argparse.ArgumentParser(description="The RecForge recommendation service.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="a local bundle folder (artifacts/bundle)")
    src.add_argument("--model-name", help="serve models:/<name>@champion from the MLflow registry")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow/mlflow.db"))
    p.add_argument("--cache-dir", type=Path, default=Path("artifacts/serving/bundles"))
    p.add_argument("--db", type=Path, default=Path("artifacts/serving/events.db"))
    p.add_argument("--poll-seconds", type=float, default=30.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="extra wait for a fuller batch (0: batch only what is already queued)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per call")
    p.add_argument("--batch-workers", type=int, default=2, help="ONNX calls in flight at once (about the cores)")
    p.add_argument("--cache-size", type=int, default=10_000, help="cached responses (0 = no cache)")
    defaults = RetrievalConfig()
    p.add_argument("--exact-max-items", type=int, default=defaults.exact_max_items,
                   help="exact top-k up to this catalogue size, FAISS beyond")
    p.add_argument("--ann", choices=ANN_KINDS, default=defaults.ann, help="FAISS index beyond --exact-max-items")
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help="IVF lists searched per query")
    p.add_argument("--ef-search", type=int, default=defaults.ef_search, help="HNSW search breadth")
    p.add_argument("--int8-table", action="store_true", help="score against an INT8 copy of the item vectors")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    settings = Settings(bundle=a.bundle, model_name=a.model_name, tracking_uri=a.tracking_uri, cache_dir=a.cache_dir,
                        db=a.db, admin_token=os.environ.get("RECFORGE_ADMIN_TOKEN"), poll_seconds=a.poll_seconds,
                        max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, batch_workers=max(1, a.batch_workers),
                        threads=a.threads,
                        cache_size=a.cache_size, index_cache_dir=a.cache_dir.parent / "ann",
                        retrieval=RetrievalConfig(exact_max_items=a.exact_max_items, ann=a.ann, nprobe=a.nprobe,
                                                  ef_search=a.ef_search, int8=a.int8_table,
                                                  threads=a.threads))
    return settings, a.host, a.port


def main() -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, host, port = settings_from_args()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", proxy_headers=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
