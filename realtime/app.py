"""The Starlette application: routes, and the lifespan that owns the engine and the store connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from engine.alignment import Aligner
from engine.base import Synthesizer, engine_stats
from engine.pool import PoolEngine
from realtime.auth import SCOPES, AuthError, Principal, credential
from realtime.adapters import routes as adapter_routes
from realtime.config import ServerConfig
from realtime.gateway import Gateway
from realtime.liveness import capture_protocol
from realtime.metrics import CONTENT_TYPE_LATEST, Metrics
from realtime.twilio import TwilioCall
from sessions.store import SessionStore, StoreError

log = logging.getLogger("shoal.app")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(
    config: ServerConfig,
    engine: Synthesizer,
    store: SessionStore,
    store_status: Callable[[], Mapping[str, Any]] | None = None,
    aligner: Aligner | None = None,
) -> Starlette:
    """An app serving protocol v1 at /v1/realtime. Engine, aligner and store are started and closed by its lifespan.
    ``store_status``: the embedded Redis's supervisor state, shown by /healthz (outage, restarts). ``aligner``:
    estimates word timing when the engine reports none (S2 Pro)."""
    metrics = Metrics(config.metrics_dir)
    metrics.add_engine(lambda: engine_stats(engine), shared=isinstance(engine, PoolEngine))
    gateway = Gateway(config, engine, store, metrics, aligner=aligner)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.connect()
        await engine.start()
        await gateway.start_aligner()
        sampler = asyncio.create_task(_sample_metrics(metrics)) if config.metrics_dir is not None else None
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
            await gateway.shutdown(config.shutdown_timeout_s)
            await gateway.close_aligner()
            await engine.aclose()
            await store.aclose()

    async def realtime(ws: WebSocket) -> None:
        await gateway.serve(ws)

    async def twilio(ws: WebSocket) -> None:
        await TwilioCall(gateway, ws).run()

    def operator(request: Request) -> Principal | None:
        """The request's principal if it may see internals (an API key; anyone while auth is off), else None."""
        try:
            who = config.keys.authenticate(credential(request.headers, request.query_params))
        except AuthError:
            return None
        return who if who.via in ("key", "open") else None

    async def healthz(request: Request) -> Response:
        """Status for anyone; the reasons (error text, Redis state, workers' addresses) only for an operator."""
        problems: dict[str, str] = {}
        try:
            await store.ping()
        except StoreError as exc:
            problems["store"] = str(exc)
        redis = dict(store_status()) if store_status is not None else None
        if redis is not None and redis.get("state") != "up" and "store" not in problems:
            problems["store"] = f"embedded Redis is {redis.get('state')}"
        reason = engine.health()
        if reason is not None:
            problems["engine"] = reason
        if not gateway.accepting:
            problems["server"] = "shutting down"
        status = 200 if not problems else 503
        if operator(request) is None:
            public = {name: "unavailable" for name in problems}
            return JSONResponse({"status": "ok" if not problems else "unavailable", **public}, status_code=status)
        body: dict[str, object] = {"status": "ok" if not problems else "unavailable", "engine": engine.info.name, **problems}
        if redis is not None:
            body["redis"] = redis  # state, restarts, last exit and restart: an outage and its recovery stay visible
        if isinstance(engine, PoolEngine):  # the live workers, as the pool last read them from the registry
            body["workers"] = [
                {"id": m.id, "address": f"{m.host}:{m.port}", "load": m.load, "health": m.health}
                for m in engine.members
            ]
        return JSONResponse(body, status_code=status)

    async def metrics_endpoint(request: Request) -> Response:
        if operator(request) is None:
            return _http_error(401, "unauthorized", "/metrics needs an API key (Authorization: Bearer KEY)")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def tokens(request: Request) -> Response:
        """``POST /v1/tokens`` with an API key: a short-lived token for a browser or device (see realtime.auth)."""
        if not config.keys.enabled:
            return _http_error(400, "bad_message", "this server runs without API keys: connect without a token")
        try:
            who = config.keys.authenticate(credential(request.headers, {}))
        except AuthError as exc:
            return _http_error(401, "unauthorized", str(exc))
        if who.via != "key":
            return _http_error(401, "unauthorized", "tokens are made with an API key, not with another token")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _TOKEN_REQUEST_BYTES:
                return _http_error(413, "too_large", f"the request body exceeds {_TOKEN_REQUEST_BYTES} bytes")
        try:
            asked = json.loads(body) if body.strip() else {}
            if not isinstance(asked, dict):
                raise ValueError("the body must be a JSON object")
            scopes = asked.get("scopes", list(SCOPES))
            if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
                raise ValueError("scopes must be a list of strings")
            ttl_s = asked.get("ttl_s", 600)
            if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)):
                raise ValueError("ttl_s must be a number")
            session = asked.get("session")
            if session is not None and not isinstance(session, str):
                raise ValueError("session must be a string")
            token, expires = config.keys.issue(who.tenant, ttl_s=ttl_s, session=session, scopes=scopes)
        except ValueError as exc:  # json's errors are ValueErrors too
            return _http_error(400, "bad_message", str(exc))
        return JSONResponse({"token": token, "expires_at": expires, "tenant": who.tenant, "session": session,
                             "scopes": sorted(set(scopes))})

    async def no_web(request: Request) -> Response:
        return PlainTextResponse("Shoal: protocol v1 at /v1/realtime, health at /healthz, metrics at /metrics\n")

    routes: list[Route | WebSocketRoute | Mount] = [
        WebSocketRoute("/v1/realtime", realtime),
        WebSocketRoute("/v1/twilio", twilio),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        Route("/v1/tokens", tokens, methods=["POST"]),
        *adapter_routes(),  # OpenAI, Fish Audio and ElevenLabs front doors onto the same sessions
    ]
    if (WEB_DIR / "index.html").is_file():
        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))
    else:
        routes.append(Route("/", no_web))
    # first in the stack, so it sees uvicorn's own send (the slow-reader watchdog reads its keepalive state)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(capture_protocol)])
    app.state.gateway = gateway
    app.state.metrics = metrics
    return app


_TOKEN_REQUEST_BYTES = 16 << 10


async def _sample_metrics(metrics: Metrics, period_s: float = 1.0) -> None:
    """One of several gateway processes: write this process's scrape-time values for the others' scrapes."""
    while True:
        try:
            metrics.sample()
        except Exception:  # a metric must never take the gateway down; say it once a period at most
            log.exception("sampling the metrics failed")
        await asyncio.sleep(period_s)


def _http_error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
