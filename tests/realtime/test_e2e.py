"""End to end against a real `shoal serve` (uvicorn, embedded Redis, built-in espeak voice) over real sockets.

Only protocol v1 as DESIGN.md writes it is spoken here; audio is decoded with libopus and checked for
duration and loudness.
"""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from realtime.audio import decode_opus
from tests.realtime.conftest import Client, Server, start_server



def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


async def speak(client: Client, text_parts: list[str], speaker: int) -> tuple[dict, list[dict]]:
    """Send one turn as incremental tokens, return (turn.done, messages of the turn)."""
    for part in text_parts:
        await client.send(type="text", text=part, speaker=speaker)
    await client.send(type="turn.end")
    return await client.until("turn.done", timeout=60)


def tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


async def test_three_turn_two_speaker_conversation_streams_real_speech(server: Server) -> None:
    client = await Client.connect(server.url)
    ready = await client.start(speakers=[{"speaker": 0}, {"speaker": 1}])
    assert ready["protocol"] == 1 and ready["resumed"] is False and ready["turns"] == 0
    assert ready["engine"]["name"] == "espeak" and ready["engine"]["cloning"] is False
    assert ready["output"]["codec"] == "opus" and ready["output"]["sample_rate"] == 48000
    lines = [
        (0, "Hello there. How are you doing today?"),
        (1, "I am fine, thank you. The weather is lovely."),
        (0, "Great to hear! Let us go for a walk."),
    ]
    voices = []
    for i, (speaker, line) in enumerate(lines):
        done, msgs = await speak(client, tokens(line), speaker)
        started = [m for m in msgs if m["type"] == "turn.started"]
        assert started == [{"type": "turn.started", "turn": i, "speaker": speaker}]
        audio = [m for m in msgs if m["type"] == "audio"]
        assert [m["seq"] for m in audio] == list(range(len(audio)))
        assert all(m["turn"] == i for m in audio)
        assert [m["ms"] for m in audio] == pytest.approx([20.0 * k for k in range(len(audio))])
        segs = [m for m in msgs if m["type"] == "segment"]
        assert len(segs) == 2 and " ".join(s["text"] for s in segs) == line  # two sentences each
        assert done["reason"] == "complete" and done["frames"] == len(audio)
        assert done["audio_ms"] == pytest.approx(20.0 * len(audio))
        assert 0 < done["ttfa_ms"] < 5000
        pcm = decode_opus([m["data"] for m in audio])
        assert len(pcm) == len(audio) * 960  # 20 ms at 48 kHz per packet
        assert 1.0 < len(pcm) / 48000 < 8.0  # a short sentence pair, not silence padding
        assert rms(pcm) > 0.02, "audio is (nearly) silent"
        voices.append(pcm)
    # two speakers sound different: compare the pitch of the spectra crudely via zero-crossing rates
    zc = [np.mean(np.abs(np.diff(np.sign(v)))) for v in voices]
    assert abs(zc[0] - zc[1]) > 0.002 or abs(zc[1] - zc[2]) > 0.002
    await client.close()


async def test_json_client_gets_json_answers(server: Server) -> None:
    client = await Client.connect(server.url, use_json=True)
    await client.start(output={"codec": "pcm16", "sample_rate": 16000})
    done, msgs = await speak(client, ["Plain JSON works."], 0)
    audio = [m for m in msgs if m["type"] == "audio"]
    assert done["reason"] == "complete" and audio
    assert all(len(m["data"]) == 16000 * 2 // 50 for m in audio)  # 20 ms of PCM16 at 16 kHz
    await client.close()


async def test_mulaw_output_at_8khz(server: Server) -> None:
    client = await Client.connect(server.url)
    ready = await client.start(output={"codec": "mulaw"})
    assert ready["output"]["sample_rate"] == 8000
    done, msgs = await speak(client, ["Telephone voice."], 0)
    assert {len(m["data"]) for m in msgs if m["type"] == "audio"} == {160}
    await client.close()


async def test_cancel_mid_turn_stops_audio_and_stores_the_cut_turn(server: Server) -> None:
    client = await Client.connect(server.url)
    ready = await client.start()
    long_text = " ".join(["This is a long sentence that keeps going so there is plenty left to cancel."] * 8)
    await client.send(type="text", text=long_text)
    await client.send(type="turn.end")
    first, _ = await client.until("audio")
    t_first = time.monotonic()
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await client.send(type="cancel")
    done, after = await client.until("turn.done", timeout=5)
    elapsed_ms = (time.monotonic() - t0) * 1000
    print(f"cancel -> turn.done: {elapsed_ms:.1f} ms")
    assert done["reason"] == "cancelled" and done["turn"] == 0
    assert elapsed_ms < 1000
    # the text is ~40 s of speech; pacing sent at most lead_ms (1.5 s) ahead of real time since the first packet
    assert done["audio_ms"] <= 1500 + (time.monotonic() - t_first) * 1000 + 100
    await client.send(type="playback", turn=0, played_ms=250.0)
    await client.ping()
    # the session stays usable: next turn works and resume reports the stored (cut) turn
    done2, _ = await speak(client, ["Short one."], 0)
    assert done2["turn"] == 1 and done2["reason"] == "complete"
    await client.close()
    again = await Client.connect(server.url)
    resumed = await again.start(session=ready["session"])
    assert resumed["resumed"] is True and resumed["turns"] == 2
    await again.close()


async def test_reconnect_resumes_and_second_connection_is_busy(server: Server) -> None:
    a = await Client.connect(server.url)
    ready = await a.start()
    sid = ready["session"]
    await speak(a, ["One turn to remember."], 0)
    b = await Client.connect(server.url)
    await b.send(type="session.start", session=sid)
    err, _ = await b.until("error")
    assert err["code"] == "busy" and err["fatal"] is True
    with pytest.raises(Exception):
        await b.recv(timeout=5)
    assert b.ws.close_code == 4409
    await a.close()
    await asyncio.sleep(0.3)
    c = await Client.connect(server.url)
    again = await c.start(session=sid)
    assert again["resumed"] is True and again["turns"] == 1 and again["session"] == sid
    done, _ = await speak(c, ["And a second."], 0)
    assert done["turn"] == 1
    await c.close()


async def test_restart_the_server_and_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data)
    try:
        a = await Client.connect(srv.url)
        sid = (await a.start(speakers=[{"speaker": 0}, {"speaker": 1}]))["session"]
        await speak(a, ["Before the restart."], 0)
        await speak(a, ["Still before."], 1)
        await a.close()
    finally:
        assert srv.stop() == 0
    srv = start_server(data)
    try:
        b = await Client.connect(srv.url)
        ready = await b.start(session=sid)
        assert ready["resumed"] is True and ready["turns"] == 2
        assert [s["speaker"] for s in ready["speakers"]] == [0, 1]
        done, _ = await speak(b, ["After the restart."], 1)
        assert done["turn"] == 2 and done["reason"] == "complete"
        await b.close()
    finally:
        srv.stop()


