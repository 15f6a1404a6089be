"""The seam between an adapter and the core: a protocol v1 connection with no network socket under it.

    vendor client ──► adapter (fish / elevenlabs / openai) ──v1 frames──► VirtualSocket ──► gateway Connection
                   ◄── vendor's shape, its container ◄──── v1 messages ◄──────┘                (sessions, turns,
                                                                                              pacing, store)

An adapter never re-implements sessions or turns: it translates the vendor's messages into protocol v1 client
messages, writes them into a ``VirtualSocket`` that the gateway's ordinary ``Connection`` reads as if a v1 client
had sent them, and translates the v1 server messages it reads back (``audio`` as PCM16 at the rate it asked for,
``words``, ``turn.done``, ``error``) into the vendor's shape. Both directions are bounded: a vendor client that
stops reading stops the connection's send loop, whose watchdog then drops it as it would a v1 slow reader.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgpack
from starlette.websockets import WebSocketDisconnect, WebSocketState

from realtime.auth import AuthError
from realtime.gateway import Gateway
from realtime.protocol import decode_server

__all__ = ["Bridge", "BridgeError", "VirtualSocket", "frame_ms_for", "session_param"]

QUEUE_MESSAGES = 64  # per direction: v1 frames waiting for the connection, server messages for the adapter
ADAPTER_LEAD_MS = 10_000  # these APIs send audio as it is made: the most protocol v1 allows ahead of real time
SESSION_HEADER = "x-shoal-session"  # extension: name the Shoal session (else a fresh one per socket or request)


class BridgeError(Exception):
    """A protocol v1 ``error`` that stopped what the adapter asked for (the adapter maps ``code`` to its shape)."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal


class _Lane:
    """A bounded FIFO with an end: ``put`` waits for room, ``get`` waits for an item or the end."""

    def __init__(self, limit: int) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.ended = False

    async def put(self, item: Any) -> bool:
        while len(self._items) >= self._limit and not self.ended:
            self._room.clear()
            await self._room.wait()
        if self.ended:
            return False
        self._items.append(item)
        self._ready.set()
        return True

    async def get(self) -> Any | None:
        """The next item; None once the lane has ended and is empty."""
        while not self._items:
            if self.ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        self._room.set()
        return self._items.popleft()

    def pending(self) -> int:
        return len(self._items)

    def end(self) -> None:
        self.ended = True
        self._ready.set()
        self._room.set()


