"""The telephony mode (`--telephony`): the phone line's simulator against a scripted Media Stream, the call
statistics on hand-made raw events, and a few real calls against `shoal serve --engine stub`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.call import SimCall
from loadtest.caller import FRAME, RATE, CallerVoice, onset_ms
from loadtest.client import Live, TurnState
from loadtest.config import SwarmConfig
from loadtest.player import Player
from loadtest.record import Recorder, read_events
from loadtest.script import turn_plan
from loadtest.stats import analyse, within
from tests.loadtest.test_smoke import small_run
from tests.loadtest.test_stats import session, turn_events, write_raw

PHONE = {"telephony": True, "codec": "mulaw", "sample_rate": 8000, "frame_ms": 20}

# ------------------------------------------------------------------------------------------------ call statistics


def phone_turn(sid: int, k: int, t0: float, *, utt: float | None = None, clear: float | None = None,
               onset: float = 40.0, clock_ms: float = 1000.0, started_late_ms: float = 8.0) -> list[list[Any]]:
    """One turn heard on a call (20 packets, 20 ms apart, from t0 + 0.05), maybe spoken over and cleared."""
    ev = turn_events(sid, k, t0, packets=20, spacing=0.02, done=False)
    if utt is not None:
        ev.append(["utt", utt, sid, k, onset, clock_ms])
        ev.append(["vad", utt + 0.1, sid, "started", clock_ms + onset + started_late_ms])
    if clear is not None:
        ev.append(["clear", clear, sid, k])
    end = t0 + 0.05 + 20 * 0.02
    ev.append(["done", end, sid, k, "cancelled" if clear is not None else "complete", 400.0, 20, 1.0, 0, 0.0])
    return sorted(ev, key=lambda e: e[1])


def call_joined(sid: int, t0: float = 0.0) -> list[list[Any]]:
    return session(sid, t0) + [["call", t0 + 0.003, sid], ["joined", t0 + 0.004, sid]]


def test_onset_to_clear_runs_from_the_utterances_onset_to_the_clear(tmp_path: Path) -> None:
    # the caller's first frame at 1.2 s, its sound 40 ms in; the clear came at 1.36 s: 120 ms after the onset
    events = call_joined(0) + phone_turn(0, 0, 1.0, utt=1.2, clear=1.36) + [["close", 2.0, 0, "done"]]
    s = analyse(write_raw(tmp_path, events, **PHONE)).summary
    assert s["sanity"]["ok"], s["sanity"]
    phone = s["telephony"]
    assert phone["calls"] == phone["joined"] == 1
    assert phone["barge_ins"] == {"utterances": 1, "cleared": 1, "missed": 0, "spurious_clears": 0}
    assert phone["onset_to_clear_ms"]["p50"] == pytest.approx(120.0)
    assert phone["vad_onset_error_ms"]["p50"] == pytest.approx(8.0)  # the server put the onset 8 ms late
    assert s["turns_by_reason"] == {"cancelled": 1}
    # what the call played stops at the clear: the packets after it are audio after the barge-in, not heard
    played = sum(1 for e in events if e[0] == "a" and e[1] < 1.36)
    assert s["audio_seconds"] == pytest.approx(played * 0.02)
    assert s["audio_after_cancel"]["packets"] == 20 - played
    assert within(s, None, 0)


def test_a_missed_barge_in_and_a_spurious_clear_are_counted_and_fail_the_run(tmp_path: Path) -> None:
    events = (
        call_joined(0)
        + phone_turn(0, 0, 1.0, utt=1.2)  # spoken over, never cleared: missed
        + phone_turn(0, 1, 3.0, clear=3.2)  # cleared with nobody speaking: spurious
        + [["close", 4.0, 0, "done"]]
    )
    s = analyse(write_raw(tmp_path, events, **PHONE)).summary
    assert s["sanity"]["ok"], s["sanity"]
    assert s["telephony"]["barge_ins"] == {"utterances": 1, "cleared": 0, "missed": 1, "spurious_clears": 1}
    assert s["telephony"]["onset_to_clear_ms"]["n"] == 0
    assert not within(s, None, 0)


def test_a_cancelled_turn_the_call_never_cleared_is_insane(tmp_path: Path) -> None:
    events = call_joined(0) + [e for e in phone_turn(0, 0, 1.0, utt=1.2, clear=1.35) if e[0] != "clear"]
    s = analyse(write_raw(tmp_path, events, **PHONE)).summary
    assert s["sanity"]["violations"] == {"cancelled_without_clear": 1}


def test_warm_up_barge_ins_are_left_out_and_cpu_is_shared_by_the_calls(tmp_path: Path) -> None:
    cpu = [["cpu", 3.0 + i, 30.0, 10.0, 5.0, 50.0, 0.0, 0.0] for i in range(4)]  # server 30 % + children 10 %
    events = sorted(
        call_joined(0) + call_joined(1, 0.5)
        + phone_turn(0, 0, 1.0, utt=1.2, clear=1.25)  # warm-up
        + phone_turn(1, 0, 4.0, utt=4.2, clear=4.5) + cpu
        + [["close", 8.0, 0, "done"], ["close", 8.0, 1, "done"]],
        key=lambda e: e[1],
    )
    s = analyse(write_raw(tmp_path, events, ramp_s=1.0, warmup_s=1.0, sessions=2, **PHONE)).summary
    phone = s["telephony"]
    assert phone["barge_ins"]["utterances"] == 1
    assert phone["onset_to_clear_ms"]["max"] == pytest.approx(260.0)
    assert phone["server_cpu_per_call"] == pytest.approx(20.0)  # 40 % of a core for two calls


# ------------------------------------------------------------------------------------------------ the line


class FakeStream:
    """A scripted Media Stream socket: frames pushed in come out of iteration; what the line sends is kept."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[str | None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self) -> None:
        await self.incoming.put(None)

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> str:
        frame = await self.incoming.get()
        if frame is None:
            raise StopAsyncIteration
        return frame

    def echoes(self) -> list[str]:
        return [m["mark"]["name"] for m in self.sent if m["event"] == "mark"]


