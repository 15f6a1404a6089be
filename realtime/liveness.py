"""Is the client reading? Measured by the WebSocket keepalive, not by how full the kernel's buffers are.

uvicorn pings every client (``ws_ping_interval``). A ping frame queues behind everything sent before it, and the
client answers it only once it has read that far, so "the current ping has waited N seconds for its pong" means
"the client has taken no frame for about N seconds" — whatever the socket buffers hold, whatever the bitrate.

The ASGI interface has no access to pings, so ``capture_protocol`` (an ASGI middleware placed first) records
uvicorn's protocol object in the scope, and ``ReadProbe`` reads its keepalive state. It needs uvicorn's
``websockets-sansio`` implementation (the default with websockets installed); elsewhere (another server, the
test client) ``ReadProbe.of`` returns None and the gateway falls back to timing blocked sends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

SCOPE_KEY = "shoal.protocol"


class capture_protocol:  # noqa: N801 - an ASGI middleware, named like a function on purpose
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[SCOPE_KEY] = getattr(send, "__self__", None)
        await self.app(scope, receive, send)


class ReadProbe:
    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()

    @classmethod
    def of(cls, scope: Scope) -> ReadProbe | None:
        protocol = scope.get(SCOPE_KEY)
        if protocol is None or not all(
            hasattr(protocol, name) for name in ("pending_ping_payload", "ping_sent_at", "transport", "conn", "close_sent", "close_timer")
        ):
            return None
        return cls(protocol)

    def unanswered_s(self) -> float:
        """How long the ping in flight has waited for its pong (0 when none is in flight)."""
        if self._protocol.pending_ping_payload is None:
            return 0.0
        return max(0.0, self._loop.time() - float(self._protocol.ping_sent_at))

    def send_last(self, frame: bytes | str, code: int, reason: str, grace_s: float = 2.0) -> None:
        """Queue ``frame`` and a close frame behind everything already sent, past the flow control that holds a
        normal send while the client does not read (the send loop is blocked there). The socket stays open and
        read (closing it with the client's unread pongs in it would reset the connection and discard what it has
        not taken yet) until the client echoes the close, or ``grace_s`` passes and it is aborted."""
        p = self._protocol
        transport = p.transport
        if transport is None or transport.is_closing() or p.close_sent:
            return
        if isinstance(frame, bytes):
            p.conn.send_binary(frame)
        else:
            p.conn.send_text(frame.encode())
        p.conn.send_close(code, reason)
        transport.write(b"".join(p.conn.data_to_send()))
        p.close_sent = True  # uvicorn's own bookkeeping of a close sent through ASGI, which would wait here
        if p.close_timer is None:
            p.close_timer = self._loop.call_later(grace_s, transport.abort)