class VirtualSocket:
    """Implements ``realtime.socket.Socket`` for a ``Connection``; the adapter holds the other end.

    ``headers`` and ``query_params`` are the vendor request's, with its credential put where the gateway looks for
    one (``authorization: Bearer``), so the gateway's own check applies to adapters unchanged."""

    def __init__(self, headers: Mapping[str, str], query_params: Mapping[str, str], limit: int = QUEUE_MESSAGES,
                 client: Any = None) -> None:
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.query_params = dict(query_params)
        # no liveness probe (blocked sends are timed instead); the vendor client's address, for per-address quotas
        self.scope: dict[str, Any] = {"type": "websocket", "client": tuple(client) if client else None}
        self.application_state = WebSocketState.CONNECTING
        self._in = _Lane(limit)  # v1 client frames, adapter -> connection
        self._out = _Lane(limit)  # v1 server messages, connection -> adapter
        self.close_code: int | None = None

    # ------------------------------------------------------------------ the connection's side

    async def accept(self) -> None:
        self.application_state = WebSocketState.CONNECTED

    async def receive(self) -> Mapping[str, Any]:
        frame = await self._in.get()
        if frame is None:
            return {"type": "websocket.disconnect", "code": 1000}
        return {"type": "websocket.receive", "bytes": frame}

    async def send_bytes(self, data: bytes) -> None:
        await self._deliver(data)

    async def send_text(self, data: str) -> None:
        await self._deliver(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if self.close_code is None:
            self.close_code = code
        self.application_state = WebSocketState.DISCONNECTED
        self._out.end()
        self._in.end()

    async def _deliver(self, frame: bytes | str) -> None:
        if self.application_state is WebSocketState.DISCONNECTED or not await self._out.put(decode_server(frame)):
            raise WebSocketDisconnect(1006)  # the adapter's client left: the connection winds down

    # ------------------------------------------------------------------ the adapter's side

    async def send(self, msg: Mapping[str, Any]) -> None:
        """One v1 client message (a map with ``type``), as a msgpack frame."""
        await self._in.put(msgpack.packb(dict(msg), use_bin_type=True))

    async def recv(self) -> dict[str, Any] | None:
        """The next v1 server message; None once the connection has closed the socket."""
        return await self._out.get()

    def pending(self) -> int:
        """Server messages waiting (an adapter batches the audio packets already here)."""
        return self._out.pending()

    def disconnect(self) -> None:
        """The vendor client is done (or gone): the connection sees a disconnect after the frames already sent."""
        self._in.end()


class Bridge:
    """One protocol v1 connection driven by an adapter: a ``VirtualSocket`` and the gateway's ``Connection`` on it."""

    def __init__(self, gateway: Gateway, headers: Mapping[str, str], query_params: Mapping[str, str],
                 client: Any = None) -> None:
        self.gateway = gateway
        self.socket = VirtualSocket(headers, query_params, client=client)
        self.session: str | None = None
        self.ready: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def authorized(self) -> bool:
        """Does the vendor request carry a credential the gateway takes (a tenant's key or a token)?"""
        try:
            self.gateway.principal(self.socket)
        except AuthError:
            return False
        return True

    async def start(self, **fields: Any) -> dict[str, Any]:
        """Run the connection and send ``session.start``; returns ``session.ready`` or raises ``BridgeError``."""
        if self._task is None:
            self._task = asyncio.create_task(self.gateway.serve(self.socket), name="adapter-connection")
        await self.send(type="session.start", **{k: v for k, v in fields.items() if v is not None})
        ready = await self.expect("session.ready")
        self.session, self.ready = ready["session"], ready
        return ready

    async def send(self, **msg: Any) -> None:
        await self.socket.send({k: v for k, v in msg.items() if v is not None})

    async def recv(self) -> dict[str, Any] | None:
        return await self.socket.recv()

    async def expect(self, mtype: str) -> dict[str, Any]:
        """Read until a message of ``mtype`` (between turns nothing else comes but ``pong``); an ``error`` or a
        closed connection raises ``BridgeError``."""
        while True:
            msg = await self.recv()
            if msg is None:
                raise BridgeError("internal", "the session ended", fatal=True)
            if msg["type"] == mtype:
                return msg
            if msg["type"] == "error":
                raise BridgeError(msg["code"], msg["message"], bool(msg.get("fatal")))

    async def close(self, wait_s: float = 5.0) -> None:
        """The client is done: let the connection store what it has and release the session (bounded wait)."""
        self.socket.disconnect()
        if self._task is not None and wait_s > 0:
            await asyncio.wait([self._task], timeout=wait_s)

    def abandon(self) -> None:
        """The client left mid-request (cancelled handler): the connection winds down on its own."""
        self.socket.disconnect()


def frame_ms_for(sample_rate: int) -> int:
    """The shortest PCM frame of at least 20 ms (a multiple of 10) holding a whole number of samples at this rate."""
    return max(20, math.lcm(1000 // math.gcd(sample_rate, 1000), 10))


def session_param(headers: Mapping[str, str], query_params: Mapping[str, str], body: Any = None) -> str | None:
    """The extension that names a Shoal session: ``session`` in the body or query, or the ``x-shoal-session`` header."""
    if isinstance(body, Mapping) and isinstance(body.get("session"), str):
        return str(body["session"])
    return query_params.get("session") or headers.get(SESSION_HEADER) or None
