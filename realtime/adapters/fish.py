"""Fish Audio's TTS API onto Shoal sessions: the live WebSocket ``/v1/tts/live`` and ``POST /v1/tts``.

Live: msgpack events ``start`` {``request``: a TTSRequest}, ``text`` {``text``}, ``flush``, ``stop`` in; ``audio``
{``audio``: bytes of the requested format} and ``finish`` {``reason``: ``stop`` | ``error``} out (an error's text in
``message``; a non-fatal problem mid-request is a ``log`` {``message``} event). One socket is one Shoal session
(``?session=`` names it); each ``start`` ... ``stop`` is one turn, and a new ``start`` after ``finish`` works, with
new settings if it brings them. HTTP: the same TTSRequest (msgpack or JSON body), one turn, the audio streamed in
the body as it is made; errors as ``{"status", "message"}`` with that status.

The TTSRequest fields used: ``text``, ``reference_id`` (a Shoal voice id), ``references`` (the first one is
registered as a voice, once: its id is a hash of audio and transcript), ``format`` (pcm, wav, mp3, opus),
``sample_rate``, ``mp3_bitrate``, ``opus_bitrate``, ``temperature``, ``top_p``, ``max_new_tokens`` (the turn's
frame bound), ``prosody`` (``speed`` as ``[slow]`` / ``[fast]``, ``volume`` in dB as a gain); ``session`` is
Shoal's extension. Every other field is accepted and ignored (the README lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from realtime.adapters.bridge import ADAPTER_LEAD_MS, Bridge, BridgeError, frame_ms_for, session_param
from realtime.adapters.common import TurnAudio, encode, speed_tag, stream_body
from realtime.adapters.containers import MEDIA_TYPES, MP3_RATES, OPUS_RATES, ContainerEncoder, decode_audio
from realtime.audio import float_to_pcm16
from realtime.gateway import Gateway


__all__ = ["FishRequest", "live", "parse_request", "tts"]

FORMATS = ("pcm", "wav", "mp3", "opus")
DEFAULT_RATE = {"pcm": 44100, "wav": 44100, "mp3": 44100, "opus": 48000}
MP3_KBPS = (64, 128, 192)
OPUS_KBPS = (24, 32, 48, 64)
MAX_MESSAGE_BYTES = 16 << 20  # a start event may carry reference audio
_STATUS = {"bad_message": 400, "unknown_type": 400, "too_large": 413, "not_started": 400, "unauthorized": 401,
           "busy": 409, "limit": 429, "engine_unavailable": 503, "internal": 500}


class FishError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class FishRequest:
    text: str = ""
    format: str = "mp3"
    sample_rate: int = 44100
    bitrate: int | None = None  # bits/s for mp3 and opus
    reference_id: str | None = None
    references: tuple[tuple[bytes, str], ...] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)
    speed: float | None = None
    volume_db: float = 0.0
    session: str | None = None

    @property
    def output(self) -> dict[str, Any]:
        return {"codec": "pcm16", "sample_rate": self.sample_rate, "frame_ms": frame_ms_for(self.sample_rate),
                "lead_ms": ADAPTER_LEAD_MS}


def _number(obj: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise FishError(f"{name} must be a number within [{lo:g}, {hi:g}]")
    return float(value)


def parse_request(obj: Any) -> FishRequest:
    """A TTSRequest map (as Fish's API reference defines it) -> what Shoal uses of it. Raises FishError (400)."""
    if not isinstance(obj, Mapping):
        raise FishError("the request must be a map")
    text = obj.get("text", "")
    if not isinstance(text, str):
        raise FishError("text must be a string")
    fmt = obj.get("format") or "mp3"
    if fmt not in FORMATS:
        raise FishError(f"format must be one of {', '.join(FORMATS)}")
    rate = obj.get("sample_rate")
    if rate is None:
        rate = DEFAULT_RATE[fmt]
    if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 48000:
        raise FishError("sample_rate must be an integer within [8000, 48000]")
    if fmt == "opus" and rate not in OPUS_RATES or fmt == "mp3" and rate not in MP3_RATES:
        allowed = OPUS_RATES if fmt == "opus" else MP3_RATES
        raise FishError(f"sample_rate for {fmt} must be one of {', '.join(map(str, allowed))}")
    bitrate = None
    if fmt == "mp3":
        kbps = obj.get("mp3_bitrate", 128) or 128
        if kbps not in MP3_KBPS:
            raise FishError(f"mp3_bitrate must be one of {MP3_KBPS}")
        bitrate = int(kbps) * 1000
    elif fmt == "opus":
        kbps = obj.get("opus_bitrate", 32) or 32
        if kbps not in (*OPUS_KBPS, -1000):
            raise FishError(f"opus_bitrate must be one of {OPUS_KBPS} or -1000 (auto)")
        bitrate = 32_000 if kbps == -1000 else int(kbps) * 1000
    reference_id = obj.get("reference_id")
    if reference_id is not None and (not isinstance(reference_id, str) or not reference_id):
        raise FishError("reference_id must be a string")
    references: list[tuple[bytes, str]] = []
    for i, ref in enumerate(obj.get("references") or ()):
        if not isinstance(ref, Mapping) or not isinstance(ref.get("audio"), (bytes, bytearray)) \
                or not isinstance(ref.get("text"), str):
            raise FishError(f"references[{i}] must be {{audio: bytes, text: string}}")
        references.append((bytes(ref["audio"]), ref["text"]))
    sampling: dict[str, Any] = {}
    temperature = _number(obj, "temperature", 0.0, 2.0)
    if temperature is not None:
        sampling["temperature"] = temperature
    top_p = _number(obj, "top_p", 0.0, 1.0)
    if top_p is not None:
        sampling["top_p"] = max(top_p, 0.01)  # Fish allows 0; Shoal's nucleus must keep something
    max_new = obj.get("max_new_tokens")
    if max_new is not None:
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
            raise FishError("max_new_tokens must be a non-negative integer")
        if max_new > 0:  # 0: no bound of the client's
            sampling["max_frames"] = min(max_new, 20_000)
    prosody = obj.get("prosody")
    speed, volume = None, 0.0
    if prosody is not None:
        if not isinstance(prosody, Mapping):
            raise FishError("prosody must be a map {speed, volume}")
        speed = _number(prosody, "speed", 0.5, 2.0)
        volume = _number(prosody, "volume", -20.0, 20.0) or 0.0
    session = obj.get("session")
    if session is not None and not isinstance(session, str):
        raise FishError("session must be a string")
    return FishRequest(text=text, format=fmt, sample_rate=rate, bitrate=bitrate, reference_id=reference_id,
                       references=tuple(references), sampling=sampling, speed=speed, volume_db=volume, session=session)


def reference_voice_id(audio: bytes, text: str) -> str:
    """The Shoal voice id of an inline reference: the same audio and transcript are registered (encoded) once."""
    return "fish-" + hashlib.sha256(audio + b"\0" + text.encode("utf-8")).hexdigest()[:40]


class _Session:
    """One Shoal session behind a Fish client: started on the first request, updated when a later one changes the
    voice, the output or the sampling."""

    def __init__(self, bridge: Bridge, session: str | None) -> None:
        self.bridge = bridge
        self.session = session
        self.settings: tuple[Any, ...] | None = None

    async def prepare(self, req: FishRequest) -> None:
        """Make the session speak as ``req`` asks (raises BridgeError, or FishError for bad reference audio)."""
        voice = req.reference_id
        create: tuple[bytes, str] | None = None
        if req.references:
            audio, text = req.references[0]
            voice = reference_voice_id(audio, text)
            if await self.bridge.gateway.store.get_voice(voice) is None:
                create = (audio, text)
        speakers = [{"speaker": 0, "voice": voice if create is None else None}]
        settings = (voice, tuple(sorted(req.output.items())), tuple(sorted(req.sampling.items())))
        sampling = dict(req.sampling) or None
        if self.settings is None:
            await self.bridge.start(session=req.session or self.session, speakers=speakers, output=req.output,
                                    sampling=sampling)
            self.settings = settings if create is None else ()
        if create is not None:
            await self._register(voice, *create)  # type: ignore[arg-type]
            speakers = [{"speaker": 0, "voice": voice}]
        if settings != self.settings:
            await self.bridge.send(type="session.update", speakers=speakers, output=req.output, sampling=sampling)
            await self.bridge.expect("session.ready")
            self.settings = settings

    async def _register(self, voice: str | None, audio: bytes, text: str) -> None:
        msg: dict[str, Any] = {"type": "voice.create", "voice": voice, "text": text, "audio": audio}
        if audio[:4] not in (b"RIFF", b"OggS"):  # MP3 and the rest: decoded here, sent as PCM16
            loop = asyncio.get_running_loop()
            try:
                pcm, rate = await loop.run_in_executor(self.bridge.gateway.codec_pool, decode_audio, audio)
            except ValueError as exc:
                raise FishError(f"references[0].audio: {exc}") from None
            msg.update(audio=float_to_pcm16(pcm), sample_rate=rate)
        await self.bridge.send(**msg)
        await self.bridge.expect("voice.created")


# --------------------------------------------------------------------------------------------------- live


async def live(ws: WebSocket) -> None:
    gateway: Gateway = ws.app.state.gateway
    await ws.accept()
    bridge = Bridge(gateway, ws.headers, ws.query_params, ws.client)  # Fish's Bearer is where the gateway looks
    if not bridge.authorized():
        await _send(ws, {"event": "finish", "reason": "error", "message": "missing or wrong API key"})
        await ws.close(1008)
        return
    fish = _Session(bridge, session_param(ws.headers, ws.query_params))
    turn: asyncio.Task[None] | None = None
    texted = False
    try:
        while True:
            try:
                message = await ws.receive()
            except WebSocketDisconnect:
                break
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("bytes")
            if raw is None:
                raw = (message.get("text") or "").encode()
            try:
                event = msgpack.unpackb(raw, raw=False) if len(raw) <= MAX_MESSAGE_BYTES else None
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
                event = None
            if not isinstance(event, dict):
                await _send(ws, {"event": "finish", "reason": "error", "message": "an event must be a msgpack map"})
                continue
            kind = event.get("event")
            busy = turn is not None and not turn.done()
            if kind == "start":
                if busy:
                    await _send(ws, {"event": "log", "message": "start ignored: the previous request has not finished"})
                    continue
                try:
                    req = parse_request(event.get("request"))
                    await fish.prepare(req)
                except (FishError, BridgeError) as exc:
                    await _send(ws, {"event": "finish", "reason": "error", "message": exc.message})
                    if isinstance(exc, BridgeError) and exc.fatal:
                        break
                    continue
                encoder = ContainerEncoder(req.format, req.sample_rate, req.bitrate, req.volume_db)
                turn = asyncio.create_task(_live_turn(ws, bridge, encoder))
                texted = False
                opening = speed_tag(req.speed) + req.text
                if opening:
                    await bridge.send(type="text", text=opening)
                    texted = True
            elif kind in ("text", "flush", "stop"):
                if not busy:
                    await _send(ws, {"event": "log", "message": f"{kind} ignored: send start first"})
                    continue
                if kind == "text":
                    text = event.get("text")
                    if isinstance(text, str) and text:
                        await bridge.send(type="text", text=text)
                        texted = True
                elif kind == "flush":
                    if texted:
                        await bridge.send(type="flush")
                else:
                    if not texted:
                        await bridge.send(type="text", text=" ")  # an empty request: a turn with no audio
                    await bridge.send(type="turn.end")
            else:
                await _send(ws, {"event": "log", "message": f"unknown event {kind!r} ignored"})
    finally:
        if turn is not None and not turn.done():
            turn.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await turn
        await bridge.close()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close()


async def _live_turn(ws: WebSocket, bridge: Bridge, encoder: ContainerEncoder) -> None:
    """One request's audio onto the socket, then its ``finish``."""
    turn = TurnAudio(bridge)
    try:
        while (pcm := await turn.next()) is not None:
            data = await encode(bridge, encoder, encoder.push, pcm)
            if data:
                await _send(ws, {"event": "audio", "audio": data})
        tail = await encode(bridge, encoder, encoder.close)
        if tail:
            await _send(ws, {"event": "audio", "audio": tail})
        assert turn.done is not None
        if turn.done["reason"] == "error":
            await _send(ws, {"event": "finish", "reason": "error", "message": turn.last_error or "synthesis failed"})
        else:
            await _send(ws, {"event": "finish", "reason": "stop"})
    except BridgeError as exc:
        await _send(ws, {"event": "finish", "reason": "error", "message": exc.message})
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(1011 if exc.code == "internal" else 1008)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left


async def _send(ws: WebSocket, event: dict[str, Any]) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await ws.send_bytes(msgpack.packb(event, use_bin_type=True))


# --------------------------------------------------------------------------------------------------- HTTP


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status)


