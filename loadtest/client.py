"""One simulated session: a conversation over protocol v1, paced in real time, every event recorded.

Two tasks per session: the *speaker* sends each turn's tokens at the configured rate, ends the turn, waits for
``turn.done``, lets the listener hear the rest, pauses, and goes on; the *reader* takes every server message,
records it and feeds the turn's :class:`~loadtest.player.Player`. A third, short-lived task barges in when the
plan says so (``cancel`` once enough audio was heard, then ``playback`` with what was heard). Every wait is
bounded by a timeout and the whole session by the run's hard deadline.

With ``contexts`` > 1 the session runs one speaker task per context, all at once (their first turns are sent
together): each context sends its own turns with ``context`` on ``text`` / ``turn.end`` / ``cancel`` /
``playback``, has its own player per turn and its own barge-ins. The reader routes the server's messages by
turn index (bound to a context by its ``turn.started``). A turn's session-wide index ``k`` is allocated when its
first ``text`` goes out, under a lock, so the server (which numbers turns in the order their first text arrives)
gives it the same index; the statistics step checks that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from loadtest.config import SwarmConfig
from loadtest.player import Player
from loadtest.record import Recorder
from loadtest.script import TurnPlan, session_speakers, turn_plan
from realtime.protocol import (
    Cancel,
    ClientMessage,
    Encoding,
    Ping,
    Playback,
    ProtocolError,
    SessionStart,
    SpeakerSpec,
    Text,
    TurnEnd,
    decode_server,
    encode,
    to_wire,
)


def frame(msg: ClientMessage, context: str | None = None) -> bytes:
    """One binary frame; ``context`` (when given) is added to the map. Without it: exactly ``encode``'s bytes."""
    if context is None:
        data = encode(msg, Encoding.MSGPACK)
        assert isinstance(data, bytes)
        return data
    wire = to_wire(msg)
    wire["context"] = context
    return msgpack.packb(wire, use_bin_type=True)


@dataclass
class Live:
    """Counters for the progress display (the statistics come from the raw events, not from here)."""

    open: int = 0
    connected: int = 0
    turns: int = 0
    audio_ms: float = 0.0
    underruns: int = 0
    errors: int = 0
    ttfa_ms: list[float] = field(default_factory=list)  # server-reported, recent turns


@dataclass
class TurnState:
    plan: TurnPlan
    player: Player
    k: int | None = None  # the session-wide turn index, allocated when its first text is sent
    server_turn: int | None = None
    first_audio: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # its turn.end was sent: all its text is out
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


