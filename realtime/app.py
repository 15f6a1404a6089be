"""The Starlette application: routes, and the lifespan that owns the engine and the store connection."""

from __future__ import annotations

import contextlib
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
from realtime.adapters import routes as adapter_routes
from realtime.config import ServerConfig
from realtime.gateway import Gateway
from realtime.liveness import capture_protocol
from realtime.metrics import CONTENT_TYPE_LATEST, Metrics
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
    metrics = Metrics()
    metrics.add_engine(lambda: engine_stats(engine))
    gateway = Gateway(config, engine, store, metrics, aligner=aligner)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.connect()
        await engine.start()
        await gateway.start_aligner()
        try:
            yield
        finally:
            await gateway.shutdown(config.shutdown_timeout_s)
            await gateway.close_aligner()
            await engine.aclose()
            await store.aclose()

    async def realtime(ws: WebSocket) -> None:
        await gateway.serve(ws)

    async def healthz(request: Request) -> Response:
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
        body: dict[str, object] = {"status": "ok" if not problems else "unavailable", "engine": engine.info.name, **problems}
        if redis is not None:
            body["redis"] = redis  # state, restarts, last exit and restart: an outage and its recovery stay visible
        if isinstance(engine, PoolEngine):  # the live workers, as the pool last read them from the registry
            body["workers"] = [
                {"id": m.id, "address": f"{m.host}:{m.port}", "load": m.load, "health": m.health}
                for m in engine.members
            ]
        return JSONResponse(body, status_code=200 if not problems else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def no_web(request: Request) -> Response:
        return PlainTextResponse("Shoal: protocol v1 at /v1/realtime, health at /healthz, metrics at /metrics\n")

    routes: list[Route | WebSocketRoute | Mount] = [
        WebSocketRoute("/v1/realtime", realtime),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        *adapter_routes(),  # OpenAI, Fish Audio and ElevenLabs front doors onto the same sessions (issue 14)
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
