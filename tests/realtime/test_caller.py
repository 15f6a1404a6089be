"""The caller's side: input audio, voice activity (Silero), voice barge-in, input.commit, and a phone call over
Twilio Media Streams — against a real `shoal serve`. The Twilio side is a simulator written from Twilio's Media
Streams message reference (a fake by necessity: no carrier here): it plays what it gets in real time, echoes marks
when their audio has played, and drops its buffer on `clear`, as Twilio documents."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
import websockets

from engine.base import SynthesisRequest
from engine.espeak import SAMPLE_RATE, EspeakConfig, EspeakSynthesizer
from realtime.audio import mulaw_decode, mulaw_encode
from realtime.caller import InputFormat, InputStream
from realtime.protocol import Text, TurnDone, TurnEnd, TurnStarted
from realtime.vad import VAD_RATE, VoiceActivity
from sessions.embedded import EmbeddedRedis
from sessions.store import SessionStore
from tests.realtime.conftest import Client, Server
from tests.realtime.test_e2e import speak
from tests.realtime.test_turns import Sim

LONG = "This is the assistant speaking at some length, so that there is plenty of time to interrupt it. " * 3
UTTERANCE = "Wait, stop, I have a question about that."
FRAME = 160  # 20 ms of mu-law at 8 kHz


async def utterance_8k() -> np.ndarray:
    """A caller's utterance made with the built-in voice, at 8 kHz (as a phone line carries it)."""
    engine = EspeakSynthesizer(EspeakConfig(workers=1, language="en-us"))
    await engine.start()
    try:
        pcm = np.concatenate([c.pcm async for c in engine.synthesize(SynthesisRequest(UTTERANCE, speaker=3))])
    finally:
        await engine.aclose()
    return soxr.resample(pcm, SAMPLE_RATE, 8000).astype(np.float32)


