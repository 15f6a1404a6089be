"""What every adapter shares: reading one turn's audio from the bridge, encoding it off the loop, inline tags."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from realtime.adapters.bridge import Bridge, BridgeError
from realtime.adapters.containers import ContainerEncoder

log = logging.getLogger("shoal.adapters")

__all__ = ["TurnAudio", "encode", "instruction_tag", "speed_tag", "stream_body"]

SLOW_BELOW = 0.85  # speed factors that become the built-in [slow] / [fast] instructions
FAST_ABOVE = 1.2
MAX_INSTRUCTION_CHARS = 500
_SPACES = re.compile(r"\s+")


def speed_tag(speed: float | None) -> str:
    """A vendor's speaking-rate factor as an inline instruction: ``[slow]``, ``[fast]`` or nothing. The engines take
    pace as an instruction, not a number, so this is approximate: 0.85-1.2 is the normal pace."""
    if speed is None:
        return ""
    return "[slow] " if speed < SLOW_BELOW else "[fast] " if speed > FAST_ABOVE else ""


def instruction_tag(text: str | None) -> str:
    """Free-form delivery instructions (OpenAI's ``instructions``) as one inline ``[...]`` instruction."""
    if not text:
        return ""
    clean = _SPACES.sub(" ", text.replace("[", "(").replace("]", ")")).strip()[:MAX_INSTRUCTION_CHARS]
    return f"[{clean}] " if clean else ""


async def encode(bridge: Bridge, encoder: ContainerEncoder, fn: Callable[..., bytes], *args: Any) -> bytes:
    """Run ``encoder.push`` / ``close`` on the gateway's codec pool (on the loop when there is no codec)."""
    if encoder.cheap:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(bridge.gateway.codec_pool, fn, *args)


class TurnAudio:
    """The PCM16 of one turn of the default context, in batches, from a bridge's protocol v1 messages.

    ``next()`` returns the audio packets already waiting, joined (at least one), or None once ``turn.done`` came
    (then ``done`` holds it). A fatal ``error``, or the connection closing, raises ``BridgeError``; other errors
    are logged and the turn goes on, as for a v1 client. ``words`` messages go to ``on_words`` if given."""

    def __init__(self, bridge: Bridge, on_words: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.bridge = bridge
        self.done: dict[str, Any] | None = None
        self.audio_ms = 0.0
        self.last_error: str | None = None
        self._on_words = on_words

    async def next(self) -> bytes | None:
        chunks: list[bytes] = []
        while self.done is None:
            if chunks and not self.bridge.socket.pending():
                break
            msg = await self.bridge.recv()
            if msg is None:
                raise BridgeError("internal", "the session ended", fatal=True)
            mtype = msg["type"]
            if mtype == "audio":
                chunks.append(msg["data"])
            elif mtype == "turn.done":
                self.done = msg
            elif mtype == "words" and self._on_words is not None:
                self._on_words(msg)
            elif mtype == "error":
                if msg.get("fatal"):
                    raise BridgeError(msg["code"], msg["message"], fatal=True)
                self.last_error = f"{msg['code']}: {msg['message']}"
                log.info("session %s: %s", self.bridge.session, self.last_error)
        return b"".join(chunks) if chunks else None


async def stream_body(bridge: Bridge, turn: TurnAudio, encoder: ContainerEncoder, first: bytes | None,
                      wrap: Callable[[bytes], bytes] | None = None,
                      trailer: Callable[[], bytes] | None = None) -> AsyncIterator[bytes]:
    """An HTTP response body: the turn's audio in ``encoder``'s format as it comes (each piece through ``wrap``),
    then ``trailer()``. The status is already sent, so an error mid-turn just ends the body. Once the body is
    done the connection is closed and waited for (the turn stored, the session released); a client that leaves
    early leaves the connection to wind down by itself."""
    finished = False
    try:
        pcm = first
        while pcm is not None:
            data = await encode(bridge, encoder, encoder.push, pcm)
            if data:
                yield wrap(data) if wrap else data
            try:
                pcm = await turn.next()
            except BridgeError:
                break
        tail = await encode(bridge, encoder, encoder.close)
        if tail:
            yield wrap(tail) if wrap else tail
        if trailer is not None:
            yield trailer()
        finished = True
    finally:
        if finished:
            await bridge.close()
        else:
            bridge.abandon()
