"""Word timing end to end, against a real `shoal serve`: `words` and `visemes` before the audio they cover, word
onsets that agree with the decoded Opus audio (built-in voice), word-exact cuts that resume shows (stub engine, whose
timing is deterministic), estimated timing for S2 Pro (tiny fixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.markup import words_of
from realtime.audio import decode_opus
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.realtime.conftest import Client, Server, start_server
from tests.realtime.test_e2e import speak

LINES = (
    "Peter picked a peck of pickled peppers. Then he sat down by the big red barn.",
    "Bright kites fly past tall trees. Good dogs bark at cats.",
)


def check_order(msgs: list[dict], frame_ms: float) -> list[dict]:
    """Every `words` / `visemes` message came before any audio packet of its turn that holds its first word's (or
    viseme's) start; `segment`, `words`, `visemes` in that order. Returns the turn's words, in order."""
    packets: list[dict] = []
    words: list[dict] = []
    last = None
    for m in msgs:
        if m["type"] == "audio":
            packets.append(m)
        elif m["type"] in ("words", "visemes"):
            first = m["words"][0]["start_ms"] if m["type"] == "words" else m["visemes"][0]["start_ms"]
            late = [p for p in packets if p["ms"] + frame_ms > first]
            assert not late, f"{m['type']} starting at {first} ms came after audio packet {late[0]['seq']}"
            assert last == ("segment" if m["type"] == "words" else "words"), "segment, words, visemes in order"
            if m["type"] == "words":
                words.extend(m["words"])
        last = m["type"]
    return words


def onsets_ms(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Energy onsets: where the 10 ms log energy rises by 6 dB or more over 30 ms, from a floor of sound."""
    hop = rate // 200  # 5 ms
    frames = pcm[: pcm.size // hop * hop].reshape(-1, hop)
    energy = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
    smooth = np.convolve(energy, np.ones(2) / 2, mode="same")
    rise = smooth[6:] - smooth[:-6]  # over 30 ms
    candidates = np.flatnonzero((rise[1:] >= 6.0) & (rise[:-1] < 6.0)) + 1
    return candidates * 5.0


async def test_builtin_voice_words_arrive_first_and_match_the_audio(server: Server) -> None:
    client = await Client.connect(server.url)
    ready = await client.start(output={"timestamps": "visemes"})
    assert ready["engine"]["timing"] == "exact" and ready["output"]["timestamps"] == "visemes"
    distances: list[float] = []
    shifted: dict[int, list[float]] = {}
    for turn, line in enumerate(LINES):
        done, msgs = await speak(client, [line], 0)
        assert done["reason"] == "complete"
        words = check_order(msgs, ready["output"]["frame_ms"])
        segments = [m for m in msgs if m["type"] == "segment"]
        assert [w["text"] for w in words] == [w for s in segments for w in words_of(s["text"])] == line.split()
        starts = [w["start_ms"] for w in words]
        assert starts == sorted(starts)
        assert all(0 <= w["start_ms"] < w["end_ms"] <= done["audio_ms"] for w in words)
        assert all(a["end_ms"] <= b["start_ms"] for a, b in zip(words, words[1:]))
        visemes = [v for m in msgs if m["type"] == "visemes" for v in m["visemes"]]
        assert len({v["id"] for v in visemes}) >= 8  # the mouth takes many shapes
        pcm = decode_opus([m["data"] for m in msgs if m["type"] == "audio"])
        onsets = onsets_ms(pcm, 48000)
        distances += [float(np.min(np.abs(onsets - start))) for start in starts]
        for shift in (-150, -80, 80, 150):
            shifted.setdefault(shift, []).extend(float(np.min(np.abs(onsets - start - shift))) for start in starts)
    median = float(np.median(distances))
    assert median < 40.0, f"median distance from a word's start to the nearest energy onset: {median:.1f} ms"
    # and the onsets are not so dense that any timing would pass: the same words shifted by 80-150 ms do worse
    control = min(float(np.median(v)) for v in shifted.values())
    assert median < 0.7 * control, (median, control)
    await client.close()


@pytest.fixture
def stub(tmp_path: Path):
    srv = start_server(tmp_path / "data", "--engine", "stub", "--stub-ttft-ms", "0")
    yield srv
    srv.stop()


async def test_a_cut_keeps_exactly_the_words_started_before_it_and_resume_shows_them(stub: Server) -> None:
    client = await Client.connect(stub.url)
    ready = await client.start(output={"timestamps": "words", "lead_ms": 10_000})
    assert ready["engine"]["timing"] == "exact"
    text = "One two three four five six seven eight nine ten."
    done, msgs = await speak(client, [text], 0)
    words = check_order(msgs, ready["output"]["frame_ms"])
    assert [w["text"] for w in words] == text.split()
    cut = (words[4]["start_ms"] + words[5]["start_ms"]) / 2  # inside the fifth word
    await client.send(type="playback", turn=done["turn"], played_ms=cut)
    await client.ping()
    await client.close()
    again = await Client.connect(stub.url)
    resumed = await again.start(session=ready["session"])
    assert resumed["history"][-1]["text"] == "One two three four five"
    assert resumed["history"][-1]["audio_ms"] == round(cut)
    await again.close()


async def test_timing_messages_only_when_asked(stub: Server) -> None:
    client = await Client.connect(stub.url)
    ready = await client.start()
    assert "timestamps" not in ready["output"]
    _, msgs = await speak(client, ["[whisper] Quietly now."], 0)
    assert not [m for m in msgs if m["type"] in ("words", "visemes")]
    segment = next(m for m in msgs if m["type"] == "segment")
    assert (segment["text"], segment["markup"], segment["speaker"]) == ("Quietly now.", "[whisper] Quietly now.", 0)
    await client.send(type="session.update", output={"timestamps": "words", "mix": True})
    error, _ = await client.until("error")
    assert error["code"] == "bad_message" and "mix" in error["message"]
    await client.ping()
    await client.close()


async def test_s2pro_timing_is_estimated_over_the_real_audio(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--model", str(MODEL_DIR), "--codec", str(FIXTURES / "codec" / "codec.pth"),
                       timeout=120)
    try:
        client = await Client.connect(srv.url)
        ready = await client.start(output={"timestamps": "visemes"}, sampling={"seed": 3, "max_frames": 12})
        assert ready["engine"]["name"] == "s2pro" and ready["engine"]["timing"] == "estimated"
        done, msgs = await speak(client, ["Hi there, friend."], 0)
        words_msgs = [m for m in msgs if m["type"] == "words"]
        assert len(words_msgs) == 1 and words_msgs[0]["estimated"] is True
        words = check_order(msgs, ready["output"]["frame_ms"])
        assert [w["text"] for w in words] == ["Hi", "there,", "friend."]
        # the segment's words cover its audio (the fixture's noise-like audio has no silence at either end), in
        # order, without overlap
        assert 0 <= words[0]["start_ms"] <= 20 and done["audio_ms"] - 40 <= words[-1]["end_ms"] <= done["audio_ms"]
        assert all(a["start_ms"] < a["end_ms"] <= b["start_ms"] for a, b in zip(words, words[1:]))
        assert [m for m in msgs if m["type"] == "visemes"]
        await client.close()
    finally:
        srv.stop()
