"""Twilio Media Streams at ``/v1/twilio``: a phone call joins a live Shoal session.

Twilio opens this WebSocket when a call reaches a TwiML ``<Connect><Stream url="wss://HOST/v1/twilio">`` with
``<Parameter name="session" value="..."/>`` (and ``token`` when the server has an API key). Its JSON messages:

    in   connected, start {streamSid, callSid, customParameters, mediaFormat}, media {track, timestamp, payload},
         mark {name}, dtmf {digit}, stop
    out  media {payload} (base64 mu-law 8 kHz, 20 ms), mark {name}, clear

The application drives the session over ``/v1/realtime`` as usual; the call joins that live session (same process)
and becomes its listener and its input (``Connection.attach_call``): the session's audio goes to the call as mu-law
8 kHz in 20 ms frames, the caller's audio is the session's input (voice activity, barge-in), and the application gets
``call.started``, the relayed ``input.audio``, ``input.dtmf`` and ``call.stopped``.

Marks: after each segment, at each turn's end, and every 200 ms of audio a mark named ``TURN:MS`` is sent; Twilio
echoes a mark when the audio before it has been played, so the echoes say how much of each turn the caller heard.
A barge-in (the caller's voice, or the application's ``cancel``) sends ``clear`` and cuts the turn at the last echo
plus the time since it. Marks still pending at a ``clear`` are echoed at once by Twilio: those are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from realtime.auth import AuthError
from realtime.caller import InputFormat
from realtime.protocol import Audio, CallStarted, CallStopped, Dtmf, InputRelay, ProtocolError

if TYPE_CHECKING:
    from realtime.gateway import Connection, Gateway

__all__ = ["TwilioCall"]

log = logging.getLogger("shoal.twilio")

OUTPUT = {"codec": "mulaw", "sample_rate": 8000, "frame_ms": 20}  # what a Media Stream plays
MARK_EVERY = 10  # packets (200 ms) between marks within a segment
CLOSE_POLICY, CLOSE_NOT_FOUND = 1008, 4404
_SECRET_PARAMETERS = frozenset({"token"})


class TwilioCall:
    """One Media Stream: joins the session named in its ``customParameters`` for the length of the call."""

    output = OUTPUT
    input = InputFormat(codec="mulaw", sample_rate=8000, vad=True, barge_in=True)

    def __init__(self, gateway: Gateway, ws: WebSocket) -> None:
        self.gw = gateway
        self.ws = ws
        self.stream_sid = ""
        self.call_sid = ""
        self.conn: Connection | None = None
        self._marks: dict[str, tuple[int, float]] = {}  # sent and not yet echoed: name -> (turn, ms)
        self._echoes: dict[int, tuple[float, float]] = {}  # turn -> (ms heard, monotonic time of the echo)
        self._packets: dict[int, int] = {}  # turn -> packets sent (for the periodic marks)
        self._lock = asyncio.Lock()  # frames leave from the session's send loop and from clear()
        self._pending: set[asyncio.Task[None]] = set()
        self.bad_frames = 0
        self.close_reason = "the stream ended"

    # ------------------------------------------------------------------ the call's messages

    async def run(self) -> None:
        await self.ws.accept()
        stopped = False
        try:
            while True:
                try:
                    message = json.loads(await self.ws.receive_text())
                    if not isinstance(message, dict):
                        raise ValueError("not an object")
                except (ValueError, KeyError) as exc:  # Twilio sends JSON objects; anything else is noise
                    self._bad(f"a frame that is not a JSON object ({exc})")
                    continue
                event = message.get("event")
                if event == "start":
                    if not await self._start(message):
                        return
                elif event == "media":
                    await self._media(message)
                elif event == "mark":
                    self._echo(message)
                elif event == "dtmf":
                    self._dtmf(message)
                elif event == "stop":
                    stopped = True
                    return
                elif event != "connected":
                    self._bad(f"unknown event {event!r}")
        except WebSocketDisconnect as exc:
            self.close_reason = f"the stream's socket closed ({exc.code})"
        except RuntimeError as exc:  # the server closed it first (a keepalive ping unanswered, or shutting down)
            self.close_reason = f"the stream's socket was closed by the server ({exc})"
        finally:
            for task in self._pending:
                task.cancel()
            if self.conn is not None:
                self.conn.detach_call(self)
                self.conn.notify(CallStopped(call=self.call_sid, reason="hangup" if stopped else "disconnected"))
                how = "hangup" if stopped else f"disconnected: {self.close_reason}"
                (log.info if stopped else log.warning)("session %s: call %s ended (%s)", self.conn.sid, self.call_sid, how)

    async def _start(self, message: dict[str, Any]) -> bool:
        start = message.get("start")
        start = start if isinstance(start, dict) else {}
        self.stream_sid = str(message.get("streamSid") or start.get("streamSid") or "")
        self.call_sid = str(start.get("callSid") or "")
        raw = start.get("customParameters")
        parameters = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        try:
            principal = self.gw.config.keys.authenticate(parameters.get("token"))
            if not principal.may("realtime"):
                raise AuthError("the token's scopes do not include realtime")
        except AuthError as exc:
            log.warning("call %s refused: customParameters.token: %s", self.call_sid, exc)
            await self.ws.close(CLOSE_POLICY, "unauthorized")
            return False
        media = start.get("mediaFormat")
        media = media if isinstance(media, dict) else {}
        if (media.get("encoding", "audio/x-mulaw"), str(media.get("sampleRate", 8000))) != ("audio/x-mulaw", "8000"):
            log.warning("call %s refused: media format %r is not mu-law 8 kHz", self.call_sid, media)
            await self.ws.close(CLOSE_POLICY, "unsupported media format")
            return False
        session = parameters.get("session", "")
        conn = self.gw.live_connection(session, principal) if session else None
        if conn is None:
            log.warning("call %s refused: session %r is not live on this server (the application must have it open "
                        "on /v1/realtime first)", self.call_sid, session)
            await self.ws.close(CLOSE_NOT_FOUND, "no such live session")
            return False
        try:
            conn.attach_call(self)
        except ProtocolError as exc:
            log.warning("session %s: call %s refused: %s", conn.sid, self.call_sid, exc.message)
            await self.ws.close(CLOSE_POLICY, exc.message[:120])
            return False
        self.conn = conn
        shown = {k: v for k, v in parameters.items() if k not in _SECRET_PARAMETERS}
        conn.notify(CallStarted(call=self.call_sid, stream=self.stream_sid, parameters=shown))
        log.info("session %s: call %s joined (stream %s)", conn.sid, self.call_sid, self.stream_sid)
        return True

    async def _media(self, message: dict[str, Any]) -> None:
        conn = self.conn
        media = message.get("media")
        if conn is None or not isinstance(media, dict) or media.get("track", "inbound") != "inbound":
            return
        try:
            data = base64.b64decode(str(media.get("payload", "")), validate=True)
        except (binascii.Error, ValueError):
            self._bad("a media payload that is not base64")
            return
        ms = conn.caller.ms if conn.caller is not None else 0.0
        try:
            await conn.input_audio(data)
        except ProtocolError as exc:
            self._bad(exc.message)
            return
        conn.notify(InputRelay(data=data, ms=round(ms, 1), codec="mulaw"))

    def _echo(self, message: dict[str, Any]) -> None:
        mark = message.get("mark")
        name = str(mark.get("name", "")) if isinstance(mark, dict) else ""
        found = self._marks.pop(name, None)
        if found is not None:  # (a mark dropped by clear() is echoed too: it was never played)
            turn, ms = found
            self._echoes[turn] = (ms, time.monotonic())
            for old in sorted(self._echoes)[:-16]:
                del self._echoes[old]

    def _dtmf(self, message: dict[str, Any]) -> None:
        dtmf = message.get("dtmf")
        digit = str(dtmf.get("digit", "")) if isinstance(dtmf, dict) else ""
        if self.conn is not None and digit:
            ms = self.conn.caller.ms if self.conn.caller is not None else 0.0
            self.conn.notify(Dtmf(digit=digit[:1], ms=round(ms, 1)))

    def _bad(self, what: str) -> None:
        self.bad_frames += 1
        if self.bad_frames in (1, 10, 100, 1000):  # a broken bridge must not flood the log
            log.warning("call %s: ignored %s (%d so far)", self.call_sid or "-", what, self.bad_frames)

    # ------------------------------------------------------------------ the session's side (CallLink)

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._lock:
            await self.ws.send_text(json.dumps({**message, "streamSid": self.stream_sid}, separators=(",", ":")))

    async def send_audio(self, msg: Audio) -> None:
        await self._send({"event": "media", "media": {"payload": base64.b64encode(msg.data).decode("ascii")}})
        count = self._packets[msg.turn] = self._packets.get(msg.turn, 0) + 1
        for old in sorted(self._packets)[:-16]:
            del self._packets[old]
        if count % MARK_EVERY == 0:
            await self.boundary(msg.turn, msg.ms + OUTPUT["frame_ms"])

    async def boundary(self, turn: int, ms: float) -> None:
        name = f"{turn}:{ms:g}"
        if ms <= 0 or name in self._marks:
            return
        self._marks[name] = (turn, ms)
        await self._send({"event": "mark", "mark": {"name": name}})

    def clear(self) -> None:
        self._marks.clear()  # their echoes will come at once, unplayed
        task = asyncio.get_running_loop().create_task(self._send({"event": "clear"}))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def end(self, reason: str) -> None:
        self.close_reason = reason
        if self.conn is not None:
            log.info("session %s: call %s ended: %s", self.conn.sid, self.call_sid, reason)
        self.conn = None  # the session's connection is ending: nothing to detach from or tell
        try:
            async with asyncio.timeout(2.0):
                await self.ws.close(1000, reason[:120])
        except (RuntimeError, OSError, TimeoutError, WebSocketDisconnect):
            pass  # already gone

    def heard_ms(self, turn: int, at: float) -> float | None:
        echo = self._echoes.get(turn)
        if echo is None:
            return None
        ms, when = echo
        # played on from the last echo (never more than was queued before the next mark)
        return max(0.0, ms + (at - when) * 1000.0)