def onset_ms(pcm: np.ndarray, rate: int) -> float:
    """Where the utterance's sound starts (first 10 ms louder than -40 dBFS)."""
    hop = rate // 100
    rms = np.sqrt(np.mean(pcm[: pcm.size // hop * hop].reshape(-1, hop) ** 2, axis=1))
    return float(np.flatnonzero(rms > 0.01)[0] * 10)


# ------------------------------------------------------------------------------------------------- units


def test_input_settings_are_validated_with_clear_errors() -> None:
    assert InputFormat.from_wire({"codec": "alaw"}) == InputFormat(codec="alaw", sample_rate=8000)
    assert InputFormat.from_wire({"vad": "off"}).barge_in is False  # barge-in follows voice activity
    for wire, words in (
        ({"codec": "mp3"}, "input.codec"),
        ({"codec": "mulaw", "sample_rate": 16000}, "input.sample_rate"),
        ({"vad": "off", "barge_in": True}, "needs input.vad"),
        ({"threshold": 2}, "threshold"),
        ({"min_speech_ms": 5}, "min_speech_ms"),
    ):
        with pytest.raises(ValueError, match=words):
            InputFormat.from_wire(wire)


def test_bad_payloads_are_refused_and_change_nothing() -> None:
    stream = InputStream(InputFormat(codec="pcm16", sample_rate=16000, vad=False, barge_in=False))
    for data, words in ((b"\x00", "even number"), (b"", "empty"), (bytes(16000 * 2), "at most 120 ms")):
        with pytest.raises(ValueError, match=words):
            stream.push(data)
    assert stream.samples == 0
    opus = InputStream(InputFormat(codec="opus", sample_rate=48000, vad=False, barge_in=False))
    with pytest.raises(ValueError, match="not an Opus packet"):
        opus.push(b"\xff\xff\xff\xff garbage")


def test_committed_audio_comes_back_from_the_input_clock() -> None:
    stream = InputStream(InputFormat(codec="mulaw", sample_rate=8000, vad=False, barge_in=False))
    tone = (0.3 * np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000)).astype(np.float32)
    for i in range(0, tone.size, FRAME):
        stream.push(mulaw_encode(tone[i : i + FRAME]))
    assert stream.ms == 1000
    piece = stream.audio(200, 700)
    assert piece.size == VAD_RATE // 2 and np.sqrt(np.mean(piece**2)) > 0.15
    with pytest.raises(ValueError, match="past the input received"):
        stream.audio(500, 5000)


async def test_voice_activity_finds_speech_and_ignores_silence_and_noise() -> None:
    speech = soxr.resample(await utterance_8k(), 8000, VAD_RATE).astype(np.float32)
    lead = np.zeros(VAD_RATE, np.float32)
    vad = VoiceActivity()
    events = vad.feed(np.concatenate([lead, speech, np.zeros(VAD_RATE, np.float32)]))
    assert [kind for kind, _ in events] == ["started", "stopped"]
    assert abs(events[0][1] - (1000 + onset_ms(speech, VAD_RATE))) <= 64  # the onset, within two windows
    rng = np.random.default_rng(5)
    quiet = VoiceActivity()
    assert quiet.feed((0.005 * rng.standard_normal(5 * VAD_RATE)).astype(np.float32)) == []  # hiss
    assert quiet.feed(np.zeros(3 * VAD_RATE, np.float32)) == []


# ------------------------------------------------------------------------------------------------- end to end


async def test_bad_input_gets_bad_message_and_the_session_goes_on(server: Server) -> None:
    client = await Client.connect(server.url)
    await client.send(type="session.start", input={"codec": "opus", "sample_rate": 44100})
    error, _ = await client.until("error")
    assert error["code"] == "bad_message" and "input.sample_rate" in error["message"]
    ready = await client.start(input={"codec": "pcm16", "sample_rate": 16000})
    assert ready["input"]["codec"] == "pcm16" and ready["input"]["vad"] == "on"
    for payload in (b"\x01", bytes(30_000)):
        await client.send(type="input.audio", data=payload)
        error, _ = await client.until("error")
        assert error["code"] == "bad_message" and error["fatal"] is False
    await client.send(type="input.commit", speaker=1, text="hello", start_ms=0, end_ms=900)
    error, _ = await client.until("error")
    assert "past the input received" in error["message"]
    done, _ = await speak(client, ["Still here."], 0)
    assert done["reason"] == "complete"
    await client.close()


async def test_input_commit_stores_the_callers_turn_in_order(server: Server) -> None:
    client = await Client.connect(server.url)
    ready = await client.start(input={"codec": "mulaw", "vad": "off"})
    await speak(client, ["Hello, how can I help?"], 0)
    speech = await utterance_8k()
    for i in range(0, speech.size, FRAME):
        await client.send(type="input.audio", data=mulaw_encode(speech[i : i + FRAME]))
    await client.ping()
    length = speech.size / 8
    await client.send(type="input.commit", speaker=1, text=UTTERANCE, start_ms=0, end_ms=length - 20)
    done, _ = await speak(client, ["Sure, ask away."], 0)
    assert done["turn"] == 2
    await client.close()
    again = await Client.connect(server.url)
    resumed = await again.start(session=ready["session"])
    assert [(h["turn"], h["speaker"], h["text"]) for h in resumed["history"]] == [
        (0, 0, "Hello, how can I help?"), (1, 1, UTTERANCE), (2, 0, "Sure, ask away.")]
    assert resumed["history"][1]["audio_ms"] == round(length - 20)
    await again.close()


async def test_the_caller_speaking_over_a_turn_cancels_it(server: Server) -> None:
    client = await Client.connect(server.url)
    await client.start(input={"codec": "mulaw"}, output={"codec": "pcm16", "sample_rate": 16000})
    await client.send(type="text", text=LONG)
    await client.send(type="turn.end")
    await client.until("audio")
    speech = await utterance_8k()
    stream = np.concatenate([np.zeros(8000, np.float32), speech])
    for i in range(0, stream.size, FRAME):
        await client.send(type="input.audio", data=mulaw_encode(stream[i : i + FRAME]))
        await asyncio.sleep(0.02)
    started, seen = await client.until("input.speech_started")
    assert abs(started["ms"] - (1000 + onset_ms(speech, 8000))) <= 64
    done, _ = await client.until("turn.done")
    assert done["reason"] == "cancelled" and done["audio_ms"] < 20_000
    await client.ping()
    await client.close()


class TwilioSim:
    """A Twilio Media Stream as its reference describes it, with a real-time player."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.sid = "MZ" + "0" * 32
        self.played: list[bytes] = []  # media payloads, in order
        self.buffer = 0  # bytes queued and not yet played
        self.total = 0  # bytes received
        self.play_start: float | None = None
        self.position = 0.0  # bytes played, at `last`
        self.last = 0.0
        self.marks: list[tuple[str, int]] = []  # (name, byte offset in the stream)
        self.clears: list[float] = []
        self.echoed: list[str] = []

    def advance(self, now: float) -> None:
        if self.play_start is None:
            return
        self.position = min(float(self.total), self.position + (now - self.last) * 8000)
        self.last = now

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def start(self, session: str) -> None:
        await self.send(event="connected", protocol="Call", version="1.0.0")
        await self.send(event="start", sequenceNumber="1", streamSid=self.sid, start={
            "accountSid": "AC" + "1" * 32, "streamSid": self.sid, "callSid": "CA" + "2" * 32, "tracks": ["inbound"],
            "customParameters": {"session": session, "caller": "+15550100"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})

    async def listen(self) -> None:
        """Receive media, marks and clears; echo each mark once the audio before it has played."""
        async for frame in self.ws:
            message = json.loads(frame)
            assert message["streamSid"] == self.sid
            now = time.monotonic()
            self.advance(now)
            if message["event"] == "media":
                data = base64.b64decode(message["media"]["payload"])
                if self.play_start is None:
                    self.play_start = self.last = now
                self.played.append(data)
                self.total += len(data)
            elif message["event"] == "mark":
                self.marks.append((message["mark"]["name"], self.total))
            elif message["event"] == "clear":
                self.clears.append(now)
                self.total = int(self.position)  # the unplayed audio is dropped...
                for name, _ in self.marks:  # ... and every pending mark is echoed at once
                    await self.send(event="mark", streamSid=self.sid, mark={"name": name})
                self.marks.clear()
            await self.echo()

    async def echo(self) -> None:
        while self.marks and self.marks[0][1] <= self.position:
            name, _ = self.marks.pop(0)
            self.echoed.append(name)
            await self.send(event="mark", streamSid=self.sid, mark={"name": name})

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self.advance(time.monotonic())
            await self.echo()


async def test_a_phone_call_hears_the_session_and_interrupts_it(server: Server, tmp_path: Path) -> None:
    app = await Client.connect(server.url)
    ready = await app.start(output={"timestamps": "words"})
    session = ready["session"]
    sim = TwilioSim(await websockets.connect(server.url.replace("/v1/realtime", "/v1/twilio")))
    await sim.start(session)
    started, _ = await app.until("call.started")
    assert started["parameters"] == {"session": session, "caller": "+15550100"}
    listener = asyncio.create_task(sim.listen())
    ticker = asyncio.create_task(sim.tick())
    try:
        # a first turn plays whole: the call gets it as mu-law 8 kHz, 20 ms frames
        done, msgs = await speak(app, ["Hello, thanks for calling."], 0)
        assert done["reason"] == "complete" and not [m for m in msgs if m["type"] == "audio"]  # audio went to the call
        await asyncio.sleep(0.3)
        assert {len(p) for p in sim.played} == {FRAME}
        assert sim.total / 8 == pytest.approx(done["audio_ms"], abs=1)
        assert float(np.sqrt(np.mean(mulaw_decode(b"".join(sim.played)) ** 2))) > 0.02
        await asyncio.sleep(done["audio_ms"] / 1000 + 0.3)  # let it play out: its end mark comes back
        assert f"0:{done['audio_ms']:g}" in sim.echoed

        # then the caller speaks over a long turn, in real time, 20 ms at a time
        await app.send(type="text", text=LONG)
        await app.send(type="turn.end")
        await app.until("turn.started")
        await asyncio.sleep(1.5)
        speech = await utterance_8k()
        onset = onset_ms(speech, 8000) / 1000
        sent_at = None
        heard_at_onset = None
        for i in range(0, speech.size + 8000, FRAME):
            chunk = speech[i : i + FRAME] if i < speech.size else np.zeros(FRAME, np.float32)
            chunk = np.pad(chunk, (0, FRAME - chunk.size))
            await sim.send(event="media", streamSid=sim.sid, media={
                "track": "inbound", "chunk": str(i // FRAME), "timestamp": str(i // 8),
                "payload": base64.b64encode(mulaw_encode(chunk)).decode()})
            if sent_at is None:
                sent_at = time.monotonic()
            if heard_at_onset is None and time.monotonic() - sent_at >= onset:
                sim.advance(time.monotonic())
                heard_at_onset = sim.position / 8 - done["audio_ms"]  # ms of the second turn the caller had heard
            await asyncio.sleep(0.02)
            if sim.clears:
                break
        assert sim.clears, "the caller's speech never cleared the call's audio"
        latency = sim.clears[0] - (sent_at + onset)
        assert latency < 0.3, f"onset to clear took {latency * 1000:.0f} ms"
        cancelled, before = await app.until("turn.done")
        assert cancelled["reason"] == "cancelled"
        kinds = [m["type"] for m in before]
        assert "input.speech_started" in kinds and "input.audio" in kinds  # the app hears the caller too

        # DTMF and the end of the call reach the application
        await sim.send(event="dtmf", streamSid=sim.sid, dtmf={"track": "inbound_track", "digit": "7"})
        dtmf, _ = await app.until("input.dtmf")
        assert dtmf["digit"] == "7"
        await sim.send(event="stop", streamSid=sim.sid, stop={"accountSid": "AC", "callSid": "CA" + "2" * 32})
        stopped, _ = await app.until("call.stopped")
        assert stopped["reason"] == "hangup"
        await app.ping()
    finally:
        listener.cancel()
        ticker.cancel()
    await app.close()
    await asyncio.sleep(0.5)
    store = SessionStore(EmbeddedRedis(server.data_dir).url)
    await store.connect()
    try:
        turns = await store.load_turns(session)
    finally:
        await store.aclose()
    assert turns[1].state == "cancelled" and heard_at_onset is not None
    # the stored turn is cut where the caller was when they started speaking (mark echoes, every 200 ms)
    assert turns[1].audio_ms == pytest.approx(heard_at_onset, abs=150), (turns[1].audio_ms, heard_at_onset)
    assert LONG.startswith(turns[1].text) and 0 < len(turns[1].text) < len(LONG)


async def test_low_noise_on_the_line_interrupts_nothing(server: Server) -> None:
    client = await Client.connect(server.url)
    await client.start(input={"codec": "mulaw"}, output={"codec": "mulaw"})
    rng = np.random.default_rng(9)
    await client.send(type="text", text="A short answer, heard to the end.")
    await client.send(type="turn.end")
    await client.until("audio")
    hiss = (0.004 * rng.standard_normal(8000 * 3)).astype(np.float32)  # -48 dBFS line noise, 3 s
    for i in range(0, hiss.size, FRAME):
        await client.send(type="input.audio", data=mulaw_encode(hiss[i : i + FRAME]))
    done, seen = await client.until("turn.done", timeout=30)
    assert done["reason"] == "complete"
    assert not [m for m in seen if m["type"].startswith("input.speech")]
    await client.close()


def test_a_committed_caller_turn_is_in_the_next_turns_context() -> None:
    """The turn machine keeps the caller's turn, with its codes, in order: the next reply's prompt holds both sides."""
    sim = Sim()
    sim.say("How can I help?")
    codes = np.arange(40, dtype=np.int16).reshape(10, 4)
    assert sim.m.caller_turn(3, "My order is late.", 186.0, codes) == 1
    sim.send(Text("Let me look."))
    sim.send(TurnEnd())
    job = sim.m.next_job()
    past = sim.m.past(job.turn)
    assert [(p.speaker, p.text) for p in past] == [(0, "How can I help?"), (3, "My order is late.")]
    assert past[1].codes is codes
    while sim.write():
        pass
    assert sim.stored[1].context == "input" and sim.stored[1].audio_ms == 186


def test_the_rest_of_a_reply_the_caller_interrupted_does_not_start_a_new_turn() -> None:
    """An LLM streams its reply token by token; the caller speaks over it. The tokens already on their way (sent
    before the client heard of the barge-in) and the reply's turn.end belong to the cancelled turn, not to a new one."""
    sim = Sim()
    sim.send(Text("Let me tell you about "))
    sim.apply(sim.m.barge_in())
    sim.send(Text("our opening hours. "))  # still streaming
    sim.send(TurnEnd())  # accepted without a word: the interrupted reply ends here
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)] == ["cancelled"] and len(sim.of(TurnStarted)) == 1
    sim.send(Text("Sorry, go ahead."))  # the next reply is a new turn
    sim.send(TurnEnd())
    sim.run()
    assert [d.reason for d in sim.of(TurnDone)] == ["cancelled", "complete"] and len(sim.of(TurnStarted)) == 2