async def tts(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    bridge = Bridge(gateway, request.headers, request.query_params, request.client)
    if not bridge.authorized():
        return _error(401, "missing or wrong API key")
    raw = await request.body()
    if len(raw) > MAX_MESSAGE_BYTES:
        return _error(413, f"the request is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        if "msgpack" in request.headers.get("content-type", ""):
            obj = msgpack.unpackb(raw, raw=False)
        else:
            obj = json.loads(raw)
        req = parse_request(obj)
    except FishError as exc:
        return _error(exc.status, exc.message)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
        return _error(400, "the body must be a TTSRequest as msgpack (application/msgpack) or JSON")
    if not req.text.strip():
        return _error(400, "text must not be empty")
    fish = _Session(bridge, session_param(request.headers, request.query_params))
    turn = TurnAudio(bridge)
    try:
        await fish.prepare(req)
        await bridge.send(type="text", text=speed_tag(req.speed) + req.text)
        await bridge.send(type="turn.end")
        first = await turn.next()
    except FishError as exc:
        await bridge.close()
        return _error(exc.status, exc.message)
    except BridgeError as exc:
        await bridge.close()
        return _error(_STATUS.get(exc.code, 500), exc.message)
    if first is None and turn.done is not None and turn.done["reason"] == "error":
        await bridge.close()
        return _error(503, turn.last_error or "synthesis failed")
    encoder = ContainerEncoder(req.format, req.sample_rate, req.bitrate, req.volume_db)
    return StreamingResponse(stream_body(bridge, turn, encoder, first), media_type=MEDIA_TYPES[req.format],
                             headers={"x-shoal-session": bridge.session or ""})

