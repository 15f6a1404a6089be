"""The WebSocket shell around the sans-I/O protocol: one ``Connection`` per socket, pumped by three tasks.

    receive loop ──► Conversation (pure) ──events──► jobs queue ──► turn runner ──► engine ──► encoder
         │                                                                             │
         └─────────── control messages ──────────► Outbox (control first) ◄── paced audio
                                                        │
                                                   send loop ──► socket

The receive loop never waits on synthesis, so ``cancel`` and ``ping`` are answered at once. The turn runner
pulls audio from the engine only as fast as pacing allows (``lead_ms`` ahead of the client's playback
clock), so the engine is throttled to real time and a cancelled turn stops costing compute. Finished turns
are written to the store by a writer task, in order, retried while the store is down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import os
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from engine.base import EngineError, PastTurn, Sampling, SynthesisRequest, Synthesizer, VoiceRef
from realtime.audio import AudioEncoder, OutputFormat, read_audio_bytes
from realtime.config import ServerConfig
from realtime.conversation import (
    CancelTurns,
    Conversation,
    EndTurn,
    Event,
    PlaybackReported,
    Send,
    SynthesizeSegment,
)
from realtime.metrics import Metrics
from realtime.outbox import Close, Outbox, OutboxFull
from realtime.protocol import (
    Audio,
    Cancel,
    ClientMessage,
    Encoding,
    Error,
    Flush,
    Ping,
    Playback,
    Pong,
    ProtocolError,
    Segment,
    ServerMessage,
    SessionReady,
    SessionStart,
    SessionUpdate,
    SpeakerSpec,
    Text,
    TurnDone,
    TurnEnd,
    TurnStarted,
    VoiceCreate,
    VoiceCreated,
    decode_client,
    encode,
    parse_frame,
)
from sessions.model import Session, Speaker, Turn, Voice
from sessions.store import SessionStore, StoreError

log = logging.getLogger("shoal.gateway")

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_BUSY = 4409  # application code: the session is live on another connection
READY_HISTORY_TURNS = 50  # turns of text session.ready carries on resume
CODEC_FRAME_MS = 1000.0 / 21.5  # S2 Pro codec frame; used to apply sampling.max_frames to any engine


class Gateway:
    """Shared state of one server process: engine, store, metrics, open connections, shutdown."""

    def __init__(self, config: ServerConfig, engine: Synthesizer, store: SessionStore, metrics: Metrics) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.connections: set[Connection] = set()
        self.accepting = True
        # resampling + Opus encoding for every connection: off the event loop, on the other cores
        self.codec_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="codec"
        )

    def authorized(self, ws: WebSocket) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        given = ws.query_params.get("token")
        header = ws.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), key.encode())

    async def serve(self, ws: WebSocket) -> None:
        conn = Connection(self, ws)
        self.connections.add(conn)
        self.metrics.connections_open.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.metrics.connections_open.dec()

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, tell every connection it is going away, wait for them (bounded)."""
        self.accepting = False
        for conn in list(self.connections):
            conn.going_away()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        self.codec_pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Seg:
    start_ms: float  # where its audio starts within the turn
    text: str
    speaker: int
    codes: list[np.ndarray] = field(default_factory=list)  # (10, k) chunks, for engines with codes


@dataclass
class _Turn:
    """Gateway-side state of one turn: what was sent, when, and what to store."""

    turn: int
    speaker: int
    ready_at: float | None = None  # first segment ready (TTFA start)
    first_sent_at: float | None = None
    seq: int = 0  # audio packets made (and enqueued) for this turn
    delivered: int = 0  # audio packets handed to the socket (a barge-in drops the rest)
    sent_ms: float = 0.0  # audio enqueued for this turn
    engine_ms: float = 0.0  # audio produced by the engine for this turn
    segments: list[_Seg] = field(default_factory=list)  # segments whose audio started, in order
    encoder: AudioEncoder | None = None
    played_ms: float | None = None
    played: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    failed: bool = False
    length: bool = False
    done: bool = False

    @property
    def ttfa_ms(self) -> float | None:
        if self.ready_at is None or self.first_sent_at is None:
            return None
        return round((self.first_sent_at - self.ready_at) * 1000.0, 3)