async def test_a_call_ends_when_its_session_ends(server: Server) -> None:
    app = await Client.connect(server.url)
    ready = await app.start()
    sim = TwilioSim(await websockets.connect(server.url.replace("/v1/realtime", "/v1/twilio")))
    await sim.start(ready["session"])
    await app.until("call.started")
    await app.close()  # the application leaves: the call has nothing to hear any more
    async with asyncio.timeout(10):
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await sim.ws.recv()
    assert sim.ws.close_code == 1000


async def test_a_call_for_a_session_that_is_not_live_is_refused(server: Server) -> None:
    sim = TwilioSim(await websockets.connect(server.url.replace("/v1/realtime", "/v1/twilio")))
    await sim.start("nobody-here")
    async with asyncio.timeout(10):
        with pytest.raises(websockets.ConnectionClosed):
            await sim.ws.recv()
    assert sim.ws.close_code == 4404


async def test_a_broken_media_stream_is_refused_and_the_server_goes_on(server: Server) -> None:
    """Frames that are not Twilio's (not JSON, odd media formats, garbage payloads) never take the server down."""
    app = await Client.connect(server.url)
    ready = await app.start()
    ws = await websockets.connect(server.url.replace("/v1/realtime", "/v1/twilio"))
    await ws.send("not json at all")
    await ws.send(json.dumps(["a", "list"]))
    await ws.send(json.dumps({"event": "start", "streamSid": "MZ1", "start": {
        "customParameters": {"session": ready["session"]}, "mediaFormat": {"encoding": "audio/L16", "sampleRate": "x"}}}))
    async with asyncio.timeout(10):
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1008
    done, _ = await speak(app, ["Still here."], 0)
    assert done["reason"] == "complete"
    await app.close()