BAD_INPUTS: list[tuple[str, bytes | str, str]] = [
    ("not msgpack", b"\xc1\xc1", "bad_message"),
    ("not json", "{nope", "bad_message"),
    ("msgpack array", b"\x92\x01\x02", "bad_message"),
    ("unknown type", "{\"type\": \"sing\"}", "unknown_type"),
    ("wrong field type", "{\"type\": \"text\", \"text\": 42}", "bad_message"),
    ("invalid utf-8 in msgpack str", b"\x82\xa4type\xa4text\xa4text\xa2\xff\xfe", "bad_message"),
    ("absurd sample rate", "{\"type\": \"session.update\", \"output\": {\"sample_rate\": 1000000000}}", "bad_message"),
    ("bad codec", "{\"type\": \"session.update\", \"output\": {\"codec\": \"mp3\"}}", "bad_message"),
    ("bad sampling", "{\"type\": \"session.update\", \"sampling\": {\"temperature\": -1}}", "bad_message"),
    ("oversize frame", b"\x82\xa4type\xa4text\xa4text\xdb" + (2_000_000).to_bytes(4, "big") + b"a" * 2_000_000, "too_large"),
    ("text over the turn limit", "{\"type\": \"text\", \"text\": \"" + "a" * 20_001 + "\"}", "limit"),
    ("turn.end with no turn", "{\"type\": \"turn.end\"}", "bad_message"),
    ("playback of a future turn", "{\"type\": \"playback\", \"turn\": 99, \"played_ms\": 1}", "bad_message"),
    ("second session.start", "{\"type\": \"session.start\"}", "bad_message"),
    ("unknown voice", "{\"type\": \"session.update\", \"speakers\": [{\"speaker\": 0, \"voice\": \"nobody\"}]}", "bad_message"),
    ("voice not audio", "{\"type\": \"voice.create\", \"audio\": \"aGVsbG8=\", \"text\": \"hi\"}", "bad_message"),
]


async def test_every_bad_input_gets_an_error_and_the_session_survives(server: Server) -> None:
    client = await Client.connect(server.url)
    # before session.start
    await client.send(type="text", text="too early")
    err, _ = await client.until("error")
    assert err["code"] == "not_started" and err["fatal"] is False
    await client.ping()
    await client.start()
    for name, frame, code in BAD_INPUTS:
        await client.ws.send(frame)
        err, before = await client.until("error", timeout=10)
        assert err["code"] == code, name
        assert err["fatal"] is False, name
        assert err["message"], name
        await client.ping()
    done, _ = await speak(client, ["Still alive."], 0)
    assert done["reason"] == "complete"
    await client.close()


async def test_voice_create_registers_and_speakers_use_it(server: Server) -> None:
    client = await Client.connect(server.url)
    await client.start()
    rate = 16000
    t = np.arange(rate * 3) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    await client.send(type="voice.create", voice="narrator", audio=buf.getvalue(), text="A test reference.")
    created, _ = await client.until("voice.created")
    assert created["voice"] == "narrator" and created["seconds"] == pytest.approx(3.0, abs=0.01)
    await client.send(type="session.update", speakers=[{"speaker": 0, "voice": "narrator"}])
    ready, _ = await client.until("session.ready")
    assert ready["speakers"] == [{"speaker": 0, "voice": "narrator"}]
    done, _ = await speak(client, ["Now in the narrator voice."], 0)
    assert done["reason"] == "complete"
    # too short a reference is refused with a clear limit error
    with wave.open(buf := io.BytesIO(), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * 100)
    await client.send(type="voice.create", audio=buf.getvalue(), text="short")
    err, _ = await client.until("error")
    assert err["code"] == "limit"
    await client.close()