class SimSession:
    def __init__(self, sid: int, config: SwarmConfig, rec: Recorder, live: Live, hard_stop: float) -> None:
        self.sid = sid
        self.config = config
        self.rec = rec
        self.live = live
        self.hard_stop = hard_stop  # recorder time at which everything stops
        self.ws: ClientConnection | None = None
        self.frame_ms = float(config.frame_ms)
        self.ready = asyncio.Event()
        self.session_id: str | None = None  # from session.ready
        self.closed = asyncio.Event()
        self.current: dict[str | None, TurnState] = {}  # context -> its turn now
        self.by_turn: dict[int, TurnState] = {}  # server turn index -> turn, from turn.started to turn.done
        self._pongs: deque[asyncio.Future[None]] = deque()  # pings in flight, oldest first (answered in order)
        self._first_send = asyncio.Lock()  # a turn's index and its first text go out together
        self._next_k = 0

    # ------------------------------------------------------------------ entry

    async def run(self, start_at: float) -> None:
        """Connect at ``start_at`` (recorder time), converse until the run's duration is over, close."""
        await asyncio.sleep(max(0.0, start_at - self.rec.now()))
        why = "done"
        try:
            async with asyncio.timeout(max(0.0, self.hard_stop - self.rec.now())):
                why = await self._run()
        except TimeoutError:
            why = "timeout"
            self._error("timeout", "the run's hard deadline passed with this session still busy")
        finally:
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(), 2.0)
                self.live.open -= 1
            self.rec.event("close", self.rec.now(), self.sid, why)

    async def _run(self) -> str:
        config = self.config
        self.rec.event("conn", self.rec.now(), self.sid)
        self.ws = await self.open(config.url)
        if self.ws is None:
            return "error"
        self.live.open += 1
        self.live.connected += 1
        self.rec.event("open", self.rec.now(), self.sid)
        reader = asyncio.create_task(self._reader(), name=f"reader-{self.sid}")
        try:
            return await self._converse()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def open(self, url: str) -> ClientConnection | None:
        """A WebSocket to ``url`` with the run's settings; None (an error recorded) if it cannot be opened."""
        config = self.config
        try:
            return await asyncio.wait_for(
                connect(
                    url,
                    compression="deflate" if config.compression else None,
                    max_size=None,
                    ping_interval=None,
                    proxy=None,
                    open_timeout=config.connect_timeout_s,
                    close_timeout=2.0,
                ),
                config.connect_timeout_s,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self._error("connect", f"{type(exc).__name__}: {exc}")
            return None

    # ------------------------------------------------------------------ speaker

    async def _send(self, msg: ClientMessage, context: str | None = None) -> bool:
        assert self.ws is not None
        try:
            await self.ws.send(frame(msg, context))
        except ConnectionClosed:
            return False
        return True

    async def _wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait for ``event`` or the connection's end, at most ``timeout``. True if the event is set."""
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.closed.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return event.is_set()

    async def _converse(self) -> str:
        config = self.config
        start = SessionStart(
            speakers=tuple(SpeakerSpec(i) for i in range(session_speakers(config))),
            output=config.output(),
            sampling={"seed": config.seed + self.sid},
        )
        if not await self._send(start) or not await self._wait(self.ready, config.connect_timeout_s):
            if not self.closed.is_set():
                self._error("timeout", "no session.ready")
            return "error"
        why = await self._after_ready()
        if why is not None:
            return why
        if config.contexts == 1:
            why = await self._context(0)
        else:
            why = await self._contexts()
        if why is not None:
            return why
        return "done" if not self.closed.is_set() else "closed"

    async def _after_ready(self) -> str | None:
        """Between session.ready and the first turn (nothing here; a phone call joins in :mod:`loadtest.call`).
        Returns why the session must end, or None to go on."""
        return None

    async def _contexts(self) -> str | None:
        """All contexts at once; the first that must end the session ends the others."""
        tasks = [asyncio.create_task(self._context(c), name=f"session-{self.sid}-c{c}") for c in range(self.config.contexts)]
        try:
            for next_done in asyncio.as_completed(tasks):
                why = await next_done
                if why is not None:
                    return why
            return None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _context(self, c: int) -> str | None:
        """One context's conversation. Returns why the session must end, or None when its time is over."""
        config = self.config
        max_turns = config.turns or 10_000
        for k in range(max_turns):
            if self.rec.now() >= config.duration_s or self.closed.is_set():
                break
            if config.ping_per_turn and not await self._ping():
                return "error" if self.closed.is_set() else "timeout"
            why = await self._turn(turn_plan(config, self.sid, k, c))
            if why is not None:
                return why
        return None

    async def _ping(self) -> bool:
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        sent = self.rec.now()
        if not await self._send(Ping()):
            return False
        try:
            await asyncio.wait_for(asyncio.shield(pong), self.config.connect_timeout_s)
        except TimeoutError:
            self._error("timeout", "no pong")
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._pongs.remove(pong)
        self.rec.event("ping", self.rec.now(), self.sid, round((self.rec.now() - sent) * 1000.0, 3))
        return True

    async def _turn(self, plan: TurnPlan) -> str | None:
        """Speak one turn and listen to it. Returns why the session must end, or None to go on."""
        config, rec = self.config, self.rec
        state = TurnState(plan, Player(config.prebuffer_ms))
        ctx = plan.context
        self.current[ctx] = state
        barge = None
        try:
            t_start = rec.now()
            chars = 0
            for i, (speaker, token) in enumerate(plan.tokens):
                delay = t_start + i / config.tokens_per_s - rec.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                if state.cancelled or self.closed.is_set():
                    break
                chars += len(token)
                if state.k is None:  # the turn begins: its index and its first text go out in this order
                    async with self._first_send:
                        if self.closed.is_set():
                            break
                        state.k = k = self._next_k
                        self._next_k += 1
                        rec.event("turn", rec.now(), self.sid, k, plan.speaker, plan.text, plan.barge_after_ms, ctx)
                        if plan.barge_after_ms is not None:
                            barge = asyncio.create_task(self._barge(state))
                        rec.event("send", rec.now(), self.sid, k, "text", chars)  # recorded first: causes precede effects
                        if not await self._send(Text(text=token, speaker=speaker), ctx):
                            break
                    continue
                rec.event("send", rec.now(), self.sid, state.k, "text", chars)
                if not await self._send(Text(text=token, speaker=speaker), ctx):
                    break
            if state.k is None:  # nothing was sent
                return "closed" if self.closed.is_set() else None
            if not state.cancelled and not self.closed.is_set():
                rec.event("send", rec.now(), self.sid, state.k, "turn.end", chars)
                if await self._send(TurnEnd(), ctx):
                    state.ended.set()
            if not await self._wait(state.done, config.turn_timeout_s):
                if self.closed.is_set():
                    return "closed"
                where = "" if ctx is None else f" (context {ctx})"
                self._error("timeout", f"turn {state.k}{where}: no turn.done within {config.turn_timeout_s:g} s")
                return "timeout"
            # the listener hears the rest of the turn (a barge-in still may come, where _interruptible allows it)
            now = rec.now()
            if now >= config.duration_s:
                return None
            state.player.start_if_waiting(now)
            rest = 0.0 if state.cancelled else state.player.remaining_ms(now) / 1000.0
            await asyncio.sleep(min(rest, config.turn_timeout_s))
        finally:
            if barge is not None:
                barge.cancel()
                await asyncio.gather(barge, return_exceptions=True)
        await asyncio.sleep(plan.think_s)  # then thinks
        return None

    async def _barge(self, state: TurnState) -> None:
        """Interrupt once ``barge_after_ms`` of the turn was heard, if the turn can still be interrupted by then."""
        assert state.plan.barge_after_ms is not None
        if not await self._wait(state.first_audio, self.config.turn_timeout_s):
            return
        for _ in range(1000):  # bounded: each round sleeps until the target or until more audio may have come
            now = self.rec.now()
            if not self._interruptible(state, now) or self.closed.is_set():
                return
            heard = state.player.position(now)
            if heard >= state.plan.barge_after_ms:
                await self._interrupt(state)
                return
            await asyncio.sleep(max(0.005, (state.plan.barge_after_ms - heard) / 1000.0))

    def _interruptible(self, state: TurnState, now: float) -> bool:
        """Can the listener still barge in? Here: while the turn is being made (a cancel then has work to stop)."""
        return not state.done.is_set()

    async def _interrupt(self, state: TurnState) -> None:
        """The listener barges in: cancel, then report what was heard."""
        state.cancelled = True
        now = self.rec.now()
        heard = state.player.stop(now)
        ctx = state.plan.context
        self.rec.event("send", now, self.sid, state.k, "cancel", 0)  # in the same step as stop()
        if not await self._send(Cancel(), ctx) or state.server_turn is None:
            return
        self.rec.event("send", self.rec.now(), self.sid, state.k, "playback", 0)
        await self._send(Playback(turn=state.server_turn, played_ms=round(heard, 3)), ctx)

    # ------------------------------------------------------------------ reader

    async def _reader(self) -> None:
        assert self.ws is not None
        try:
            async for frame in self.ws:
                now = self.rec.now()
                try:
                    msg = decode_server(frame)
                except ProtocolError as exc:
                    self._error("client_decode", exc.message)
                    continue
                self._on_message(now, msg)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for state in self.current.values():
                state.done.set()

    def _on_message(self, now: float, msg: dict[str, Any]) -> None:
        rec, sid = self.rec, self.sid
        mtype = msg.get("type")
        if mtype == "audio":
            turn = msg["turn"]
            rec.event("a", now, sid, turn, msg["seq"], msg["ms"], len(msg["data"]), msg.get("context"))
            state = self.by_turn.get(turn)
            if state is not None:
                state.player.push(now, self.frame_ms)
                if not state.first_audio.is_set():
                    state.first_audio.set()
        elif mtype == "segment":
            rec.event("seg", now, sid, msg["turn"], msg["ms"], msg["text"], msg.get("context"))
        elif mtype == "words":
            words = msg["words"]
            first_ms = words[0]["start_ms"] if words else None
            rec.event("w", now, sid, msg["turn"], len(words), first_ms, bool(msg["estimated"]), msg.get("context"))
        elif mtype == "visemes":
            rec.event("v", now, sid, msg["turn"], len(msg["visemes"]), msg.get("context"))
        elif mtype == "turn.started":
            ctx = msg.get("context")
            rec.event("ts", now, sid, msg["turn"], msg["speaker"], ctx)
            state = self.current.get(ctx)
            if state is not None and state.server_turn is None and state.k is not None:
                state.server_turn = msg["turn"]
                self.by_turn[msg["turn"]] = state
        elif mtype == "turn.done":
            underruns, underrun_ms = 0, 0.0
            state = self.by_turn.pop(msg["turn"], None)
            if state is not None:
                underruns, underrun_ms = state.player.underruns, state.player.underrun_ms
            rec.event(
                "done", now, sid, msg["turn"], msg["reason"], msg["audio_ms"], msg["frames"], msg.get("ttfa_ms"),
                underruns, round(underrun_ms, 3), msg.get("context"),
            )
            self.live.turns += 1
            self.live.audio_ms += float(msg["audio_ms"])
            self.live.underruns += underruns
            if msg.get("ttfa_ms") is not None:
                self.live.ttfa_ms.append(float(msg["ttfa_ms"]))
            if state is not None:
                state.done.set()
        elif mtype == "session.ready":
            output = msg.get("output") or {}
            self.frame_ms = float(output.get("frame_ms", self.config.frame_ms))
            self.session_id = msg.get("session")
            rec.event("ready", now, sid, self.frame_ms, output.get("codec"))
            self.ready.set()
        elif mtype == "pong":
            while self._pongs:
                pong = self._pongs.popleft()
                if not pong.done():
                    pong.set_result(None)
                    break
        elif mtype == "error":
            rec.event("err", now, sid, msg.get("code"), msg.get("message"), bool(msg.get("fatal")))
            self.live.errors += 1
        else:
            self._error("unexpected", f"unexpected server message {mtype!r}")

    def _error(self, code: str, message: str) -> None:
        self.rec.event("err", self.rec.now(), self.sid, code, message, True)
        self.live.errors += 1
