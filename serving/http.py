"""The HTTP layer: FastAPI routes over the service's state, behind a plain ASGI guard that
bounds every request body (whatever its transfer encoding), records request metrics, and serves
`POST /recommend` without the framework's layers (its hot path)."""

from __future__ import annotations

import asyncio
import hmac
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

from serving.schemas import MAX_BODY_BYTES, MAX_K, Event, NewItem, RecommendRequest
from serving.service import Service, Settings
from serving.store import StoreBusy

log = logging.getLogger("serving")

# How much of a rejected value a 422 repeats back.
ECHO_CHARS = 100
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(Exception):
    pass


async def _read_body(receive) -> bytes | None:
    """The whole request body, at most MAX_BODY_BYTES whether or not a Content-Length came
    (chunked uploads included); None when the client went away."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the client's own messages."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _excerpt(value: Any) -> Any:
    """A rejected value as a 422 repeats it: whole when short, cut to ECHO_CHARS otherwise (a
    20 MB field must not come back as a 20 MB error)."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def _errors(errors: list[dict[str, Any]], prefix: tuple = ()) -> list[dict[str, Any]]:
    return [_error(e, prefix) for e in errors]


def _error(e: dict[str, Any], prefix: tuple) -> dict[str, Any]:
    out = {**{k: v for k, v in e.items() if k not in ("ctx", "url", "input")}, "loc": [*prefix, *e["loc"]]}
    if e.get("type") == "json_invalid":
        # FastAPI's own parse error: the reason is in `ctx` and its `input` is a placeholder ({}).
        reason = (e.get("ctx") or {}).get("error")
        return {**out, "msg": f"{e['msg']}: {reason}" if reason and str(reason) not in e["msg"] else e["msg"]}
    return {**out, **({"input": _excerpt(e["input"])} if "input" in e else {})}


