"""Guards of the listening socket against clients that hold connections without speaking HTTP.

- ``handshake_guarded(timeout_s)``: uvicorn's h11 protocol with a deadline on the request head. uvicorn times out
  idle keep-alive connections, but not one that never finishes its request line and headers: 300 silent or
  drip-fed sockets stayed open for good. Here each must be in within ``timeout_s`` of connecting (or of the last
  response on a kept-alive connection), or the connection is closed.
- ``GuardedEventLoop``: asyncio's accept loop, fixed for running out of file descriptors. On EMFILE, CPython's
  ``_accept_connection`` logs a traceback and schedules a retry, then goes on trying up to ``backlog`` (2048 under
  uvicorn) more times in the same round, each failing, logging and scheduling again: 150 MB of tracebacks in
  25 s, and the retries multiply. Here the first failure ends the round, so asyncio's own back-off (stop
  reading the listening socket, try again in a second) is all that happens.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["GuardedEventLoop", "handshake_guarded"]


def handshake_guarded(timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class that closes a connection whose request head is not all in within ``timeout_s``."""

    class HandshakeGuardedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # a kept-alive connection has as long again for its next request

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return  # closed, or upgraded to a WebSocket (the gateway's own timeouts hold from there)
            if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) a request head
                transport.close()

    return HandshakeGuardedH11


class _OneFailurePerRound:
    """The listening socket as one round of asyncio's accept loop sees it: after the first accept that fails for
    want of a resource, the socket reads as empty, which ends the round."""

    __slots__ = ("sock", "failed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failed:
            raise BlockingIOError(errno.EAGAIN, "out of resources: stopped this round")
        try:
            return self.sock.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.failed = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class GuardedEventLoop(asyncio.SelectorEventLoop):
    def _accept_connection(self, protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(sock, _OneFailurePerRound):  # asyncio's retry passes back what it was given
            sock = sock.sock
        super()._accept_connection(protocol_factory, _OneFailurePerRound(sock), *args, **kwargs)  # type: ignore[misc]