class _PlaybackClock:
    """Where the client's playback is, assuming it plays what it gets in real time and stalls when dry."""

    def __init__(self) -> None:
        self.sent_ms = 0.0
        self.pos_ms = 0.0
        self._last: float | None = None

    def advance(self, now: float) -> None:
        if self._last is not None:
            self.pos_ms = min(self.sent_ms, self.pos_ms + (now - self._last) * 1000.0)
        self._last = now

    def ahead_ms(self, now: float) -> float:
        self.advance(now)
        return self.sent_ms - self.pos_ms

    def reset(self, now: float) -> None:
        """The client dropped its buffer (cancel)."""
        self.advance(now)
        self.pos_ms = self.sent_ms


class Connection:
    def __init__(self, gateway: Gateway, ws: WebSocket) -> None:
        self.gw = gateway
        self.ws = ws
        self.limits = gateway.config.limits
        self.owner = uuid.uuid4().hex
        self.encoding = Encoding.MSGPACK
        self.outbox = Outbox(self.limits.audio_queue_packets, self.limits.control_queue_messages)
        self.session: Session | None = None
        self.output = OutputFormat()
        self.sampling = Sampling()
        self.conversation: Conversation | None = None
        self.history: list[Turn] = []  # stored turns (cut where cancelled), oldest first
        self.voices: dict[str, Voice] = {}
        self.turns: dict[int, _Turn] = {}
        self.jobs: asyncio.Queue[Event] = asyncio.Queue(maxsize=4096)
        self.writes: asyncio.Queue[_Turn] = asyncio.Queue(maxsize=1024)
        self.clock = _PlaybackClock()
        self._current: tuple[int, asyncio.Task[None]] | None = None  # (turn, segment task)
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self._send_started: float | None = None  # when the frame being sent was handed to the socket
        self._last_received = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        await self.ws.accept()
        if not self.gw.authorized(self.ws):
            await self._refuse("unauthorized", "missing or wrong API key", CLOSE_POLICY)
            return
        if not self.gw.accepting:
            await self._refuse("internal", "server is shutting down; reconnect later", CLOSE_GOING_AWAY)
            return
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="receive"),
            asyncio.create_task(self._send_loop(), name="send"),
            asyncio.create_task(self._run_turns(), name="turns"),
            asyncio.create_task(self._write_turns(), name="writer"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
        ]
        try:
            await asyncio.wait(self._tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._finish()

    async def _refuse(self, code: str, message: str, close_code: int) -> None:
        """Refuse the connection with a fatal error, in the encoding of the client's first frame if one comes
        within 2 s (clients send session.start at once), else as JSON."""
        self.gw.metrics.errors.labels(code).inc()
        encoding = Encoding.JSON
        try:
            first = await asyncio.wait_for(self.ws.receive(), 2.0)
            if first.get("bytes") is not None:
                encoding = Encoding.MSGPACK
        except TimeoutError:
            pass  # a silent client gets JSON
        frame = encode(Error(code=code, message=message, fatal=True), encoding)
        try:
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_text(frame)
            await self.ws.close(close_code)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client left first: nothing to tell it

    async def _finish(self) -> None:
        self._closing = True
        self.outbox.close()
        if self._current is not None:
            self._current[1].cancel()
        writer = self._tasks[3]
        others = [t for t in self._tasks if t is not writer]
        for task in others:
            task.cancel()
        # bounded: on Python 3.11 a cancel that lands inside redis-py's own wait_for can be swallowed (the lease
        # task), and a connection must never hang on its way out
        await asyncio.wait(others, timeout=2.0)
        # finish open turns as cut at what was sent, then let the writer drain (bounded)
        for state in list(self.turns.values()):
            if not state.done:
                state.cancelled = True
                self._finalize(state)
        for state in self.turns.values():
            state.played.set()  # no more playback reports can come
        await _wait_drained(self.writes, writer, 3.0)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        if self.session is not None:
            self.gw.metrics.sessions_open.dec()
            try:
                await self.gw.store.release(self.session.id, self.owner)
            except StoreError as exc:
                log.warning("session %s: could not release ownership: %s", self.session.id, exc)
        if self.ws.application_state is not WebSocketState.DISCONNECTED:
            try:
                await self.ws.close(1000)
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # the peer left first: nothing left to tell

    def going_away(self) -> None:
        """Server shutdown: stop turns, tell the client, close with 1001."""
        self._cancel_active()
        self._fatal("internal", "server is shutting down; reconnect to resume the session", CLOSE_GOING_AWAY)

    def abort(self) -> None:
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------------ sending

    def _send(self, msg: ServerMessage) -> None:
        if isinstance(msg, Error):
            self.gw.metrics.errors.labels(msg.code).inc()
        try:
            self.outbox.put(msg)
        except OutboxFull:
            log.warning("dropping a client that does not read its messages")
            self.outbox.close()

    def _error(self, exc: ProtocolError) -> None:
        if exc.fatal:
            self._fatal(exc.code, exc.message, CLOSE_BUSY if exc.code == "busy" else CLOSE_POLICY)
        else:
            self._send(exc.to_message())

    def _fatal(self, code: str, message: str, close_code: int) -> None:
        self.outbox.drop_audio(set(self.turns))
        self._send(Error(code=code, message=message, fatal=True))
        try:
            self.outbox.put(Close(close_code, message[:120]))
        except OutboxFull:
            self.outbox.close()

    async def _send_loop(self) -> None:
        """Send in order. A send that blocks longer than ``send_timeout_s`` (a client that stopped reading) is
        ended by ``_watch_sends``: one watchdog per connection instead of a timer per frame."""
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            self._send_started = time.monotonic()
            try:
                if isinstance(item, Close):
                    await self.ws.close(item.code, item.reason)
                    return
                if isinstance(item, TurnDone):  # what was really sent, and TTFA, are known only now
                    state = self.turns.get(item.turn)
                    if state is not None:
                        item = replace(item, ttfa_ms=state.ttfa_ms, frames=state.delivered,
                                       audio_ms=round(state.delivered * self.output.frame_ms, 3))
                frame = encode(item, self.encoding)
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                else:
                    await self.ws.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return  # the peer is gone
            finally:
                self._send_started = None
            if isinstance(item, Audio):
                self._on_audio_sent(item)

    async def _watchdog(self) -> None:
        """One timer per connection: a client that stopped reading is dropped, an idle one told and closed."""
        timeout, idle = self.limits.send_timeout_s, self.limits.idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4, idle / 4))
            now = time.monotonic()
            started = self._send_started
            if started is not None and now - started > timeout:
                log.warning("client read nothing for %.1f s: dropping it", timeout)
                self._tasks[1].cancel()  # the send loop: run() sees it end and closes the connection
                return
            if now - self._last_received > idle:
                self._fatal("limit", f"no message for {idle:.0f} s (send ping to keep alive)", 1000)
                return

    def _on_audio_sent(self, msg: Audio) -> None:
        state = self.turns.get(msg.turn)
        if state is not None:
            state.delivered += 1
        if state is not None and state.first_sent_at is None:
            state.first_sent_at = time.monotonic()
            if state.ttfa_ms is not None:
                self.gw.metrics.ttfa.observe(state.ttfa_ms / 1000.0)
        self.gw.metrics.audio_seconds.inc(self.output.frame_ms / 1000.0)

    # ------------------------------------------------------------------ receiving

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            self._last_received = time.monotonic()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("bytes")
            if frame is None:
                frame = message.get("text")
            if frame is None:
                continue
            await self._on_frame(frame)

    async def _on_frame(self, frame: bytes | str) -> None:
        size = len(frame)
        if size > self.limits.voice_message_bytes:
            self._send(Error("too_large", f"message of {size} bytes exceeds {self.limits.voice_message_bytes}"))
            return
        try:
            if size > self.limits.message_bytes:
                obj, _ = parse_frame(frame)
                if obj.get("type") != "voice.create":
                    raise ProtocolError("too_large", f"message of {size} bytes exceeds {self.limits.message_bytes}")
            msg, encoding = decode_client(frame)
            if self.session is None:
                self.encoding = encoding  # answer in the client's encoding, even before session.start
                if not isinstance(msg, SessionStart):
                    if isinstance(msg, Ping):
                        self._send(Pong())
                        return
                    raise ProtocolError("not_started", f"send session.start before {msg.type}")
            await self._dispatch(msg)
        except ProtocolError as exc:
            if self.session is None and isinstance(frame, str):
                self.encoding = Encoding.JSON
            self._error(exc)
        except StoreError as exc:
            log.warning("store error: %s", exc)
            self._send(Error("internal", f"session store unavailable, try again: {exc}"))

    async def _dispatch(self, msg: ClientMessage) -> None:
        if isinstance(msg, Ping):
            self._send(Pong())
        elif isinstance(msg, SessionStart):
            await self._start(msg)
        elif isinstance(msg, (Text, Flush, TurnEnd, Cancel, Playback)):
            assert self.conversation is not None
            for event in self.conversation.receive(msg):
                self._on_event(event)
        elif isinstance(msg, VoiceCreate):
            await self._create_voice(msg)
        elif isinstance(msg, SessionUpdate):
            await self._update(msg)

    # ------------------------------------------------------------------ session

    async def _start(self, msg: SessionStart) -> None:
        if self.session is not None:
            raise ProtocolError("bad_message", "session.start was already received on this connection")
        output, sampling = self._settings(msg.output, msg.sampling, OutputFormat(), Sampling())
        store = self.gw.store
        session_id = msg.session or uuid.uuid4().hex
        stored = await store.load_session(session_id) if msg.session else None
        speakers = list(msg.speakers) if msg.speakers is not None else None
        if stored is not None:
            output, sampling = self._settings(msg.output, msg.sampling, *self._stored_settings(stored))
            if speakers is None:
                speakers = [SpeakerSpec(s.speaker, s.voice) for s in stored.speakers]
        await self._load_voices(speakers or [])
        if not await self._acquire(session_id):
            raise ProtocolError("busy", f"session {session_id} is live on another connection", fatal=True)
        try:
            session = stored or Session(id=session_id)
            session.speakers = [Speaker(s.speaker, s.voice) for s in speakers or []]
            session.output = output.to_wire()
            session.sampling = _sampling_to_wire(sampling)
            if stored is None:
                await store.create_session(session)
                self.history = []
            else:
                await store.save_session(session)
                self.history = await store.load_turns(session_id)
                session.turns = len(self.history)
        except BaseException:
            await store.release(session_id, self.owner)
            raise
        self.session, self.output, self.sampling = session, output, sampling
        self.conversation = Conversation(next_turn=session.turns, limits=self.limits.turn)
        self.gw.metrics.sessions_open.inc()
        self._tasks.append(asyncio.create_task(self._keep_lease(), name="lease"))
        self._send(self._ready(resumed=stored is not None))

    async def _acquire(self, session_id: str) -> bool:
        """Take the session's ownership lease. A connection that just dropped may still be storing its last
        turn: wait for it a little (``busy_wait_ms``) before answering busy, so a quick reconnect just works."""
        deadline = time.monotonic() + self.limits.busy_wait_ms / 1000.0
        while not await self.gw.store.acquire(session_id, self.owner, self.limits.lease_ms):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _ready(self, resumed: bool) -> SessionReady:
        assert self.session is not None
        return SessionReady(
            session=self.session.id,
            engine=self.gw.engine.info.to_wire(),
            output=self.output.to_wire(),
            resumed=resumed,
            turns=self.session.turns,
            speakers=tuple(SpeakerSpec(s.speaker, s.voice) for s in self.session.speakers),
            history=tuple(
                {"turn": t.index, "speaker": t.speaker, "text": t.text, "state": t.state, "audio_ms": t.audio_ms}
                for t in self.history[-READY_HISTORY_TURNS:]
            )
            or None,
        )

    @staticmethod
    def _stored_settings(session: Session) -> tuple[OutputFormat, Sampling]:
        try:
            return OutputFormat.from_wire(session.output), Sampling(**session.sampling)
        except (ValueError, TypeError):
            return OutputFormat(), Sampling()

    @staticmethod
    def _settings(
        output: Mapping[str, Any] | None, sampling: Mapping[str, Any] | None, base_out: OutputFormat, base_s: Sampling
    ) -> tuple[OutputFormat, Sampling]:
        try:
            out = OutputFormat.from_wire(output, base_out)
        except ValueError as exc:
            raise ProtocolError("bad_message", f"output: {exc}") from None
        if sampling is None:
            return out, base_s
        known = {k: v for k, v in sampling.items() if k in Sampling.__dataclass_fields__}
        try:
            return out, replace(base_s, **known)
        except (ValueError, TypeError) as exc:
            raise ProtocolError("bad_message", f"sampling: {exc}") from None

    async def _load_voices(self, speakers: list[SpeakerSpec]) -> None:
        for spec in speakers:
            if spec.voice is None or spec.voice in self.voices:
                continue
            voice = await self.gw.store.get_voice(spec.voice)
            if voice is None:
                raise ProtocolError(
                    "bad_message", f"speaker {spec.speaker}: voice {spec.voice!r} is not registered (send voice.create)"
                )
            self.voices[spec.voice] = voice

    async def _update(self, msg: SessionUpdate) -> None:
        assert self.session is not None and self.conversation is not None
        if self.conversation.active_turns:
            raise ProtocolError("bad_message", "session.update is only accepted between turns")
        output, sampling = self._settings(msg.output, msg.sampling, self.output, self.sampling)
        if msg.speakers is not None:
            await self._load_voices(list(msg.speakers))
            self.session.speakers = [Speaker(s.speaker, s.voice) for s in msg.speakers]
        self.output, self.sampling = output, sampling
        self.session.output, self.session.sampling = output.to_wire(), _sampling_to_wire(sampling)
        await self.gw.store.save_session(self.session)
        self._send(self._ready(resumed=True))

    async def _keep_lease(self) -> None:
        assert self.session is not None
        period = self.limits.lease_ms / 3000.0
        while True:
            await asyncio.sleep(period)
            try:
                ok = await self.gw.store.refresh(self.session.id, self.owner, self.limits.lease_ms)
                if not ok and not await self.gw.store.acquire(self.session.id, self.owner, self.limits.lease_ms):
                    self._cancel_active()
                    self._fatal("busy", "another connection took over this session", CLOSE_BUSY)
                    return
            except StoreError as exc:
                log.warning("session %s: lease refresh failed: %s", self.session.id, exc)

    # ------------------------------------------------------------------ voices

    async def _create_voice(self, msg: VoiceCreate) -> None:
        loop = asyncio.get_running_loop()
        try:
            pcm, rate = await loop.run_in_executor(None, read_audio_bytes, msg.audio, msg.sample_rate or 16000)
        except ValueError as exc:
            raise ProtocolError("bad_message", f"voice.create.audio: {exc}") from None
        seconds = len(pcm) / rate
        if not self.limits.voice_min_s <= seconds <= self.limits.voice_max_s:
            raise ProtocolError(
                "limit",
                f"reference audio is {seconds:.1f} s; it must be {self.limits.voice_min_s:g}-"
                f"{self.limits.voice_max_s:g} s (10-30 s works best)",
            )
        try:
            codes = await self.gw.engine.encode_voice(pcm, rate, msg.text)
        except EngineError as exc:
            raise ProtocolError("engine_unavailable", f"could not encode the reference: {exc}") from None
        pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        voice = Voice(
            voice=msg.voice or f"v-{uuid.uuid4().hex[:16]}",
            text=msg.text,
            seconds=round(seconds, 3),
            sample_rate=rate,
            audio=pcm16,
            codes=codes,
        )
        await self.gw.store.put_voice(voice)
        self.voices[voice.voice] = voice
        self.gw.metrics.voices.inc()
        frames = int(codes.shape[-1]) if codes is not None else 0
        self._send(VoiceCreated(voice=voice.voice, seconds=voice.seconds, frames=frames))

    # ------------------------------------------------------------------ turns

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Send):
            if isinstance(event.message, TurnStarted):
                self.turns[event.message.turn] = _Turn(event.message.turn, event.message.speaker)
            self._send(event.message)
        elif isinstance(event, CancelTurns):
            self._cancel(event.turns)
        elif isinstance(event, PlaybackReported):
            state = self.turns.get(event.turn)
            if state is not None and not state.played.is_set():
                state.played_ms = event.played_ms
                state.played.set()
        else:
            try:
                self.jobs.put_nowait(event)
            except asyncio.QueueFull:
                raise ProtocolError("limit", "too many segments waiting; slow down or send turn.end") from None

    def _cancel_active(self) -> None:
        if self.conversation is not None:
            events = self.conversation.receive(Cancel())
            for event in events:
                self._on_event(event)

    def _cancel(self, turns: tuple[int, ...]) -> None:
        """Barge-in: silence now (drop queued audio, stop the engine), finish the turns in order."""
        cancelled = set(turns)
        for t in turns:
            self.turns[t].cancelled = True
        self.outbox.drop_audio(cancelled)
        self.clock.reset(time.monotonic())
        if self._current is not None and self._current[0] in cancelled:
            self._current[1].cancel()
        self.jobs.put_nowait(CancelTurns(turns))

    async def _run_turns(self) -> None:
        while True:
            job = await self.jobs.get()
            if isinstance(job, SynthesizeSegment):
                state = self.turns[job.turn]
                if state.cancelled or state.failed or state.length:
                    continue
                task = await self._run_current(state, self._synthesize(state, job))
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    state.failed = True
                    if isinstance(exc, EngineError):
                        self._send(Error("engine_unavailable", f"turn {state.turn}: {exc}"))
                    else:
                        log.error("turn %d failed", state.turn, exc_info=exc)
                        self._send(Error("internal", f"turn {state.turn} failed: {type(exc).__name__}"))
            elif isinstance(job, EndTurn):
                state = self.turns[job.turn]
                if not state.cancelled:
                    await self._run_current(state, self._drain_encoder(state))
                if not state.cancelled:
                    self._finalize(state)
            elif isinstance(job, CancelTurns):
                for t in job.turns:
                    self._finalize(self.turns[t])

    async def _run_current(self, state: _Turn, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run one step of a turn as the cancellable current task (a barge-in cancels it) and wait for it."""
        task = asyncio.create_task(work)
        self._current = (state.turn, task)
        try:
            await asyncio.wait([task])
        finally:
            self._current = None
            if not task.done():
                task.cancel()
        return task

    async def _synthesize(self, state: _Turn, job: SynthesizeSegment) -> None:
        assert self.session is not None
        if state.ready_at is None:
            state.ready_at = job.ready_at
        if state.encoder is None:
            state.encoder = AudioEncoder(self.output, self.gw.engine.info.sample_rate)
        # max_frames bounds the whole turn: each segment gets what the earlier ones left
        max_ms = self.sampling.max_frames * CODEC_FRAME_MS
        left = max(1, round((max_ms - state.engine_ms) / CODEC_FRAME_MS))
        request = SynthesisRequest(
            text=job.text,
            speaker=job.speaker,
            voices=self._voice_refs(),
            history=self._past(state),
            sampling=replace(self.sampling, max_frames=min(left, self.sampling.max_frames)),
            session=self.session.id,
        )
        rate = self.gw.engine.info.sample_rate
        seg: _Seg | None = None
        stream = self.gw.engine.synthesize(request)
        try:
            async for chunk in stream:
                if seg is None:
                    seg = _Seg(state.sent_ms, job.text, job.speaker)
                    state.segments.append(seg)
                    await self.outbox.put_audio(Segment(turn=state.turn, text=job.text, ms=round(state.sent_ms, 3)))
                if chunk.codes is not None:
                    seg.codes.append(np.asarray(chunk.codes, dtype=np.int16))
                pcm = chunk.pcm
                if state.engine_ms + len(pcm) * 1000.0 / rate > max_ms:
                    pcm = pcm[: max(0, int((max_ms - state.engine_ms) * rate / 1000.0))]
                    state.length = True
                state.engine_ms += len(pcm) * 1000.0 / rate
                await self._emit(state, await self._encode(state.encoder.push, pcm))
                if state.length:
                    break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if state.engine_ms >= max_ms - CODEC_FRAME_MS / 2:  # the engine stopped at the limit, not by itself
            state.length = True
        if state.length:
            await self._drain_encoder(state)

    async def _encode(self, fn: Callable[[np.ndarray], list[bytes]], pcm: np.ndarray) -> list[bytes]:
        """Resample + encode off the event loop (libopus and libsoxr release the GIL): the loop only moves bytes."""
        return await asyncio.get_running_loop().run_in_executor(self.gw.codec_pool, fn, pcm)

    async def _emit(self, state: _Turn, packets: list[bytes]) -> None:
        frame_ms = self.output.frame_ms
        lead = float(self.output.lead_ms)
        for data in packets:
            ahead = self.clock.ahead_ms(time.monotonic())
            if ahead > lead:
                await asyncio.sleep((ahead - lead) / 1000.0)
            if state.cancelled:  # a barge-in while this step was pacing or encoding: nothing more of it goes out
                raise asyncio.CancelledError
            msg = Audio(turn=state.turn, seq=state.seq, ms=round(state.sent_ms, 3), data=data)
            if not self.outbox.try_put_audio(msg):
                try:
                    await asyncio.wait_for(self.outbox.put_audio(msg), self.limits.send_timeout_s)
                except TimeoutError:
                    self._fatal("limit", "the client reads audio slower than real time; dropping the connection", CLOSE_POLICY)
                    raise asyncio.CancelledError from None
            state.seq += 1
            state.sent_ms += frame_ms
            self.clock.sent_ms += frame_ms

    async def _drain_encoder(self, state: _Turn) -> None:
        if state.encoder is not None and not state.cancelled:
            encoder, state.encoder = state.encoder, None
            await self._emit(state, await self._encode(lambda _: encoder.flush(), np.zeros(0, np.float32)))

    def _finalize(self, state: _Turn) -> None:
        """Send turn.done once, hand the turn to the store writer."""
        if state.done:
            return
        state.done = True
        reason = "cancelled" if state.cancelled else "error" if state.failed else "length" if state.length else "complete"
        # in the stream lane, so turn.done follows the turn's last audio packet
        self.outbox.put_stream(
            TurnDone(turn=state.turn, reason=reason, audio_ms=round(state.sent_ms, 3), frames=state.seq, ttfa_ms=None)
        )
        self.gw.metrics.turns.labels(reason).inc()
        if self.conversation is not None:
            self.conversation.finished(state.turn)
        self.history.append(self._stored_turn(state, reason))
        if self.session is not None:
            self.session.turns = len(self.history)
        self.writes.put_nowait(state)
        for old in [t for t, st in self.turns.items() if st.done and t < state.turn - 8]:
            del self.turns[old]  # long finished: keep the per-connection state bounded

    def _stored_turn(self, state: _Turn, reason: str) -> Turn:
        """The turn as the conversation will remember it: a cancelled one cut at what the listener heard."""
        keep_ms = state.sent_ms
        segments = state.segments
        chunks = [c for s in segments for c in s.codes]
        codes = np.concatenate(chunks, axis=1) if chunks else None
        if reason == "cancelled":
            keep_ms = state.delivered * self.output.frame_ms  # queued audio was dropped at the barge-in
            if state.played_ms is not None:
                keep_ms = min(keep_ms, state.played_ms)
            segments = [s for s in segments if s.start_ms < keep_ms]
            if codes is not None:
                codes = codes[:, : int(round(keep_ms / CODEC_FRAME_MS))]
        return Turn(
            index=state.turn,
            speaker=state.speaker,
            text=" ".join(s.text for s in segments),
            state=reason,
            audio_ms=int(round(keep_ms)),
            codes=codes,
        )

    async def _write_turns(self) -> None:
        """Store finished turns in order; wait briefly for playback reports on cancelled ones; retry on outage."""
        assert self.writes is not None
        while True:
            state = await self.writes.get()
            try:
                if state.cancelled and not state.played.is_set():
                    try:
                        await asyncio.wait_for(state.played.wait(), self.limits.playback_grace_ms / 1000.0)
                    except TimeoutError:
                        pass  # no report: the turn stays cut at what was sent
                turn = self._amend(state)
                delay = 0.25
                while self.session is not None:
                    try:
                        await self.gw.store.append_turn(self.session.id, turn)
                        break
                    except StoreError as exc:
                        if self._closing and delay > 2:
                            log.error("session %s: turn %d not stored: %s", self.session.id, turn.index, exc)
                            break
                        self._send(Error("internal", f"session store unavailable; turn {turn.index} will be retried: {exc}"))
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
            finally:
                self.writes.task_done()

    def _amend(self, state: _Turn) -> Turn:
        """Re-cut the remembered turn if a playback report arrived after turn.done."""
        for i, turn in enumerate(self.history):
            if turn.index == state.turn:
                if state.cancelled:
                    self.history[i] = self._stored_turn(state, turn.state)
                return self.history[i]
        raise AssertionError(f"turn {state.turn} missing from history")

    def _voice_refs(self) -> dict[int, VoiceRef]:
        assert self.session is not None
        refs: dict[int, VoiceRef] = {}
        for s in self.session.speakers:
            voice = self.voices.get(s.voice) if s.voice else None
            if voice is not None:
                refs[s.speaker] = VoiceRef(voice=voice.voice, text=voice.text, codes=voice.codes)
        return refs

    def _past(self, state: _Turn) -> list[PastTurn]:
        past = [PastTurn(t.speaker, t.text, t.codes) for t in self.history if t.text]
        for s in state.segments:  # earlier segments of this turn, with their audio, so prosody runs on
            past.append(PastTurn(s.speaker, s.text, np.concatenate(s.codes, axis=1) if s.codes else None))
        return past


def _sampling_to_wire(s: Sampling) -> dict[str, Any]:
    return {name: getattr(s, name) for name in Sampling.__dataclass_fields__}


async def _wait_drained(queue: asyncio.Queue[Any], writer: asyncio.Task[Any], timeout_s: float) -> None:
    join = asyncio.create_task(queue.join())
    await asyncio.wait([join, writer], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    join.cancel()
