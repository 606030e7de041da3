"""The HTTP layer: FastAPI routes over the service's state, behind a plain ASGI guard that
bounds request bodies, records request metrics, and serves `POST /recommend` without the
framework's layers (its hot path)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import Field, ValidationError

from serving.bundle import BundleError
from serving.schemas import MAX_BODY_BYTES, MAX_K, Event, NewItem, RecommendRequest
from serving.service import Service, Settings

log = logging.getLogger("serving")


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
        batcher = asyncio.create_task(service.batcher.run())
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
