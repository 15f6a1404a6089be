"""One simulated phone call (``--telephony``): the application and the carrier's side of the same session.

The application is a :class:`~loadtest.client.SimSession` on ``/v1/realtime`` (session.start, then turns driven
with text, token by token). Once its session is ready a :class:`TwilioLine` opens ``/v1/twilio`` and joins it the
way a Twilio Media Stream does (``connected``, then ``start`` with ``customParameters.session``); from the
application's ``call.started`` on, the session's audio goes to the line, not to the application.

The line, as Twilio's Media Streams reference describes it:

- it plays the ``media`` it gets in real time, through the turn's :class:`~loadtest.player.Player` (the same
  clock-driven buffer the other modes use, so underruns count the same way): the call's audio is recorded as the
  turn's ``a`` events. A Media Stream has no turn numbers; a packet belongs to the application's turn in flight
  (the next turn begins only after the last one was heard out, so there is no doubt which one);
- it echoes each ``mark`` once the audio before it has been played;
- on ``clear`` it drops what it had buffered and echoes the marks still pending at once;
- it sends the caller's audio, 20 ms mu-law frames in real time from the moment it joined: a quiet line, and when
  a turn's plan says so (``barge_after_ms`` of the turn heard and all its text sent, while at least
  ``SPEAK_MARGIN_MS`` of it is still to play) the caller's utterance, to barge in. The ``utt`` event marks its
  first frame going out; the onset-to-``clear`` latency is measured from there plus the utterance's onset.

After a turn the caller spoke over, the application waits for ``input.speech_stopped`` (as a voice application
waits for the caller to finish) before its next turn. A call the server drops (``call.stopped`` before the line
hung up) is an error (``call_lost``), and the application ends its session with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from loadtest.caller import FRAME_MS, CallerVoice
from loadtest.client import Live, SimSession, TurnState
from loadtest.config import SwarmConfig, twilio_url
from loadtest.record import Recorder
from loadtest.script import TurnPlan

SPEAK_MARGIN_MS = 1000.0  # the caller speaks over a turn only while this much of it is still to play
STOP_WAIT_S = 3.0  # after the utterance: how long the application waits for input.speech_stopped
HANG_UP_WAIT_S = 2.0  # after the line's stop: how long the application waits for call.stopped


class TwilioLine:
    """The carrier's side of one call: plays the session's audio, echoes marks, obeys clear, sends the caller."""

    def __init__(self, call: SimCall, voice: CallerVoice) -> None:
        self.call = call
        self.rec = call.rec
        self.voice = voice
        self.ws: ClientConnection | None = None
        self.stream_sid = f"MZ{call.sid:032x}"
        self.call_sid = f"CA{call.sid:032x}"
        self.frames_sent = 0  # the caller's frames: the input clock is frames_sent * 20 ms
        self.hanging_up = False  # the line is ending the call (a call.stopped after this is the expected one)
        self.marks_echoed = 0
        self._speech: int | None = None  # the utterance's next frame, while the caller speaks
        self._over: int | None = None  # the turn the caller speaks over
        self._marks: list[tuple[str, float, TurnState | None]] = []  # pending: name, audio before it (ms), its turn
        self._packets: dict[int, int] = {}  # turn -> media received (the seq of its `a` events)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def speaking(self) -> bool:
        return self._speech is not None

    async def join(self) -> bool:
        """Open the Media Stream for the call's session and start it. False (an error recorded) if that failed."""
        call = self.call
        self.ws = await call.open(twilio_url(call.config.url))
        if self.ws is None:
            return False
        self.rec.event("call", self.rec.now(), call.sid)
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send({"event": "start", "sequenceNumber": "1", "start": {
            "accountSid": "AC" + "0" * 32, "streamSid": self.stream_sid, "callSid": self.call_sid,
            "tracks": ["inbound", "outbound"], "customParameters": {"session": call.session_id or ""},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        self._tasks = [asyncio.create_task(self._receive(), name=f"line-rx-{call.sid}")]
        return True

    def start_talking(self) -> None:
        """The call joined: the line's audio starts (the input clock's 0 is its first frame)."""
        self._tasks.append(asyncio.create_task(self._talk(), name=f"line-tx-{self.call.sid}"))

    def speak(self, state: TurnState) -> None:
        """The caller starts the utterance with the next frame, over ``state``'s turn."""
        if self._speech is None:
            self._speech, self._over = 0, state.k

    async def hang_up(self) -> None:
        """End the call (Twilio's ``stop``) and close the Media Stream; record what the line sent and heard."""
        self.hanging_up = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ws is None:
            return
        with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):  # a line already gone: nothing to end
            await self._send({"event": "stop", "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}})
            await self.call._wait(self.call.hung_up, HANG_UP_WAIT_S)  # the application hears of it: call.stopped
            await asyncio.wait_for(self.ws.close(), 2.0)
        self.rec.event("line", self.rec.now(), self.call.sid, self.frames_sent, self.call.relayed, self.marks_echoed)

    # ------------------------------------------------------------------ sending

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({**message, "streamSid": self.stream_sid}, separators=(",", ":")))

    async def _talk(self) -> None:
        """The caller's audio: one 20 ms frame every 20 ms of the clock, late ones sent as soon as possible."""
        assert self.ws is not None
        rec, voice = self.rec, self.voice
        head = f'{{"event":"media","streamSid":"{self.stream_sid}","media":{{"track":"inbound","chunk":"'
        t0 = rec.now()
        for n in range(int(max(0.0, self.call.hard_stop - t0) * 1000.0 / FRAME_MS) + 1):  # bounded by the run
            delay = t0 + n * FRAME_MS / 1000.0 - rec.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._speech is not None:
                if self._speech == 0:
                    rec.event("utt", rec.now(), self.call.sid, self._over, voice.onset_ms, n * FRAME_MS)
                payload = voice.utterance[self._speech]
                self._speech = self._speech + 1 if self._speech + 1 < len(voice.utterance) else None
            else:
                payload = voice.noise[n % len(voice.noise)]
            try:
                await self.ws.send(f'{head}{n}","timestamp":"{n * 20}","payload":"{payload}"}}}}')
            except ConnectionClosed:
                return
            self.frames_sent += 1
            await self._echo(rec.now())

    async def _echo(self, now: float, everything: bool = False) -> None:
        """Echo, in order, the marks whose audio has been played (``everything``: all of them, as after clear)."""
        while self._marks:
            name, before_ms, state = self._marks[0]
            if not (everything or state is None or state.player.stopped or state.player.position(now) >= before_ms):
                return
            self._marks.pop(0)
            self.marks_echoed += 1
            await self._send({"event": "mark", "mark": {"name": name}})

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                now = self.rec.now()
                try:
                    message = json.loads(frame)
                    event = message["event"]
                except (ValueError, KeyError, TypeError) as exc:
                    self.call._error("client_decode", f"the Media Stream sent {str(frame)[:80]!r}: {exc}")
                    continue
                if event == "media":
                    self._media(now, message)
                elif event == "mark":
                    name = str(message["mark"]["name"])
                    state = self.call.playing()
                    self._marks.append((name, state.player.received_ms if state is not None else 0.0, state))
                elif event == "clear":
                    self._clear(now)
                    await self._echo(now, everything=True)
                else:
                    self.call._error("unexpected", f"unexpected Media Stream event {event!r}")
                await self._echo(now)

    def _media(self, now: float, message: dict[str, Any]) -> None:
        try:
            nbytes = len(base64.b64decode(message["media"]["payload"], validate=True))
        except (KeyError, TypeError, binascii.Error) as exc:
            self.call._error("client_decode", f"a media message without a base64 payload: {exc}")
            return
        state = self.call.playing()
        if state is None or state.k is None:  # impossible: the statistics step reports it (unknown_turn)
            self.rec.event("a", now, self.call.sid, None, 0, 0.0, nbytes, None)
            return
        seq = self._packets[state.k] = self._packets.get(state.k, -1) + 1
        self.rec.event("a", now, self.call.sid, state.k, seq, seq * FRAME_MS, nbytes, None)
        state.player.push(now, FRAME_MS)
        state.first_audio.set()

    def _clear(self, now: float) -> None:
        state = self.call.playing()
        self.rec.event("clear", now, self.call.sid, state.k if state is not None else None)
        if state is not None:
            state.player.stop(now)
            state.cancelled = True


class SimCall(SimSession):
    """A simulated session whose listener is a phone call (see the module docstring)."""

    def __init__(self, sid: int, config: SwarmConfig, rec: Recorder, live: Live, hard_stop: float,
                 voice: CallerVoice) -> None:
        super().__init__(sid, config, rec, live, hard_stop)
        self.line = TwilioLine(self, voice)
        self.joined = asyncio.Event()
        self.speech_stopped = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.relayed = 0  # the caller's frames relayed to the application (input.audio)
        self._spoke = False  # the caller spoke over the turn in flight
        self._previous: TurnState | None = None  # the turn before it

    async def _after_ready(self) -> str | None:
        if not await self.line.join():
            return "error"
        if not await self._wait(self.joined, self.config.connect_timeout_s):
            if not self.closed.is_set():
                self._error("timeout", "no call.started: the call did not join the session")
            return "error"
        self.line.start_talking()
        return None

    async def _converse(self) -> str:
        try:
            return await super()._converse()
        finally:
            await self.line.hang_up()

    def playing(self) -> TurnState | None:
        """The turn the call's audio belongs to: the one in flight once its first text went out, else the last."""
        state = self.current.get(None)
        return state if state is not None and state.k is not None else self._previous

    async def _turn(self, plan: TurnPlan) -> str | None:
        self._previous = self.playing()
        self._spoke = False
        why = await super()._turn(plan)
        if why is None and self._spoke:  # the caller is talking: the application answers once they stop
            await self._wait(self.speech_stopped, self.line.voice.utterance_ms / 1000.0 + STOP_WAIT_S)
        return why

    def _interruptible(self, state: TurnState, now: float) -> bool:
        """The caller can speak over a turn while enough of it is still to play (made or not)."""
        return not self.line.speaking and (
            not state.done.is_set() or state.player.remaining_ms(now) >= SPEAK_MARGIN_MS
        )

    async def _interrupt(self, state: TurnState) -> None:
        """The caller speaks, once the application has sent all of the turn's text (text still streaming when the
        voice barge-in cancels the turn would begin another turn on the server: a race no client can win)."""
        if not await self._wait(state.ended, self.config.turn_timeout_s):
            return
        if not self._interruptible(state, self.rec.now()):
            return
        self._spoke = True
        self.speech_stopped.clear()
        self.line.speak(state)

    def _on_message(self, now: float, msg: dict[str, Any]) -> None:
        mtype = msg.get("type")
        if mtype == "input.audio":
            self.relayed += 1
        elif mtype in ("input.speech_started", "input.speech_stopped"):
            kind = mtype.rpartition("_")[2]
            self.rec.event("vad", now, self.sid, kind, msg["ms"])
            if kind == "stopped":
                self.speech_stopped.set()
        elif mtype == "call.started":
            self.rec.event("joined", now, self.sid)
            self.joined.set()
        elif mtype == "call.stopped":
            self.rec.event("hungup", now, self.sid, msg.get("reason"))
            self.hung_up.set()
            if not self.line.hanging_up:  # the server dropped the call: a voice application ends its session too
                self._error("call_lost", f"the call left the session ({msg.get('reason')}) while it was talking")
                self.closed.set()  # nothing more is sent: the turn in flight ends, the session closes
        else:
            super()._on_message(now, msg)