async def test_health_and_metrics(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        client = await Client.connect(server.url)
        await client.start()
        await speak(client, ["Counting."], 0)
        await client.send(type="dance")
        await client.until("error")
        metrics = (await http.get("/metrics")).text
        assert "shoal_sessions_open 1.0" in metrics
        assert 'shoal_turns_total{reason="complete"} 1.0' in metrics
        assert 'shoal_errors_total{code="unknown_type"} 1.0' in metrics
        assert "shoal_ttfa_seconds_count 1.0" in metrics
        sent = [ln for ln in metrics.splitlines() if ln.startswith("shoal_audio_sent_seconds_total")]
        assert float(sent[0].split()[-1]) > 0.2
        await client.close()


async def test_api_key_header_query_and_refusal(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--api-key", "s3cret")
    try:
        bad = await Client.connect(srv.url)
        await bad.send(type="session.start")
        err = await bad.recv()
        assert err["type"] == "error" and err["code"] == "unauthorized" and err["fatal"] is True
        with pytest.raises(Exception):
            await bad.recv(timeout=5)
        assert bad.ws.close_code == 1008
        wrong = await Client.connect(srv.url + "?token=nope", use_json=True)
        await wrong.send(type="session.start")
        assert (await wrong.recv())["code"] == "unauthorized"
        header = await Client.connect(srv.url, additional_headers={"Authorization": "Bearer s3cret"})
        await header.start()
        await header.close()
        query = await Client.connect(srv.url + "?token=s3cret")
        await query.start()
        await query.close()
    finally:
        srv.stop()


async def test_sigterm_tells_sessions_and_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data)
    client = await Client.connect(srv.url)
    sid = (await client.start())["session"]
    await speak(client, ["Stored before shutdown."], 0)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    err, _ = await client.until("error", timeout=10)
    assert err["fatal"] is True
    with pytest.raises(Exception):
        await client.recv(timeout=5)
    assert client.ws.close_code == 1001
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 10
    srv = start_server(data)
    try:
        again = await Client.connect(srv.url)
        ready = await again.start(session=sid)
        assert ready["resumed"] is True and ready["turns"] == 1
        await again.close()
    finally:
        srv.stop()


def test_say_writes_a_wav(tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "realtime", "say", "Hello from the command line.", "-o", str(out), "--speaker", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    with wave.open(str(out)) as w:
        seconds = w.getnframes() / w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert 1.0 < seconds < 6.0 and rms(pcm / 32768.0) > 0.02
    piped = subprocess.run(
        [sys.executable, "-m", "realtime", "say", "Piped.", "-o", "-"], capture_output=True, timeout=60
    )
    assert piped.returncode == 0 and piped.stdout[:4] == b"RIFF"
    empty = subprocess.run([sys.executable, "-m", "realtime", "say", "  "], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_serve_rejects_bad_arguments_clearly(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "realtime", "serve", "--port", "99999"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "port" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "realtime", "serve", "--redis", "http://x"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "--redis" in bad.stderr


async def test_redis_outage_mid_session_gives_errors_then_recovers(tmp_path: Path) -> None:
    from sessions.embedded import EmbeddedRedis
    from sessions.store import SessionStore

    redis = EmbeddedRedis(tmp_path / "redis").start()
    srv = start_server(tmp_path / "unused", "--redis", redis.url)
    try:
        client = await Client.connect(srv.url)
        sid = (await client.start())["session"]
        redis.stop()  # outage: the gateway keeps the connection, reports, and keeps the turn in memory
        done, msgs = await speak(client, ["Spoken while the store is down."], 0)
        assert done["reason"] == "complete"  # audio does not depend on the store
        err, _ = await client.until("error", timeout=15)
        assert err["code"] == "internal" and "store" in err["message"] and err["fatal"] is False
        await client.ping()
        other = await Client.connect(srv.url)
        await other.send(type="session.start")
        err, _ = await other.until("error", timeout=15)
        assert err["code"] == "internal" and err["fatal"] is False
        await other.ping()
        async with __import__("httpx").AsyncClient(base_url=srv.http) as http:
            assert (await http.get("/healthz")).status_code == 503
        redis.start()  # back: the kept turn is written by the retry loop
        store = SessionStore(redis.url)
        await store.connect()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                session = await store.load_session(sid)
                if session is not None and session.turns == 1:
                    break
                await asyncio.sleep(0.2)
            turns = await store.load_turns(sid)
            assert [t.text for t in turns] == ["Spoken while the store is down."]
        finally:
            await store.aclose()
        await other.start()
        await other.close()
        await client.close()
    finally:
        srv.stop()
        redis.stop()