def tone_voice() -> CallerVoice:
    """A 100 ms utterance that starts sounding 40 ms in (no built-in voice needed)."""
    t = np.arange(int(0.1 * RATE)) / RATE
    pcm = np.where(t >= 0.04, 0.3 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    return CallerVoice.make(pcm=pcm)


async def test_the_line_plays_media_echoes_marks_when_played_and_clears_like_twilio(tmp_path: Path) -> None:
    config = SwarmConfig(url="ws://127.0.0.1:9/v1/realtime", sessions=1, ramp_s=0.0, prebuffer_ms=0.0, **PHONE)
    rec = Recorder(tmp_path / "events.msgpack")
    voice = tone_voice()
    assert voice.onset_ms == 40.0 and voice.utterance_ms == 100.0 and len(voice.noise) == 50
    call = SimCall(0, config, rec, Live(), 10.0, voice)
    state = TurnState(turn_plan(config, 0, 0), Player(0.0), k=0)
    call.current[None] = state
    stream = FakeStream()
    call.line.ws = stream  # type: ignore[assignment]
    receiving = asyncio.create_task(call.line._receive())
    media = json.dumps({"event": "media", "media": {"payload": "//////////8="}})  # 8 bytes: stands for 20 ms
    for _ in range(5):
        await stream.incoming.put(media)
    await stream.incoming.put(json.dumps({"event": "mark", "mark": {"name": "0:100"}}))
    await asyncio.sleep(0.03)
    assert state.first_audio.is_set() and state.player.received_ms == 100.0
    assert stream.echoes() == []  # 100 ms queued, 30 ms played: not yet
    await asyncio.sleep(0.1)
    await call.line._echo(rec.now())
    assert stream.echoes() == ["0:100"]  # played out: echoed

    for _ in range(5):
        await stream.incoming.put(media)
    await stream.incoming.put(json.dumps({"event": "mark", "mark": {"name": "0:200"}}))
    await stream.incoming.put(json.dumps({"event": "clear"}))
    await asyncio.sleep(0.03)
    assert stream.echoes() == ["0:100", "0:200"]  # a clear echoes the pending marks at once
    assert state.cancelled and state.player.stopped

    call.line.speak(state)  # the caller speaks: the utterance's five frames, then the quiet line again
    talking = asyncio.create_task(call.line._talk())
    await asyncio.sleep(0.15)
    talking.cancel()
    await stream.close()
    await asyncio.gather(receiving, talking, return_exceptions=True)
    rec.close()
    sent = [m["media"]["payload"] for m in stream.sent if m["event"] == "media"]
    assert sent[:5] == list(voice.utterance) and sent[5] == voice.noise[5]
    events = list(read_events(tmp_path / "events.msgpack"))
    assert [e[0] for e in events if e[0] != "a"] == ["clear", "utt"]
    assert [e[2:] for e in events if e[0] == "utt"] == [[0, 0, 40.0, 0.0]]  # turn 0, the onset, at clock 0 ms
    assert [e[3:5] for e in events if e[0] == "a"] == [[0, seq] for seq in range(10)]


def test_the_onset_is_where_the_sound_starts() -> None:
    pcm = np.zeros(RATE, np.float32)
    pcm[2400:] = 0.1
    assert onset_ms(pcm, RATE) == 300.0
    assert len(CallerVoice.make(pcm=pcm).utterance) == RATE // FRAME
    with pytest.raises(ValueError, match="silent"):
        onset_ms(np.zeros(800, np.float32), RATE)


# ------------------------------------------------------------------------------------------------ for real


def test_a_few_real_calls_hear_the_bot_and_interrupt_it(tmp_path: Path) -> None:
    """`shoal loadtest --telephony` against the stub engine: three calls for ten seconds, the caller speaking over
    most turns. Every call joins and hangs up, the caller's barge-ins all clear the call's audio quickly, the
    voice activity benchmark ran, and the same raw events give the same summary again."""
    out = tmp_path / "out"
    proc, summary = small_run(out, "--serve", "stub", "--stub-ttft-ms", "5", "--telephony", "--sessions", "3",
                              "--duration", "10", "--tokens-per-s", "30", "--barge-in", "0.8", "--vad-bench-s", "5",
                              "--floor-probes", "0")
    assert summary["sessions_ready"] == 3 and summary["turns_unfinished"] == 0
    phone = summary["telephony"]
    assert phone["joined"] == 3 and phone["hangups"] == {"hangup": 3}
    b = phone["barge_ins"]
    assert b["utterances"] >= 2 and b["missed"] == 0 and b["spurious_clears"] == 0, b
    assert 50.0 < phone["onset_to_clear_ms"]["p50"] < 400.0  # voice activity needs 96 ms of speech
    assert abs(phone["vad_onset_error_ms"]["p50"]) <= 64.0  # within two VAD windows
    assert summary["turns_by_reason"].get("cancelled", 0) >= 2
    assert summary["audio_seconds"] > 3.0 and summary["ttfa_ms"]["n"] >= 3  # the calls heard the bot
    assert phone["relayed_frames"] > 0.9 * phone["caller_frames"] > 500  # 50 frames a second, each relayed
    assert phone["marks_echoed"] > 10 and phone["server_cpu_per_call"] is not None
    vad = phone["vad"]
    assert vad["audio_s"] == 5.0 and vad["speech_events"] >= 2 and 0 < vad["vad_per_call_pct"] < vad["per_call_pct"]
    assert "onset->clear" in proc.stdout and "CPU per call" in proc.stdout
    assert "phone calls joined" in (out / "report.html").read_text()

    again = subprocess.run([sys.executable, "-m", "shoal", "loadtest", "report", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary
