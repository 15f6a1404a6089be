"""The WebSocket shell around the sans-I/O turn machine: one ``Connection`` per socket, a task group around it.

    receive ──► TurnMachine (pure: every turn's state) ──jobs──► synthesize ──► engine ──► encoder
       │              │        ▲                                                            │
       │              │        └──── chunks, packets, turn.done sent, store results ────────┤
       └── control ───┴──────────────────► Outbox (control first) ◄────── paced audio ──────┘
                                                │
                                              send ──► socket            write ──► store (in order, retried)

The receive task never waits on synthesis, so ``cancel`` and ``ping`` are answered at once; it waits only for
room in the control lane, so a client that does not read its answers is not read either. The synthesize task
pulls audio from the engine only as fast as pacing allows (``lead_ms`` ahead of the client's playback clock), so
the engine is throttled to real time and a cancelled turn stops costing compute. The connection keeps no turn
state: what a turn is, sent, heard and stored lives in ``realtime.turns.TurnMachine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import io
import os
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from starlette.websockets import WebSocketDisconnect, WebSocketState

from engine.alignment import Aligner
from engine.base import AudioChunk, EngineError, Sampling, SynthesisRequest, Synthesizer, VoiceRef
from realtime import vad
from realtime.audio import AudioEncoder, OutputFormat, pcm16_to_float, read_audio_bytes, write_ogg_opus
from realtime.auth import AuthError, Principal, credential
from realtime.caller import CallLink, InputFormat, InputStream
from realtime.config import ServerConfig
from realtime.liveness import ReadProbe
from realtime.mix import Mixer
from realtime.socket import Socket  # WebSocket, or an adapter's VirtualSocket
from realtime.metrics import Metrics
from realtime.outbox import Close, Outbox, OutboxFull
from realtime.quotas import Hold, QuotaExceeded, Quotas
from realtime.voices import with_codes
from realtime.turns import Finish, Job, Output, Send, Stop, Stream, Synthesize, TurnMachine, Write
from realtime.vad import VAD_RATE
from realtime.protocol import (
    Audio,
    Cancel,
    ClientMessage,
    Encoding,
    Error,
    Flush,
    InputAudio,
    InputCommit,
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
    SpeechStarted,
    SpeechStopped,
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
from sessions.store import SessionStore, StoreError, VoiceQuotaExceeded, WriteRejected

log = logging.getLogger("shoal.gateway")

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_BUSY = 4409  # application code: the session is live on another connection
READY_HISTORY_TURNS = 50  # turns of text session.ready carries on resume
VOICE_AUDIO_BITRATE = 24000  # the stored reference audio: Ogg/Opus (engines use the codes; this is the record)


class Gateway:
    """Shared state of one server process: engine, store, metrics, open connections, shutdown."""

    def __init__(self, config: ServerConfig, engine: Synthesizer, store: SessionStore, metrics: Metrics,
                 aligner: Aligner | None = None) -> None:
        self.config = config
        self.engine = engine
        self._aligner = aligner  # estimates word timing for engines without it
        self.store = store
        self.metrics = metrics
        self.connections: set[Connection] = set()
        self.accepting = True
        # resampling + Opus encoding for every connection: off the event loop, on the other cores
        self.codec_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="codec"
        )
        self.quotas = Quotas(config.limits)
        self.voice_slots = asyncio.Semaphore(config.limits.voice_creates_at_once)  # uploads decoded at once

    @property
    def aligner(self) -> Aligner | None:
        """The aligner in use: only for an engine without timing of its own (a pool learns its engine at start)."""
        return None if self.engine.info.timing else self._aligner

    async def start_aligner(self) -> None:
        """Start the aligner if the engine needs one; if it cannot start, word timing is off (said once)."""
        if self.aligner is None:
            return
        try:
            await self.aligner.start()
        except EngineError as exc:
            log.warning("no word timing for the %s engine: the aligner did not start: %s", self.engine.info.name, exc)
            self._aligner = None

    async def close_aligner(self) -> None:
        if self._aligner is not None:
            await self._aligner.aclose()

    @property
    def timing(self) -> str:
        """Word timing as session.ready tells it: exact (from the engine), estimated (an aligner's) or none."""
        return "exact" if self.engine.info.timing else "estimated" if self.aligner is not None else "none"

    def principal(self, ws: Socket) -> Principal:
        """Who the socket acts for. Raises ``AuthError``."""
        return self.config.keys.authenticate(credential(ws.headers, ws.query_params))

    def live_connection(self, session: str, principal: Principal) -> Connection | None:
        """The connection that has ``principal``'s tenant's ``session`` live in this process, if any."""
        if principal.session not in (None, session):
            return None
        return next((c for c in self.connections if c.session is not None and c.session.id == session
                     and c.principal.tenant == principal.tenant), None)

    async def serve(self, ws: Socket) -> None:
        if not self.config.origin_policy.allows(ws.headers.get("origin"), ws.headers.get("host")):
            await ws.close(CLOSE_POLICY)  # before accept: the handshake is answered 403
            return
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


class _Gone(Exception):
    """The connection is over: the client left, or the server closed it."""


class Connection:
    """One socket. Holds no turn state of its own: the ``TurnMachine`` owns every turn; this class pumps it."""

    def __init__(self, gateway: Gateway, ws: Socket) -> None:
        self.gw = gateway
        self.ws = ws
        self.limits = gateway.config.limits
        self.owner = uuid.uuid4().hex
        self.encoding = Encoding.MSGPACK
        self.outbox = Outbox(self.limits.audio_queue_packets, self.limits.control_queue_messages)
        self.session: Session | None = None
        self.output = OutputFormat()
        self.sampling = Sampling()
        self.machine: TurnMachine | None = None
        self.principal = Principal()
        self.store = gateway.store  # the tenant's view, once authenticated
        self._holds: list[Hold] = []  # quota counts (connection, session) released at the end
        self.voices: dict[str, VoiceRef] = {}  # the session's speakers' voices (codes), never the audio
        self.clocks: dict[str, _PlaybackClock] = {}  # per context: each is paced on its own listener's clock
        self.probe: ReadProbe | None = None
        self._task: asyncio.Task[Any] | None = None
        self._live: asyncio.TaskGroup | None = None
        self._writes = asyncio.Event()  # the machine has a record to store
        self._workers: dict[str, asyncio.Task[None]] = {}  # per context with work: its synthesis task
        self._current: dict[int, asyncio.Task[None]] = {}  # per turn being synthesized: the job's task
        self._encoders: dict[int, AudioEncoder] = {}  # per turn being synthesized: a resource, not turn state
        self.mixer: Mixer | None = None  # output.mix: one stream for all contexts
        self._mix_task: asyncio.Task[None] | None = None
        self._mix_wake = asyncio.Event()
        self._mix_clock = _PlaybackClock()  # the listener of the mixed stream
        self._mix_seq = 0  # packets of the mixed stream
        self._mix_turns: dict[int, tuple[int, ...]] = {}  # mixed packet seq -> the turns in it (until it is sent)
        self._closing = False
        self._drain_until = 0.0
        self._lost_counted = 0  # finished turns reported as not stored
        self._send_started: float | None = None  # when the frame being sent was handed to the socket
        self._last_received = time.monotonic()
        self.input: InputFormat | None = None  # the caller's audio settings (input), once set
        self.caller: InputStream | None = None  # ... its stream: clock, voice activity, recent audio
        self.call: CallLink | None = None  # a phone call joined to this session: it hears the audio, it is the input
        self._turn_start: dict[int, float] = {}  # turn -> its first packet's place on its context's clock (ms)

    @property
    def sid(self) -> str:
        return self.session.id if self.session is not None else "-"

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Accept, then run receive / send / synthesize / watchdog (and the lease, once started) as one task
        group, with the store writer around it. A task that fails ends the group: logged once with the session
        id, the client gets ``error internal`` (fatal) and a close, and everything is released."""
        self._task = asyncio.current_task()
        await self.ws.accept()
        try:
            self.principal = self.gw.principal(self.ws)
        except AuthError as exc:
            await self._refuse("unauthorized", str(exc), CLOSE_POLICY)
            return
        self.store = self.gw.store.scoped(self.principal.namespace)
        if not self.gw.accepting:
            await self._refuse("internal", "server is shutting down; reconnect later", CLOSE_GOING_AWAY)
            return
        try:
            self._holds.append(self.gw.quotas.hold("connections", self.principal.tenant, self.address))
        except QuotaExceeded as exc:
            await self._refuse("quota", str(exc), CLOSE_POLICY)
            return
        self.probe = ReadProbe.of(self.ws.scope)
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._write_loop(), name="write")
                try:
                    async with asyncio.TaskGroup() as live:
                        self._live = live
                        live.create_task(self._receive_loop(), name="receive")
                        live.create_task(self._send_loop(), name="send")
                        live.create_task(self._watchdog(), name="watchdog")
                except* _Gone:
                    pass
                finally:
                    self._live = None
                    await self._wind_down(writer)
        except* _Gone:
            pass
        except* Exception as eg:
            failure = eg
        finally:
            await self._release(failure)
            for hold in self._holds:
                hold.release()

    @property
    def address(self) -> str:
        client = self.ws.scope.get("client")
        return str(client[0]) if client else "-"

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
        await self._send_now(Error(code=code, message=message, fatal=True), encoding, close_code)

    async def _send_now(self, msg: ServerMessage, encoding: Encoding, close_code: int) -> None:
        """Send one message straight to the socket and close it (refusals, failures): bounded, never raises."""
        frame = encode(msg, encoding)
        try:
            async with asyncio.timeout(2.0):
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                elif frame is not None:
                    await self.ws.send_text(frame)
                await self.ws.close(close_code)
        except (WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            pass  # the client left first (or does not read): nothing more to tell it

    async def _wind_down(self, writer: asyncio.Task[None]) -> None:
        """The socket is done: finish every turn as cut where sending stopped, then give the writer a bounded
        time (``store_drain_s``: long enough for the embedded Redis to restart) to store what is left."""
        self._closing = True
        self.outbox.close()
        if self.machine is not None:
            for turn, reason in self.machine.close(time.monotonic()):
                self.gw.metrics.turns.labels(reason).inc()
        self._drain_until = time.monotonic() + self.limits.store_drain_s
        self._writes.set()
        done, _ = await asyncio.wait([writer], timeout=self.limits.store_drain_s + 2.0)
        if not done:
            writer.cancel()

    async def _release(self, failure: BaseException | None) -> None:
        if failure is not None:
            unstored = 0 if self.machine is None else max(0, self.machine.unstored - self._lost_counted)
            self._lost_counted += unstored
            self.gw.metrics.store_turns_lost.inc(unstored)
            log.error("session %s: connection failed (%d finished turns not stored)", self.sid, unstored,
                      exc_info=failure)
            self.gw.metrics.connection_failures.inc()
            self.gw.metrics.errors.labels("internal").inc()
            await self._send_now(Error("internal", "internal server error; reconnect to resume", fatal=True),
                                 self.encoding, CLOSE_INTERNAL)
        self._report_lost("the connection ended before the store took them")  # e.g. cut off by a shutdown
        if self.call is not None:  # a joined phone call has no session to hear any more
            await self.call.end("the application's session ended")
            self.call = None
        if self.session is not None:
            try:
                await self.store.release(self.session.id, self.owner)
            except StoreError as exc:
                log.warning("session %s: could not release ownership (its lease runs out by itself): %s", self.sid, exc)
            self.gw.metrics.sessions_open.dec()  # after the lease: a session counted closed is free to resume
        if self.ws.application_state is not WebSocketState.DISCONNECTED:
            try:
                async with asyncio.timeout(2.0):
                    await self.ws.close(1000)
            except (WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
                pass  # gone, or it does not read: uvicorn's close timer ends the socket

    def going_away(self) -> None:
        """Server shutdown: stop turns, tell the client, close with 1001."""
        if self.machine is not None:
            self._apply(self.machine.cancel(None))
        self._fatal("internal", "server is shutting down; reconnect to resume the session", CLOSE_GOING_AWAY)

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # ------------------------------------------------------------------ the machine's outputs

    def _apply(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                self._send(out.message)
            elif isinstance(out, Stream):
                if self.mixer is not None and isinstance(out.message, TurnDone):
                    self.mixer.finish(out.message.turn, out.message)  # after the turn's last mixed frame
                    self._mix_wake.set()
                else:
                    self.outbox.put_stream(out.message)
            elif isinstance(out, Stop):
                self._stop(out.turns)
        self._poke()

    def _poke(self) -> None:
        machine = self.machine
        if machine is not None:
            if self._live is not None and not self._closing:
                for context in machine.job_contexts():
                    if context not in self._workers:
                        self._workers[context] = self._live.create_task(
                            self._synthesis_worker(context), name=f"synthesize-{context or 'default'}")
            if machine.has_write():
                self._writes.set()

    def _listener_cleared(self, context: str | None) -> None:
        """A ``cancel`` means the client dropped what it had buffered for ``context`` (None: everything), also when
        no turn was still being made there (the last one's audio was all sent but not yet heard): pace from zero."""
        now = time.monotonic()
        for name, clock in self.clocks.items():
            if context is None or name == (context or ""):
                clock.reset(now)
        if self.mixer is not None and context is None:  # one mixed stream: only a cancel of everything clears it
            self._mix_clock.reset(now)
        if self.call is not None:
            self.call.clear()

    def _stop(self, turns: tuple[int, ...]) -> None:
        """Barge-in: silence now (drop queued audio, stop the engine step, drop the encoder)."""
        if self.mixer is None:
            self.outbox.drop_audio(set(turns))
        for turn in turns:  # (pacing restarts in _listener_cleared, on the client's cancel)
            if self.mixer is not None:
                self.mixer.drop(turn)  # frames already mixed hold other voices too: they play on
                self._mix_wake.set()
            task = self._current.get(turn)
            if task is not None:
                task.cancel()
            self._encoders.pop(turn, None)

    # ------------------------------------------------------------------ sending

    def _send(self, msg: ServerMessage) -> None:
        if isinstance(msg, Error):
            self.gw.metrics.errors.labels(msg.code).inc()
        try:
            self.outbox.put(msg)
        except OutboxFull:
            log.warning("session %s: the client does not read its messages; dropping it", self.sid)
            self.outbox.close()

    def _error(self, exc: ProtocolError) -> None:
        if exc.fatal:
            self._fatal(exc.code, exc.message, CLOSE_BUSY if exc.code == "busy" else CLOSE_POLICY)
        else:
            self._send(exc.to_message())

    def _fatal(self, code: str, message: str, close_code: int) -> None:
        if self.machine is not None:
            self.outbox.drop_audio(set(self.machine.active_turns))
        self._send(Error(code=code, message=message, fatal=True))
        self.outbox.put_stream(Close(close_code, message[:120]))  # behind the turn.done messages already queued

    async def _send_loop(self) -> None:
        """Send in order (control first). A client that stops reading is found by the watchdog."""
        while True:
            item = await self.outbox.get()
            if item is None:
                raise _Gone
            now = time.monotonic()
            if isinstance(item, TurnDone):  # what was really sent, and TTFA, are known only now
                assert self.machine is not None
                final = self.machine.done_sent(item.turn, now)
                if final is None:
                    continue
                item = final
                self.gw.metrics.turns.labels(item.reason).inc()
                self._poke()
            self._send_started = now
            call = self.call
            try:
                if isinstance(item, Close):
                    await self.ws.close(item.code, item.reason)
                    raise _Gone
                if call is not None and isinstance(item, (Segment, TurnDone)):  # a mark where a segment ends
                    assert self.machine is not None
                    await call.boundary(item.turn, self.machine.sent_ms(item.turn))
                if call is not None and isinstance(item, Audio):
                    await call.send_audio(item)  # a joined call is the listener: the application gets the rest
                    frame = None
                else:
                    frame = encode(item, self.encoding)
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                elif frame is not None:
                    await self.ws.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                raise _Gone from None  # the peer is gone
            finally:
                self._send_started = None
            if isinstance(item, Audio):
                assert self.machine is not None
                now = time.monotonic()
                for turn in self._mix_turns.pop(item.seq, ()) if self.mixer is not None else (item.turn,):
                    ttfa_ms = self.machine.packet_sent(turn, now)
                    if ttfa_ms is not None:
                        self.gw.metrics.ttfa.observe(ttfa_ms / 1000.0)
                self.gw.metrics.audio_seconds.inc(self.output.frame_ms / 1000.0)

    async def _watchdog(self) -> None:
        """One timer per connection: a client that takes no frame for ``send_timeout_s`` is told and dropped, an
        idle one told and closed; old turns are settled."""
        timeout, idle = self.limits.send_timeout_s, self.limits.idle_timeout_s
        idle_told = False
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            if self.probe is not None:
                waited = self.probe.unanswered_s()  # the client has not read up to our last ping
            else:
                started = self._send_started
                waited = 0.0 if started is None else now - started
            if waited > timeout:
                await self._drop_slow_reader(waited)
            if now - self._last_received > idle and not idle_told:
                idle_told = True
                self._fatal("limit", f"no message for {idle:.0f} s (send ping to keep alive)", 1000)
            if self.machine is not None:
                self._apply(self.machine.tick(now))
                busy = self.machine.contexts
                for context in [c for c, clock in self.clocks.items() if c not in busy and clock.ahead_ms(now) <= 0]:
                    del self.clocks[context]  # played out and idle: a client naming a new context per line stays bounded

    async def _drop_slow_reader(self, waited: float) -> None:
        log.warning("session %s: the client took no frame for %.1f s: dropping it", self.sid, waited)
        self.gw.metrics.slow_readers.inc()
        if self.machine is not None:
            self._apply(self.machine.cancel(None))
        message = f"slow reader: no message taken for {waited:.0f} s; closing"
        if self.probe is None:
            self._fatal("limit", message, CLOSE_POLICY)
            await asyncio.sleep(0.5)  # room for the error and the close frame to reach the socket
            raise _Gone
        # the send loop is held by flow control: the error and the close frame go behind what is queued
        self.gw.metrics.errors.labels("limit").inc()
        self.outbox.close()
        self.probe.send_last(encode(Error("limit", message, fatal=True), self.encoding), CLOSE_POLICY, message[:120])
        raise _Gone

    # ------------------------------------------------------------------ receiving

    async def _receive_loop(self) -> None:
        while True:
            await self.outbox.control_room()  # a client that does not read its answers is not read either
            message = await self.ws.receive()
            self._last_received = time.monotonic()
            if message["type"] == "websocket.disconnect":
                raise _Gone
            frame = message.get("bytes")
            if frame is None:
                frame = message.get("text")
            if frame is None:
                continue
            await self._on_frame(frame)
            await asyncio.sleep(0)  # a client's burst must not starve the writer and the send loop

    async def _on_frame(self, frame: bytes | str) -> None:
        size = len(frame) if isinstance(frame, bytes) else _utf8_len(frame)  # limits are in bytes, for text too
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
            log.warning("session %s: store error: %s", self.sid, exc)
            self._send(Error("internal", f"session store unavailable, try again: {exc}"))

    async def _dispatch(self, msg: ClientMessage) -> None:
        if isinstance(msg, Ping):
            self._send(Pong())
        elif isinstance(msg, SessionStart):
            await self._start(msg)
        elif isinstance(msg, Cancel) and self.call is not None:
            self._barge_in(0.0)  # one phone line: everything stops, cut where the call's marks say it was heard
        elif isinstance(msg, (Text, Flush, TurnEnd, Cancel, Playback)):
            assert self.machine is not None
            self._apply(self.machine.receive(msg))
            if isinstance(msg, Cancel):
                self._listener_cleared(msg.context)
        elif isinstance(msg, VoiceCreate):
            await self._create_voice(msg)
        elif isinstance(msg, SessionUpdate):
            await self._update(msg)
        elif isinstance(msg, InputAudio):
            if self.call is not None:
                raise ProtocolError("bad_message", "a phone call is joined to this session: the call is the input")
            await self.input_audio(msg.data)
        elif isinstance(msg, InputCommit):
            await self._commit(msg)

    # ------------------------------------------------------------------ session

    async def _start(self, msg: SessionStart) -> None:
        if self.session is not None:
            raise ProtocolError("bad_message", "session.start was already received on this connection")
        bound = self.principal.session
        if not self.principal.may("realtime"):
            raise ProtocolError("unauthorized", "this token's scopes do not include realtime (sessions)", fatal=True)
        if bound is not None and msg.session not in (None, bound):
            raise ProtocolError("unauthorized", "this token is for another session", fatal=True)
        output, sampling = self._settings(msg.output, msg.sampling, OutputFormat(), Sampling())
        input_format = await self._input_settings(msg.input)
        try:
            session_hold = self.gw.quotas.hold("sessions", self.principal.tenant, self.address)
        except QuotaExceeded as exc:
            raise ProtocolError("quota", str(exc), fatal=True) from None
        self._holds.append(session_hold)
        try:
            await self._open_session(msg, msg.session or bound, output, sampling, input_format)
        except BaseException:
            session_hold.release()
            raise

    async def _open_session(
        self, msg: SessionStart, resume: str | None, output: OutputFormat, sampling: Sampling,
        input_format: InputFormat | None,
    ) -> None:
        store = self.store
        session_id = resume or uuid.uuid4().hex
        stored = await store.load_session(session_id) if resume else None
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
            history: list[Turn] = []
            if stored is None:
                await store.create_session(session)
            else:
                await store.save_session(session)
                history = await store.load_turns(session_id)
                session.turns = len(history)
        except BaseException:
            await store.release(session_id, self.owner)
            raise
        self.session, self.output, self.sampling = session, output, sampling
        if input_format is not None:
            self.input, self.caller = input_format, InputStream(input_format)
        info = self.gw.engine.info
        self.machine = TurnMachine(
            history,
            sample_rate=info.sample_rate,
            frame_ms=info.frame_ms,
            output_frame_ms=output.frame_ms,
            max_frames=sampling.max_frames,
            limits=self.limits.turn,
        )
        self.machine.timestamps = output.timestamps
        self.gw.metrics.sessions_open.inc()
        assert self._live is not None
        self._live.create_task(self._keep_lease(), name="lease")
        self._configure_mix()
        self._send(self._ready(resumed=stored is not None))

    def _configure_mix(self) -> None:
        """Start (or stop) mixing as ``output.mix`` says; called between turns only."""
        if self._mix_task is not None:
            self._mix_task.cancel()
            self._mix_task = None
        self.mixer = None
        if self.output.mix:
            assert self._live is not None
            self.mixer = Mixer(self.output.samples_per_frame)
            self._mix_task = self._live.create_task(self._mix_loop(), name="mix")

    async def _acquire(self, session_id: str) -> bool:
        """Take the session's ownership lease. A connection that just dropped may still be storing its last
        turn: wait for it a little (``busy_wait_ms``) before answering busy, so a quick reconnect just works."""
        deadline = time.monotonic() + self.limits.busy_wait_ms / 1000.0
        while not await self.store.acquire(session_id, self.owner, self.limits.lease_ms):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _ready(self, resumed: bool) -> SessionReady:
        assert self.session is not None and self.machine is not None
        history = self.machine.history
        return SessionReady(
            session=self.session.id,
            engine={**self.gw.engine.info.to_wire(), "timing": self.gw.timing},
            output=self.output.to_wire(),
            resumed=resumed,
            turns=len(history),
            speakers=tuple(SpeakerSpec(s.speaker, s.voice) for s in self.session.speakers),
            history=tuple(
                {"turn": t.index, "speaker": t.speaker, "text": t.text, "state": t.state, "audio_ms": t.audio_ms}
                for t in history[-READY_HISTORY_TURNS:] if t is not None
            )
            or None,
            input=self.input.to_wire() if self.input is not None else None,
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
            voice = await self.store.get_voice(spec.voice)
            if voice is None:
                raise ProtocolError(
                    "bad_message", f"speaker {spec.speaker}: voice {spec.voice!r} is not registered (send voice.create)"
                )
            voice = await with_codes(voice, self.gw.engine, self.store)  # encoded once if it has no codes yet
            self.voices[spec.voice] = VoiceRef(voice=voice.voice, text=voice.text, codes=voice.codes)

    async def _update(self, msg: SessionUpdate) -> None:
        assert self.session is not None and self.machine is not None
        if self.machine.active_turns:
            raise ProtocolError("bad_message", "session.update is only accepted between turns")
        output, sampling = self._settings(msg.output, msg.sampling, self.output, self.sampling)
        if msg.speakers is not None:
            await self._load_voices(list(msg.speakers))
            self.session.speakers = [Speaker(s.speaker, s.voice) for s in msg.speakers]
            used = {s.voice for s in msg.speakers}
            self.voices = {v: ref for v, ref in self.voices.items() if v in used}
        if self.call is not None and msg.output is not None:
            raise ProtocolError("bad_message", "a phone call is joined to this session: its output is the call's")
        input_format = await self._input_settings(msg.input)
        if input_format is not None:
            self.input, self.caller = input_format, InputStream(input_format)
        self.output, self.sampling = output, sampling
        self.machine.configure(output_frame_ms=output.frame_ms, max_frames=sampling.max_frames,
                               timestamps=output.timestamps)
        self._configure_mix()
        self.session.output, self.session.sampling = output.to_wire(), _sampling_to_wire(sampling)
        await self.store.save_session(self.session)
        self._send(self._ready(resumed=True))

    async def _keep_lease(self) -> None:
        assert self.session is not None
        period = self.limits.lease_ms / 3000.0
        while True:
            await asyncio.sleep(period)
            try:
                ok = await self.store.refresh(self.session.id, self.owner, self.limits.lease_ms)
                if not ok and not await self.store.acquire(self.session.id, self.owner, self.limits.lease_ms):
                    if self.machine is not None:
                        self._apply(self.machine.cancel(None))
                    self._fatal("busy", "another connection took over this session", CLOSE_BUSY)
                    return
            except StoreError as exc:
                log.warning("session %s: lease refresh failed: %s", self.sid, exc)

    # ------------------------------------------------------------------ voices

    async def _create_voice(self, msg: VoiceCreate) -> None:
        if not self.principal.may("voices"):
            raise ProtocolError("unauthorized", "this token's scopes do not include voices (voice.create)")
        try:
            self.gw.quotas.voice_create(self.principal.tenant)
        except QuotaExceeded as exc:
            raise ProtocolError("quota", str(exc)) from None
        async with self.gw.voice_slots:  # a few uploads decoded at once: peak memory stays bounded
            voice, frames = await self._encode_voice(msg)
        limits = self.limits
        try:
            await self.store.put_voice(voice, max_count=limits.voices_per_tenant, max_bytes=limits.voice_bytes_per_tenant)
        except VoiceQuotaExceeded as exc:
            quota = "voices_per_tenant" if exc.reason == "voice_count" else "voice_bytes_per_tenant"
            raise ProtocolError("quota", f"quota {quota}: {exc}; replace or let expire a voice first") from None
        if voice.voice in self.voices:  # a speaker of this session uses it: speak with the new one
            self.voices[voice.voice] = VoiceRef(voice=voice.voice, text=voice.text, codes=voice.codes)
        self.gw.metrics.voices.inc()
        self._send(VoiceCreated(voice=voice.voice, seconds=voice.seconds, frames=frames))

    async def _encode_voice(self, msg: VoiceCreate) -> tuple[Voice, int]:
        """The upload as a voice record: its codes (engines clone from these) and its audio compressed (Ogg/Opus)."""
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
        ogg = io.BytesIO()
        await loop.run_in_executor(self.gw.codec_pool, write_ogg_opus, ogg, pcm, rate, VOICE_AUDIO_BITRATE)
        voice = Voice(
            voice=msg.voice or f"v-{uuid.uuid4().hex[:16]}",
            text=msg.text,
            seconds=round(seconds, 3),
            sample_rate=48000,  # Ogg/Opus decodes at 48 kHz
            audio=ogg.getvalue(),
            codes=codes,
            audio_format="ogg-opus",
        )
        return voice, int(codes.shape[-1]) if codes is not None else 0

    # ------------------------------------------------------------------ the caller's side

    async def _input_settings(self, wire: Mapping[str, Any] | None) -> InputFormat | None:
        """``input`` in session.start / session.update, checked (and its model loaded) before anything changes; a
        new input stream follows, its clock starting again at 0."""
        if wire is None:
            return None
        if self.call is not None:
            raise ProtocolError("bad_message", "a phone call is joined to this session: its input is the call's")
        try:
            fmt = InputFormat.from_wire(wire, self.input)
        except ValueError as exc:
            raise ProtocolError("bad_message", f"input: {exc}") from None
        assert fmt is not None
        if fmt.vad:
            try:
                await asyncio.get_running_loop().run_in_executor(self.gw.codec_pool, vad.load)
            except vad.VadUnavailable as exc:
                raise ProtocolError("engine_unavailable", f"input.vad: voice activity detection is unavailable "
                                    f"here ({exc}); send input.vad off") from None
        return fmt

    async def input_audio(self, data: bytes) -> None:
        """One frame of the caller's audio (from the client, or from a joined call): voice activity events, and a
        barge-in when the caller starts speaking over a turn."""
        if self.caller is None or self.input is None:
            raise ProtocolError("bad_message", "input.audio before input was set: send input {codec, sample_rate} "
                                "in session.start or session.update")
        caller = self.caller
        try:
            events = await asyncio.get_running_loop().run_in_executor(self.gw.codec_pool, caller.push, data)
        except ValueError as exc:
            raise ProtocolError("bad_message", f"input.audio: {exc}") from None
        for kind, ms in events:
            if kind == "started":
                self._send(SpeechStarted(ms))
                if self.input.barge_in:
                    self._barge_in((caller.ms - ms) / 1000.0, by_voice=True)
            else:
                self._send(SpeechStopped(ms))

    def _barge_in(self, ago_s: float, by_voice: bool = False) -> None:
        """The caller started speaking ``ago_s`` seconds ago: every turn still playing is cancelled and cut where
        the listener was then (a joined call's mark echoes, else the pacing clock), and the listener's buffer
        dropped."""
        machine = self.machine
        if machine is None:
            return
        now = time.monotonic()
        cut: list[tuple[int, float]] = []
        for turn in machine.audible_turns():
            heard = self._heard_ms(turn, now, ago_s)
            if heard is not None:
                cut.append((turn, heard))
        if not cut:
            return
        for turn, heard in cut:
            with contextlib.suppress(ProtocolError):  # a turn already too old to cut
                self._apply(machine.receive(Playback(turn=turn, played_ms=heard)))
        self._apply(machine.barge_in() if by_voice else machine.cancel(None))
        self._listener_cleared(None)
        log.info("session %s: %s turns %s: cut at %s ms", self.sid, "the caller spoke over" if by_voice else "cancel:",
                 [t for t, _ in cut], [round(h) for _, h in cut])

    def _heard_ms(self, turn: int, now: float, ago_s: float) -> float | None:
        """How much of ``turn`` the listener had heard ``ago_s`` seconds before ``now``; None if it was not playing
        then (all of it heard already)."""
        assert self.machine is not None
        sent = self.machine.sent_ms(turn)
        in_flight = turn in self.machine.active_turns
        if self.call is not None:
            heard = self.call.heard_ms(turn, now - ago_s)
            if heard is not None:
                return min(heard, sent) if in_flight or heard < sent else None
        start = self._turn_start.get(turn)
        clock = self.clocks.get(self.machine.context_of(turn))
        if start is None or clock is None:
            return 0.0 if in_flight else None  # nothing of it has reached the listener yet
        clock.advance(now)
        heard = min(sent, max(0.0, clock.pos_ms - ago_s * 1000.0 - start))
        return heard if in_flight or heard < sent else None

    async def _commit(self, msg: InputCommit) -> None:
        """``input.commit``: what the caller said becomes a turn of its speaker, with the codes of its audio when
        the engine can encode them (S2 Pro), so the next reply's prompt holds both sides of the dialogue."""
        if self.caller is None or self.machine is None:
            raise ProtocolError("bad_message", "input.commit before input was set")
        try:
            pcm = self.caller.audio(msg.start_ms, msg.end_ms)
        except ValueError as exc:
            raise ProtocolError("bad_message", str(exc)) from None
        codes = None
        if self.gw.engine.info.cloning:
            try:
                codes = await self.gw.engine.encode_voice(pcm, VAD_RATE, msg.text)
            except (EngineError, ValueError) as exc:
                log.warning("session %s: input.commit: the caller's audio was not encoded: %s", self.sid, exc)
                self._send(Error("engine_unavailable", f"input.commit: the caller's audio could not be encoded "
                                 f"({exc}); the turn is stored with its text only"))
        self.machine.caller_turn(msg.speaker, msg.text, msg.end_ms - msg.start_ms, codes)
        self._poke()

    def attach_call(self, call: CallLink) -> None:
        """A phone call joins this session: from now on it hears the session's audio (its output format) and its
        caller is the input. A turn in flight is cut: its audio was made for the other listener."""
        if self.call is not None:
            raise ProtocolError("busy", "another call is already joined to this session")
        if self.machine is not None and self.machine.active_turns:
            self._apply(self.machine.cancel(None))
            self._listener_cleared(None)
        self._before_call = (self.output, self.input, self.caller)
        self.call = call
        self.output = replace(self.output, **call.output, mix=False)
        self.input = call.input
        self.caller = InputStream(call.input)
        if self.machine is not None:
            self.machine.configure(output_frame_ms=self.output.frame_ms, max_frames=self.sampling.max_frames,
                                   timestamps=self.output.timestamps)
        self._configure_mix()

    def detach_call(self, call: CallLink) -> None:
        """The call ended: the session's own output and input settings come back."""
        if self.call is not call:
            return
        if self.machine is not None and self.machine.active_turns:
            self._apply(self.machine.cancel(None))
        self.call = None
        self.output, self.input, self.caller = self._before_call
        self._listener_cleared(None)
        if self.machine is not None:
            self.machine.configure(output_frame_ms=self.output.frame_ms, max_frames=self.sampling.max_frames,
                                   timestamps=self.output.timestamps)
        self._configure_mix()

    def notify(self, msg: ServerMessage) -> None:
        """A call's event for the application (call.started, input.dtmf, relayed input.audio, call.stopped)."""
        self._send(msg)

    # ------------------------------------------------------------------ synthesis

    async def _synthesis_worker(self, context: str) -> None:
        """Run one context's jobs one at a time, until it has none (``_poke`` starts it again when it has). A
        barge-in cancels the job of its turn (``_stop``); contexts run side by side, each in a task like this."""
        machine = self.machine
        assert machine is not None
        try:
            while (job := machine.next_job(context)) is not None:
                task = asyncio.create_task(self._run_job(job), name=f"turn-{job.turn}")
                self._current[job.turn] = task
                try:
                    await asyncio.wait([task])
                finally:
                    del self._current[job.turn]
                    if not task.done():
                        task.cancel()  # this worker was cancelled (the connection is ending)
                exc = None if task.cancelled() else task.exception()
                if isinstance(job, Synthesize):
                    error = None
                    if isinstance(exc, EngineError):
                        error = str(exc)
                        log.warning("session %s: turn %d segment %d: engine failed: %s", self.sid, job.turn,
                                    job.segment, exc)
                    elif exc is not None:
                        log.error("session %s: turn %d segment %d failed", self.sid, job.turn, job.segment, exc_info=exc)
                        error = f"internal error ({type(exc).__name__}); the turn ends here"
                    if self.mixer is not None:
                        self.mixer.rest(job.turn)  # until its next segment speaks, no mixed slot waits for it
                    self._apply(machine.segment_finished(job.turn, job.segment, error))
                else:
                    if exc is not None:
                        raise exc
                    self._apply(machine.audio_finished(job.turn))
        finally:
            if self._workers.get(context) is asyncio.current_task():
                del self._workers[context]

    async def _run_job(self, job: Job) -> None:
        if isinstance(job, Finish):
            encoder = self._encoders.pop(job.turn, None)
            if encoder is not None:
                await self._emit(job.turn, await self._encode(lambda _: encoder.flush(), np.zeros(0, np.float32)))
            return
        assert self.session is not None and self.machine is not None
        machine, info = self.machine, self.gw.engine.info
        encoder = self._encoders.get(job.turn)
        if encoder is None:
            # with mix, each turn is cut into PCM frames at the output rate; the mixer encodes their sum
            fmt = replace(self.output, codec="pcm16") if self.mixer is not None else self.output
            encoder = self._encoders[job.turn] = AudioEncoder(fmt, info.sample_rate)
        max_frames = self.sampling.max_frames
        if job.max_samples is not None and info.frame_ms is not None:
            per_frame = round(info.frame_ms * info.sample_rate / 1000.0)
            max_frames = max(1, min(max_frames, -(-job.max_samples // per_frame)))
        request = SynthesisRequest(
            text=job.text,
            speaker=job.speaker,
            voices=self._voice_refs(),
            history=machine.past(job.turn),
            sampling=replace(self.sampling, max_frames=max_frames),
            session=self.session.id,
        )
        aligner = self.gw.aligner
        timed = info.timing or aligner is not None
        # with output.timestamps the segment's words go out before its first packet: its audio waits for them
        hold = self.output.timestamps != "none" and timed
        held: list[AudioChunk] = []
        made: list[np.ndarray] = []  # the segment's audio, for the aligner
        complete = False
        stream = self.gw.engine.synthesize(request)
        try:
            async for chunk in stream:
                if chunk.timing is not None and not complete:
                    complete = chunk.timing.complete
                    for msg in machine.segment_timing(job.turn, job.segment, chunk.timing):
                        await self.outbox.put_audio(msg)
                if aligner is not None:
                    made.append(chunk.pcm)
                if hold and not complete:
                    held.append(chunk)
                    continue
                for ready in (*held, chunk):
                    await self._chunk(job, encoder, ready)
                held.clear()
                if not machine.wants_audio(job.turn):
                    break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if aligner is not None and not complete and made and machine.live(job.turn):
            try:
                timing = await aligner.align(job.text, job.speaker, np.concatenate(made), info.sample_rate)
            except EngineError as exc:  # the turn goes on without word timing for this segment
                log.warning("session %s: turn %d segment %d: no word timing: %s", self.sid, job.turn, job.segment, exc)
                timing = None
            if timing is not None:
                for msg in machine.segment_timing(job.turn, job.segment, timing):
                    await self.outbox.put_audio(msg)
        for ready in held:  # the segment ended before its timing was complete
            await self._chunk(job, encoder, ready)
            if not machine.wants_audio(job.turn):
                break

    async def _chunk(self, job: Synthesize, encoder: AudioEncoder, chunk: AudioChunk) -> None:
        """One engine chunk of a segment onto the wire: its samples kept (max_frames), its ``segment`` message
        first, then its packets."""
        assert self.machine is not None
        keep, announce = self.machine.segment_audio(job.turn, job.segment, len(chunk.pcm), chunk.codes)
        if announce is not None:
            await self.outbox.put_audio(announce)
        if keep:
            pcm = chunk.pcm if keep == len(chunk.pcm) else chunk.pcm[:keep]
            await self._emit(job.turn, await self._encode(encoder.push, pcm))

    async def _encode(self, fn: Callable[[np.ndarray], list[bytes]], pcm: np.ndarray) -> list[bytes]:
        """Resample + encode one engine chunk: off the event loop (libopus and libsoxr release the GIL, so another
        core works too), or on it with ``ServerConfig.encode_on_loop`` (cheaper when each core has a process)."""
        if self.gw.config.encode_on_loop:
            return fn(pcm)
        return await asyncio.get_running_loop().run_in_executor(self.gw.codec_pool, fn, pcm)

    async def _emit(self, turn: int, packets: list[bytes]) -> None:
        """Queue one engine chunk's packets, never more than ``lead_ms`` (plus the last packet) ahead of the client's
        playback clock. One wait per chunk, until all of its packets fit, then all of them at once: no timer and no
        wake-up per packet (the send loop takes them in one wake-up too). The bound is the same as waiting before each
        packet; the chunk's first packets leave at most (packets - 1) frames later, out of a lead of 1.5 s."""
        assert self.machine is not None
        if not packets:
            return
        frame_ms = self.output.frame_ms
        room = max(0.0, self.output.lead_ms - (len(packets) - 1) * frame_ms)
        context = self.machine.context_of(turn)
        clock = self.clocks.get(context)
        if clock is None:
            clock = self.clocks[context] = _PlaybackClock()
        ahead = clock.ahead_ms(time.monotonic())
        if ahead > room:
            await asyncio.sleep((ahead - room) / 1000.0)
        for data in packets:
            msg = self.machine.packet(turn, data)
            if msg is None:  # a barge-in while this step was pacing or encoding: nothing more of it goes out
                raise asyncio.CancelledError
            if msg.seq == 0:  # where the turn starts on its listener's clock: a voice barge-in cuts it there
                self._turn_start[turn] = clock.sent_ms
                for old in sorted(self._turn_start)[:-64]:
                    del self._turn_start[old]
            if self.mixer is not None:
                self.mixer.push(turn, pcm16_to_float(data))
                self._mix_wake.set()
            elif not self.outbox.try_put_audio(msg):
                await self.outbox.put_audio(msg)
            clock.sent_ms += frame_ms

    async def _mix_loop(self) -> None:
        """``output.mix``: sum the turns in flight into one stream, paced on one listener's clock. A slot waits for
        a slower voice while the listener has more than two frames buffered, then goes without it."""
        assert self.mixer is not None
        mixer, fmt = self.mixer, self.output
        clock = self._mix_clock = _PlaybackClock()
        encoder = AudioEncoder(fmt, fmt.sample_rate)
        while True:
            if not mixer.pending():
                self._mix_wake.clear()
                await self._mix_wake.wait()
                continue
            ahead = clock.ahead_ms(time.monotonic())
            if ahead > fmt.lead_ms:
                await asyncio.sleep((ahead - fmt.lead_ms) / 1000.0)
                continue
            spare = ahead - 2 * fmt.frame_ms
            if not mixer.ready() and spare > 0:
                self._mix_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._mix_wake.wait(), spare / 1000.0)
                continue
            pcm, turns, dones = mixer.pop()
            if pcm is not None:
                for data in await self._encode(encoder.push, pcm):
                    msg = Audio(turn=min(turns), seq=self._mix_seq, ms=round(self._mix_seq * fmt.frame_ms, 3),
                                data=data)
                    self._mix_turns[self._mix_seq] = turns
                    self._mix_seq += 1
                    if not self.outbox.try_put_audio(msg):
                        await self.outbox.put_audio(msg)
                    clock.sent_ms += fmt.frame_ms
            for done in dones:
                self.outbox.put_stream(done)

    # ------------------------------------------------------------------ the store

    async def _write_loop(self) -> None:
        """Store what the machine remembers, in order. A failed write is retried as it was (the store
        recognises a retry of a write that did happen); the client is told once per outage. On close, writes
        go on until ``store_drain_s`` has passed; what is still unstored then is logged as lost."""
        pending: Write | None = None
        delay = 0.1
        failing = False
        while True:
            if pending is None and self.machine is not None:
                pending = self.machine.next_write()
            if pending is None:
                if self._closing:
                    return
                self._writes.clear()
                await self._writes.wait()
                continue
            assert self.session is not None and self.machine is not None
            try:
                if pending.op == "append":
                    await self.store.append_turn(self.session.id, pending.turn)
                else:
                    await self.store.amend_turn(self.session.id, pending.turn)
            except WriteRejected as exc:  # Redis answered no (the session expired, or another writer): final
                self._report_lost(f"the store refused turn {pending.turn.index} ({exc.reason}): {exc}")
                self._send(Error("internal", f"turn {pending.turn.index} could not be stored ({exc}); this "
                                             "connection stores no more turns: reconnect to resume"))
                return
            except StoreError as exc:
                self.gw.metrics.store_writes_retried.inc()
                if not failing:
                    failing = True
                    log.warning("session %s: turn %d not stored yet, retrying: %s", self.sid, pending.turn.index, exc)
                self._apply(self.machine.write_failed(pending, str(exc)))
                if self._closing and time.monotonic() > self._drain_until:
                    self._report_lost(f"{exc}")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if failing:
                log.warning("session %s: the store is back; turn %d stored", self.sid, pending.turn.index)
            failing, delay = False, 0.1
            self.machine.write_ok(pending)
            pending = None

    def _report_lost(self, why: str) -> None:
        """Finished turns this connection will not store: counted and logged, with the session id (again only if
        more were lost since, e.g. turns finished after a refused write)."""
        if self.machine is None or self.machine.unstored <= self._lost_counted:
            return
        lost, new = self.machine.unstored, self.machine.unstored - self._lost_counted
        self._lost_counted = lost
        self.gw.metrics.store_turns_lost.inc(new)
        log.error("session %s: %d finished turns (from turn %d on) are not stored: %s",
                  self.sid, lost, self.machine.stored, why)

    def _voice_refs(self) -> dict[int, VoiceRef]:
        assert self.session is not None
        refs: dict[int, VoiceRef] = {}
        for s in self.session.speakers:
            ref = self.voices.get(s.voice) if s.voice else None
            if ref is not None:
                refs[s.speaker] = ref
        return refs


def _sampling_to_wire(s: Sampling) -> dict[str, Any]:
    return {name: getattr(s, name) for name in Sampling.__dataclass_fields__}


def _utf8_len(text: str) -> int:
    """A text frame's size in bytes (what arrived on the wire), without encoding frames that are surely small."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
