"""What a gateway ``Connection`` needs of its socket: the few members of Starlette's ``WebSocket`` it uses.

Two things implement it: Starlette's ``WebSocket`` itself (protocol v1 at ``/v1/realtime``), and
``realtime.adapters.bridge.VirtualSocket``, through which an adapter for another vendor's API drives the very same
``Connection`` (sessions, turns, pacing, barge-in, persistence), speaking protocol v1 frames on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from starlette.websockets import WebSocketState


class Socket(Protocol):
    headers: Mapping[str, str]  # lower-case names (authorization)
    query_params: Mapping[str, str]  # (token)
    scope: Mapping[str, Any]  # read for the liveness probe; a socket without one is timed by its blocked sends
    application_state: WebSocketState

    async def accept(self) -> None: ...

    async def receive(self) -> Mapping[str, Any]:
        """An ASGI message: ``websocket.receive`` with ``bytes`` or ``text``, or ``websocket.disconnect``."""
        ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...