class Guard:
    """Body limits, request metrics and the `POST /recommend` hot path, as a plain ASGI
    middleware (Starlette's `BaseHTTPMiddleware` costs a noticeable share of a sub-millisecond
    request)."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        length = dict(scope["headers"]).get(b"content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES)
        body = b""
        if not too_large and scope["method"] in BODY_METHODS:
            try:
                body = await _read_body(receive)
            except BodyTooLarge:
                too_large = True
            if body is None:  # the client went away
                return None
        endpoint = "/recommend" if scope["path"] == "/recommend" else None
        if too_large:
            code = await _send_json(send, 413, {"detail": f"request body over {MAX_BODY_BYTES} bytes"})
        elif scope["method"] == "POST" and endpoint:
            code = await self.recommend(body, send)
        else:
            status = {"code": 500}

            async def send_and_record(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.app(scope, _replay(body, receive), send_and_record)
            finally:
                endpoint = getattr(scope.get("route"), "path", "other")
                code = status["code"]
        self.service.latency.labels(endpoint or "other").observe(time.perf_counter() - start)
        self.service.requests.labels(endpoint or "other", str(code)).inc()
        return None

    async def recommend(self, body: bytes, send) -> int:
        """`POST /recommend` without the framework's layers (routing, dependency solving, its
        middlewares cost as much as the model call on a short history): the same request
        model, the same 422 shape as FastAPI's, the same handler. The FastAPI route below
        documents it in the OpenAPI schema and serves it should this path be bypassed."""
        try:
            req = RecommendRequest.model_validate_json(body)
        except ValidationError as exc:
            return await _send_json(send, 422, {"detail": _errors(exc.errors(include_url=False), ("body",))})
        try:
            payload = await self.service.recommend(req)
        except HTTPException as exc:
            return await _send_json(send, exc.status_code, {"detail": exc.detail})
        return await _send(send, 200, payload)


def _json_bytes(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:  # a 422 echoing odd input (64-bit overflow, lone surrogates)
        return json.dumps(payload, default=str).encode()


async def _send_json(send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] = ()) -> int:
    return await _send(send, status, _json_bytes(payload), headers)


async def _send(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> int:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
    return status


def busy(exc: StoreBusy) -> JSONResponse:
    """The event store stayed locked by another writer: try again shortly (never a 500)."""
    return JSONResponse({"detail": f"{exc}; retry shortly"}, status_code=503, headers={"Retry-After": "1"})


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(service.batcher.run())]
        await loop.run_in_executor(None, service.load_initial)
        if settings.model_name and settings.poll_seconds > 0:
            tasks.append(asyncio.create_task(every(settings.poll_seconds, service.refresh_all, "champion poll")))
        if settings.catalog_poll_seconds > 0:
            tasks.append(asyncio.create_task(every(settings.catalog_poll_seconds, service.sync_catalog, "catalogue sync")))
        if settings.online_refresh_seconds > 0:
            tasks.append(asyncio.create_task(every(settings.online_refresh_seconds, service.refresh_online,
                                                   "online metrics")))
        yield
        for task in tasks:
            task.cancel()
        service.close()

    async def every(seconds: float, job, what: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.get_running_loop().run_in_executor(None, job)
            except Exception as exc:  # keep serving what is loaded
                log.warning("%s: %s", what, exc)

    app = FastAPI(title="RecForge recommendation service", version="1", lifespan=lifespan)
    app.state.service = service

    app.add_middleware(Guard, service=service)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler fails (500) writing back input it cannot encode, and repeats
        # any input whole.
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind == "application/json" or kind.endswith("+json")) and any(
                tuple(e["loc"]) == ("body",) and e["type"] != "missing" for e in exc.errors()):
            # FastAPI reads a body of another type as raw bytes and calls them "not a dictionary".
            detail = [{"type": "content_type", "loc": ["header", "content-type"],
                       "msg": f"the body must be JSON, sent with Content-Type: application/json (got {kind or 'none'!r})"}]
            return Response(_json_bytes({"detail": detail}), status_code=422, media_type="application/json")
        return Response(_json_bytes({"detail": _errors(exc.errors())}), status_code=422, media_type="application/json")

    def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        token = settings.admin_token
        if not token:
            raise HTTPException(403, "admin endpoints are disabled (no admin token configured)")
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "admin token required: Authorization: Bearer <token>")

    @app.post("/recommend")
    async def recommend(req: RecommendRequest) -> Response:
        """Top-k for a known user (history from the event store), an explicit recent history, or
        both; with neither, the most popular items, flagged `fallback: popularity`."""
        # Served by `Guard.recommend` (same model, same handler) before routing; this route
        # documents the endpoint in the OpenAPI schema and answers if the app runs unwrapped.
        return Response(await service.recommend(req), media_type="application/json")

    @app.post("/events", status_code=201, responses={422: {}, 503: {"description": "the store is locked; retry"}})
    async def events(event: Event) -> Any:
        """Record an interaction; it counts in the user's next recommendation at once. Values
        the training data would refuse (timestamp or weight out of its range) are a 422."""
        ts = event.timestamp if event.timestamp is not None else int(time.time())
        problems = service.rules.problems(ts, event.weight)
        if problems:
            raise HTTPException(422, problems)
        try:
            await service.add_event(event.user_id, event.item_id, ts, event.weight)
        except StoreBusy as exc:
            return busy(exc)
        bundle = service.bundle
        known = bundle is not None and (event.item_id in bundle.index or event.item_id in service.catalog.index)
        return {"stored": True, "timestamp": ts, "item_known": known}

    @app.post("/items", status_code=201, dependencies=[Depends(admin)],
              responses={503: {"description": "the store is locked; retry"}})
    async def items(item: NewItem) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, service.add_item, item)
        except StoreBusy as exc:
            return busy(exc)

    @app.post("/admin/reload", dependencies=[Depends(admin)])
    async def reload() -> dict[str, Any]:
        try:
            if settings.bundle is not None:
                await asyncio.get_running_loop().run_in_executor(None, service.reload_local)
                await asyncio.get_running_loop().run_in_executor(None, service.load_challenger)
                swapped = True
            else:
                swapped = await asyncio.get_running_loop().run_in_executor(None, service.refresh_all)
        except Exception as exc:
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
            return JSONResponse({"ready": False, "last_error": service.last_error}, status_code=503)
        return {"ready": True, "model_version": service.bundle.version, "items": len(service.bundle.item_ids),
                "retrieval": service.bundle.retrieval_kind,
                "index_build_s": (round(service.bundle.retriever.build_seconds, 1)
                                  if service.bundle.retriever is not None and service.bundle.retriever.index is not None
                                  else None),
                "added_items": len(service.catalog.ids), "last_error": service.last_error,
                "challenger": None if service.challenger is None else {
                    "mode": settings.challenger, "fraction": settings.challenger_fraction,
                    "model_version": service.challenger.version}}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(service.metrics).decode(), media_type="text/plain; version=0.0.4")

    return app
