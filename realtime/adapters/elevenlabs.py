"""ElevenLabs' input-streaming WebSockets onto a Shoal session: ``/v1/text-to-speech/{voice_id}/stream-input`` and
``/v1/text-to-speech/{voice_id}/multi-stream-input``.

stream-input: the initial message (``text`` " ", ``voice_settings``, ``generation_config``, ``xi-api-key``), then
text chunks (``flush`` cuts a segment now; ``try_trigger_generation`` and the chunk schedule are left to Shoal's
segmenter, which cuts at sentence ends), then an empty ``text``: the turn ends, and after its last audio comes
``{"isFinal": true}`` and the socket closes. Each audio message is ``{"audio": base64, "alignment",
"normalizedAlignment"}``: the characters whose sound starts within the message's audio, with start times and
durations in ms relative to it, derived from Shoal's word timing (a word's span shared among its letters, the gap
before the next word given to the space). ``output_format`` (query): ``pcm_{8000,16000,22050,24000,44100,48000}``,
``ulaw_8000``, ``mp3_{rate}_{kbps}``, ``opus_48000_{kbps}`` (Ogg/Opus). ``voice_id`` is a Shoal voice id
(``default``: the engine's own voice); ``voice_settings.speed`` becomes ``[slow]`` / ``[fast]``.

multi-stream-input: the same per ``context_id`` (a protocol v1 context each: they synthesize side by side), with
``contextId`` on every answer; ``flush``, ``close_context`` (what was flushed plays on, then ``isFinal``; with text
still unflushed the context stops at once, as a v1 ``cancel``) and ``close_socket``. An empty ``text`` only keeps
a context alive there.

Errors: ``{"message", "error"}`` (``error``: the protocol v1 code); a fatal one closes the socket (1008, or 1011).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from realtime.adapters.bridge import ADAPTER_LEAD_MS, Bridge, BridgeError, frame_ms_for, session_param
from realtime.adapters.common import encode, speed_tag
from realtime.adapters.containers import MP3_RATES, OPUS_RATES, ContainerEncoder
from realtime.gateway import Gateway


__all__ = ["characters", "multi_stream_input", "parse_output_format", "stream_input"]

DEFAULT_FORMAT = "mp3_44100_128"
DEFAULT_VOICE = "default"  # the voice id that names the engine's own voice
PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_FORMAT = re.compile(r"(pcm|ulaw|mp3|opus)_(\d+)(?:_(\d+))?")
_CONTEXT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
DEFAULT_CONTEXT = "default"


class ElevenLabsError(Exception):
    def __init__(self, message: str, error: str = "bad_message") -> None:
        super().__init__(message)
        self.message, self.error = message, error


def parse_output_format(name: str) -> tuple[str, int, int | None]:
    """``pcm_24000`` -> (container format, sample rate, bitrate in bits/s or None)."""
    m = _FORMAT.fullmatch(name)
    if m is None:
        raise ElevenLabsError(f"unsupported output_format {name!r}: pcm_<rate>, ulaw_8000, mp3_<rate>_<kbps> or "
                              "opus_48000_<kbps>")
    fmt, rate, kbps = m.group(1), int(m.group(2)), m.group(3)
    allowed = {"pcm": PCM_RATES, "ulaw": (8000,), "mp3": MP3_RATES, "opus": OPUS_RATES}[fmt]
    if rate not in allowed:
        raise ElevenLabsError(f"output_format {name!r}: {fmt} sample rates are {', '.join(map(str, allowed))}")
    return fmt, rate, int(kbps) * 1000 if kbps and fmt in ("mp3", "opus") else None


def characters(words: list[dict[str, Any]], after_ms: float | None = None) -> list[tuple[str, float, float]]:
    """A segment's word timing as (character, start_ms, duration_ms) on the turn's clock: each word's span shared
    evenly among its characters, the pause before a word given to the space before it. ``after_ms``: where the
    turn's previous segment's last word ended (then this segment starts with a space, as the text does)."""
    out: list[tuple[str, float, float]] = []
    end = after_ms
    for w in words:
        start, stop, text = float(w["start_ms"]), float(w["end_ms"]), str(w["text"])
        if end is not None:
            out.append((" ", end, max(0.0, start - end)))
        share = (stop - start) / max(1, len(text))
        out.extend((ch, start + i * share, share) for i, ch in enumerate(text))
        end = stop
    return out


@dataclass
class _Context:
    """One ElevenLabs context (stream-input has one): its turn's encoder, alignment and text state."""

    name: str  # the client's context id
    v1: str | None  # the protocol v1 context it maps to (None: the default one)
    tag: str = ""  # [slow] / [fast] from voice_settings.speed, put before the first text of each turn
    in_turn: bool = False  # text was sent and its turn.done has not come
    unflushed: bool = False  # text since the last flush
    closing: bool = False
    encoder: ContainerEncoder | None = None
    chars: deque[tuple[str, float, float]] = field(default_factory=deque)
    last_word_ms: float | None = None  # where the turn's last word so far ends
    start_ms: float | None = None  # turn clock of the first audio not yet in a message
    pushed_ms: float = 0.0  # turn clock of the end of the audio given to the encoder

    def add_words(self, words: list[dict[str, Any]]) -> None:
        self.chars.extend(characters(words, self.last_word_ms))
        if words:
            self.last_word_ms = float(words[-1]["end_ms"])

    def take_alignment(self, until_ms: float) -> dict[str, list[Any]] | None:
        """The characters whose sound starts before ``until_ms``, relative to this message's audio start."""
        origin = self.start_ms if self.start_ms is not None else self.pushed_ms
        chars: list[str] = []
        starts: list[int] = []
        durations: list[int] = []
        while self.chars and self.chars[0][1] < until_ms:
            ch, start, dur = self.chars.popleft()
            chars.append(ch)
            starts.append(max(0, round(start - origin)))
            durations.append(max(0, round(dur)))
        if not chars:
            return None
        return {"chars": chars, "charStartTimesMs": starts, "charDurationsMs": durations}


