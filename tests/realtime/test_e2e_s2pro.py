"""`shoal serve --model` end to end with the tiny S2 Pro fixture: codes stored per turn, history in the prompt,
voices encoded once (cloning). The fixture's weights are random, so only structure and numbers are checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from realtime.audio import decode_opus
from sessions.embedded import EmbeddedRedis
from sessions.store import SessionStore
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.realtime.conftest import Client, Server, start_server, tone_wav
from tests.realtime.test_e2e import speak

FRAME_MS = 1000 * 2048 / 44100
SAMPLING = {"temperature": 0.7, "seed": 7, "max_frames": 10}


@pytest.fixture
def s2(tmp_path: Path):
    srv = start_server(tmp_path / "data", "--model", str(MODEL_DIR), "--codec", str(FIXTURES / "codec" / "codec.pth"),
                       timeout=120)
    yield srv
    srv.stop()


async def stored_turns(srv: Server, sid: str):
    store = SessionStore(EmbeddedRedis(srv.data_dir).url)
    await store.connect()
    try:
        return await store.load_turns(sid)
    finally:
        await store.aclose()


async def test_turns_stream_and_store_their_codes_with_history_in_the_prompt(s2: Server) -> None:
    a = await Client.connect(s2.url)
    ready = await a.start(sampling=SAMPLING)
    assert ready["engine"]["name"] == "s2pro" and ready["engine"]["cloning"] is True
    assert ready["engine"]["sample_rate"] == 44100
    done0, msgs0 = await speak(a, ["Hello there."], 0)
    done1, _ = await speak(a, ["And again."], 1)
    done2, msgs2 = await speak(a, ["Third ", "time."], 0)
    for done in (done0, done1, done2):
        assert done["reason"] == "length"  # random weights never say <|im_end|>: the frame limit ends the turn
        assert done["audio_ms"] == pytest.approx(10 * FRAME_MS, abs=20.0)  # 10 frames, padded to 20 ms packets
    for msgs in (msgs0, msgs2):
        pcm = decode_opus([m["data"] for m in msgs if m["type"] == "audio"])
        assert len(pcm) / 48000 == pytest.approx(10 * FRAME_MS / 1000, abs=0.03)
        assert float(np.sqrt(np.mean(pcm**2))) > 0.01  # the codec's (noise-like) audio, not silence
    await a.close()
    turns = await stored_turns(s2, ready["session"])
    assert [t.speaker for t in turns] == [0, 1, 0]
    assert all(t.codes is not None and t.codes.shape == (10, 10) for t in turns)
    # the same text with the same seed in a fresh session (no history) gives other codes: history was in the prompt
    b = await Client.connect(s2.url)
    fresh = await b.start(sampling=SAMPLING)
    await speak(b, ["And again."], 1)
    await b.close()
    alone = (await stored_turns(s2, fresh["session"]))[0]
    assert not np.array_equal(alone.codes, turns[1].codes)


async def test_voice_create_encodes_the_reference_once(s2: Server) -> None:
    client = await Client.connect(s2.url)
    await client.start(sampling=SAMPLING)
    rate = 44100
    await client.send(type="voice.create", voice="ref", audio=tone_wav(rate, 2.0), text="A steady tone.")
    created, _ = await client.until("voice.created", timeout=60)
    assert created["frames"] == int(np.ceil(2 * rate / 2048))
    await client.send(type="session.update", speakers=[{"speaker": 0, "voice": "ref"}])
    await client.until("session.ready")
    done, _ = await speak(client, ["In the reference voice."], 0)
    assert done["reason"] == "length" and done["frames"] > 0
    await client.close()


async def test_cancel_cuts_the_stored_codes_frame_exactly(s2: Server) -> None:
    client = await Client.connect(s2.url)
    ready = await client.start(sampling={"temperature": 0.7, "seed": 1, "max_frames": 400})
    await client.send(type="text", text="A long one.")
    await client.send(type="turn.end")
    while (await client.until("audio", timeout=60))[0]["ms"] < 10 * FRAME_MS:
        pass  # let the server send well past what the listener will report
    await client.send(type="playback", turn=0, played_ms=3 * FRAME_MS)
    await client.send(type="cancel")
    done, _ = await client.until("turn.done", timeout=30)
    assert done["reason"] == "cancelled"
    await client.close()
    # the writer stores the turn after turn.done; a resume waits for the closed connection to let go
    again = await Client.connect(s2.url)
    assert (await again.start(session=ready["session"]))["turns"] == 1
    await again.close()
    turn = (await stored_turns(s2, ready["session"]))[0]
    assert (turn.state, turn.codes.shape, turn.audio_ms) == ("cancelled", (10, 3), round(3 * FRAME_MS)), done


def test_serve_with_a_broken_checkpoint_fails_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text((MODEL_DIR / "config.json").read_text())
    base = [sys.executable, "-m", "realtime", "serve", "--port", "0", "--model", str(bad), "--data-dir", str(tmp_path)]
    no_codec = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert no_codec.returncode == 2 and "codec.pth not found" in no_codec.stderr
    codec = ["--codec", str(FIXTURES / "codec" / "codec.pth")]
    no_weights = subprocess.run(base + codec, capture_output=True, text=True, timeout=60)
    assert no_weights.returncode == 2 and "Traceback" not in no_weights.stderr
    assert "error" in no_weights.stderr and str(bad) in no_weights.stderr


async def test_two_contexts_are_batched_and_both_stored_with_their_codes(s2: Server) -> None:
    client = await Client.connect(s2.url)
    sid = (await client.start(sampling=SAMPLING, speakers=[{"speaker": 0}, {"speaker": 1}]))["session"]
    for ctx, speaker, text in (("a", 0, "First voice here."), ("b", 1, "Second voice, at the same time.")):
        await client.send(type="text", text=text, speaker=speaker, context=ctx)
        await client.send(type="turn.end", context=ctx)
    done: dict[str, dict] = {}
    audio_contexts: list[str] = []
    while len(done) < 2:
        msg = await client.recv(timeout=60)
        if msg["type"] == "audio":
            audio_contexts.append(msg["context"])
        elif msg["type"] == "turn.done":
            done[msg["context"]] = msg
    assert {d["reason"] for d in done.values()} <= {"complete", "length"} and all(d["frames"] for d in done.values())
    first_done = min(i for i, c in enumerate(audio_contexts) if audio_contexts[i:].count(c) == 1)
    assert len(set(audio_contexts[: first_done + 1])) == 2  # both spoke before either finished: side by side
    await client.close()
    again = await Client.connect(s2.url)  # a resume waits for the closed connection to have stored its turns
    assert (await again.start(session=sid))["turns"] == 2
    await again.close()
    turns = await stored_turns(s2, sid)
    assert [(t.index, t.context, t.speaker) for t in turns] == [(0, "a", 0), (1, "b", 1)]
    assert all(t.codes is not None and t.codes.shape[0] == 10 and t.codes.shape[1] > 0 for t in turns)


async def test_a_committed_caller_turn_is_stored_with_its_codes(s2: Server) -> None:
    """input.commit under S2 Pro: the caller's audio goes through the codec encoder once and is stored as the turn's
    codes, so the next prompt holds the caller's own sound (the tiny fixture's codec has random weights)."""
    a = await Client.connect(s2.url)
    ready = await a.start(sampling=SAMPLING, input={"codec": "pcm16", "sample_rate": 16000, "vad": "off"})
    await speak(a, ["Hello there."], 0)
    tone = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)  # 1 s of "caller"
    pcm16 = (tone * 32767).astype("<i2").tobytes()
    for i in range(0, len(pcm16), 640):
        await a.send(type="input.audio", data=pcm16[i : i + 640])
    await a.ping()
    await a.send(type="input.commit", speaker=1, text="Hi, it is me.", start_ms=0, end_ms=1000)
    done, msgs = await speak(a, ["Nice to hear you."], 0)
    assert done["turn"] == 2 and not [m for m in msgs if m["type"] == "error"]
    await a.close()
    turns = await stored_turns(s2, ready["session"])
    caller = turns[1]
    assert (caller.speaker, caller.text, caller.context, caller.audio_ms) == (1, "Hi, it is me.", "input", 1000)
    assert caller.codes is not None and caller.codes.shape[0] == 10
    assert abs(caller.codes.shape[1] - 21.5) <= 2  # one second of codec frames