class _Socket:
    """One client socket: its messages to protocol v1 (the receive loop) and v1's answers back (``_pump``)."""

    def __init__(self, ws: WebSocket, multi: bool) -> None:
        self.ws = ws
        self.multi = multi
        self.gateway: Gateway = ws.app.state.gateway
        self.contexts: dict[str, _Context] = {}
        self.by_v1: dict[str | None, _Context] = {}
        self.fmt, self.rate, self.bitrate = DEFAULT_FORMAT, 0, None
        self.tag = ""
        self.bridge: Bridge | None = None
        self.closing = False  # close_socket: close once every context is final
        self.ws_closed = False

    async def run(self) -> None:
        await self.ws.accept()
        pump: asyncio.Task[None] | None = None
        try:
            try:
                first = await self._receive()  # errors are told after it, so a client sending it hears them
                if first is None:
                    return
                self.fmt, self.rate, self.bitrate = parse_output_format(
                    self.ws.query_params.get("output_format") or DEFAULT_FORMAT)
                await self._open(first)
            except ElevenLabsError as exc:
                await self._fail(exc.message, exc.error, fatal=True)
                return
            except BridgeError as exc:
                await self._fail(exc.message, exc.code, fatal=True)
                return
            pump = asyncio.create_task(self._pump(), name="elevenlabs-pump")
            await self._on_message(first, initial=True)
            while not self.ws_closed:
                msg = await self._receive()
                if msg is None:
                    break
                await self._on_message(msg)
                if pump.done():
                    break
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
            if self.bridge is not None:
                await self.bridge.close()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.ws.close()

    # ------------------------------------------------------------------ client -> v1

    async def _receive(self) -> dict[str, Any] | None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            raw = message.get("text")
            if raw is None:
                raw = (message.get("bytes") or b"").decode("utf-8", "replace")
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                return obj
            await self._fail("a message must be a JSON object", "bad_message")

    async def _open(self, first: dict[str, Any]) -> None:
        """Authenticate (header, or the first message's ``xi-api-key`` / ``authorization``) and start the session."""
        headers = dict(self.ws.headers)
        key = first.get("xi-api-key") or headers.get("xi-api-key")
        if isinstance(key, str) and key:
            headers["authorization"] = f"Bearer {key}"
        elif isinstance(first.get("authorization"), str):
            headers["authorization"] = first["authorization"]
        bridge = Bridge(self.gateway, headers, self.ws.query_params, self.ws.client)
        if not bridge.authorized():
            raise ElevenLabsError("invalid API key (xi-api-key)", "unauthorized")
        self.tag = self._speed(first)
        voice = self.ws.path_params["voice_id"]
        output = {"codec": "pcm16", "sample_rate": self.rate, "frame_ms": frame_ms_for(self.rate),
                  "lead_ms": ADAPTER_LEAD_MS, "timestamps": "words"}
        self.bridge = bridge
        await bridge.start(session=session_param(self.ws.headers, self.ws.query_params),
                           speakers=[{"speaker": 0, "voice": None if voice == DEFAULT_VOICE else voice}],
                           output=output)

    @staticmethod
    def _speed(msg: dict[str, Any]) -> str:
        settings = msg.get("voice_settings")
        speed = settings.get("speed") if isinstance(settings, dict) else None
        return speed_tag(float(speed)) if isinstance(speed, (int, float)) and not isinstance(speed, bool) else ""

    def _context(self, msg: dict[str, Any]) -> _Context | None:
        name = (msg.get("context_id") or msg.get("contextId") or DEFAULT_CONTEXT) if self.multi else ""
        if not isinstance(name, str):
            return None
        ctx = self.contexts.get(name)
        if ctx is None:
            v1: str | None = None  # stream-input: the default context
            if self.multi:
                v1 = name if _CONTEXT_ID.fullmatch(name) else "c-" + hashlib.sha256(name.encode()).hexdigest()[:20]
            ctx = self.contexts[name] = _Context(name, v1, self._speed(msg) or self.tag)
            self.by_v1[v1] = ctx
        return ctx

    async def _on_message(self, msg: dict[str, Any], initial: bool = False) -> None:
        assert self.bridge is not None
        if self.multi and msg.get("close_socket"):
            self.closing = True
            for ctx in self.contexts.values():
                await self._close_context(ctx)
            await self._maybe_close()
            return
        ctx = self._context(msg)
        if ctx is None:
            await self._fail("context_id must be a string", "bad_message")
            return
        text = msg.get("text")
        if text is not None and not isinstance(text, str):
            await self._fail("text must be a string", "bad_message")
            return
        if self.multi and msg.get("close_context"):
            await self._close_context(ctx)
            return
        if text == "" and not self.multi and not initial:  # stream-input: the end of the text
            await self._end(ctx)
            return
        if text and (text.strip() or ctx.in_turn):  # the initial " " only opens the stream
            if not ctx.in_turn:
                text = ctx.tag + text
                ctx.in_turn = True
            await self.bridge.send(type="text", text=text, context=ctx.v1)
            ctx.unflushed = True
        if msg.get("flush") and ctx.in_turn:
            await self.bridge.send(type="flush", context=ctx.v1)
            ctx.unflushed = False

    async def _end(self, ctx: _Context) -> None:
        assert self.bridge is not None
        ctx.closing = True
        if ctx.in_turn:
            await self.bridge.send(type="turn.end", context=ctx.v1)
        else:
            await self._final(ctx)  # nothing was said: nothing to wait for

    async def _close_context(self, ctx: _Context) -> None:
        """What was flushed plays on (a turn.end); text not yet flushed stops the context now (a cancel)."""
        assert self.bridge is not None
        if ctx.closing:
            return
        if ctx.in_turn and ctx.unflushed:
            ctx.closing = True
            await self.bridge.send(type="cancel", context=ctx.v1)
        else:
            await self._end(ctx)

    # ------------------------------------------------------------------ v1 -> client

    async def _pump(self) -> None:
        assert self.bridge is not None
        batches: dict[str | None, list[dict[str, Any]]] = {}
        try:
            while True:
                if batches and not self.bridge.socket.pending():
                    for v1, batch in list(batches.items()):
                        await self._audio(v1, batch)
                    batches.clear()
                msg = await self.bridge.recv()
                if msg is None:
                    break
                v1 = msg.get("context")
                if msg["type"] == "audio":
                    batches.setdefault(v1, []).append(msg)
                    continue
                if v1 in batches:  # each context's order: its audio before what follows it
                    await self._audio(v1, batches.pop(v1))
                ctx = self.by_v1.get(v1)
                if msg["type"] == "words" and ctx is not None:
                    ctx.add_words(list(msg["words"]))
                elif msg["type"] == "turn.done" and ctx is not None:
                    await self._final(ctx)
                elif msg["type"] == "error":
                    await self._fail(msg["message"], msg["code"], bool(msg.get("fatal")))
                    if msg.get("fatal"):
                        break
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client left

    async def _audio(self, v1: str | None, packets: list[dict[str, Any]], ctx: _Context | None = None) -> None:
        """One audio message of a context (or, with ``ctx`` and no packets, its encoder's tail)."""
        assert self.bridge is not None
        tail = ctx is not None
        ctx = ctx or self.by_v1.get(v1)
        if ctx is None:
            return  # a context the client closed and forgot
        if ctx.encoder is None:
            ctx.encoder = ContainerEncoder(self.fmt, self.rate, self.bitrate)
        encoder = ctx.encoder
        if packets and ctx.start_ms is None:
            ctx.start_ms = float(packets[0]["ms"])
        if tail:
            data = await encode(self.bridge, encoder, encoder.close)
            until = float("inf")
        else:
            pcm = b"".join(p["data"] for p in packets)
            data = await encode(self.bridge, encoder, encoder.push, pcm)
            until = ctx.pushed_ms = float(packets[-1]["ms"]) + len(packets[-1]["data"]) / 2 / self.rate * 1000.0
        if not data:
            return  # the codec holds it: its characters go with the bytes that carry it
        alignment = ctx.take_alignment(until)
        out: dict[str, Any] = {"audio": base64.b64encode(data).decode("ascii"), "isFinal": None,
                               "normalizedAlignment": alignment, "alignment": alignment}
        if self.multi:
            out["contextId"] = ctx.name
        ctx.start_ms = None
        await self._send(out)

    async def _final(self, ctx: _Context) -> None:
        if ctx.encoder is not None:
            await self._audio(ctx.v1, [], ctx)
        ctx.encoder, ctx.in_turn, ctx.unflushed, ctx.start_ms, ctx.pushed_ms = None, False, False, None, 0.0
        ctx.chars.clear()
        ctx.last_word_ms = None
        out: dict[str, Any] = {"isFinal": True}
        if self.multi:
            out["contextId"] = ctx.name
        await self._send(out)
        if not self.multi:
            self.ws_closed = True
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.ws.close(1000)
            return
        if ctx.closing:
            ctx.closing = False
            self.contexts.pop(ctx.name, None)
            self.by_v1.pop(ctx.v1, None)
        await self._maybe_close()

    async def _maybe_close(self) -> None:
        if self.closing and not any(c.in_turn for c in self.contexts.values()):
            self.ws_closed = True
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.ws.close(1000)

    async def _fail(self, message: str, error: str, fatal: bool = False) -> None:
        await self._send({"message": message, "error": error})
        if fatal:
            self.ws_closed = True
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.ws.close(1011 if error == "internal" else 1008, message[:120])

    async def _send(self, obj: dict[str, Any]) -> None:
        if self.ws_closed:
            return
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await self.ws.send_text(json.dumps(obj, separators=(",", ":")))


async def stream_input(ws: WebSocket) -> None:
    await _Socket(ws, multi=False).run()


async def multi_stream_input(ws: WebSocket) -> None:
    await _Socket(ws, multi=True).run()
