"""ElevenLabs' stream-input and multi-stream-input WebSockets against a real `shoal serve`.

The official `elevenlabs` client cannot be pointed at this server: its input-streaming socket always rewrites the
base URL's scheme to wss://, and the server here is plain ws:// on 127.0.0.1. So the client below is written from
ElevenLabs' API reference, and every message the server sends is checked against the official client's own types
(`elevenlabs.types.AudioOutput`, `AudioOutputMulti`, `FinalOutput`, `FinalOutputMulti`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import pytest
import websockets
from elevenlabs.types import AudioOutput, AudioOutputMulti, FinalOutput, FinalOutputMulti

from tests.realtime.adapters.conftest import API_KEY, assert_duration, duration_s, v1_audio_ms
from tests.realtime.conftest import Client, Server

TEXT = "Hello there. How are you doing today?"
CHUNKS = ["Hello there. ", "How are ", "you doing ", "today? "]


def url(server: Server, path: str, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return server.url.replace("/v1/realtime", path) + (f"?{q}" if q else "")


async def stream(server: Server, chunks: list[str], voice: str = "default", key: str | None = API_KEY,
                 in_header: bool = True, **query: str) -> tuple[list[dict[str, Any]], int | None]:
    """One stream-input conversation: the initial message, the chunks, the empty text; every answer until close."""
    headers = {"xi-api-key": key} if key and in_header else {}
    async with websockets.connect(url(server, f"/v1/text-to-speech/{voice}/stream-input", **query),
                                  additional_headers=headers, max_size=None) as ws:
        initial: dict[str, Any] = {"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8},
                                   "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]}}
        if key and not in_header:
            initial["xi-api-key"] = key
        with contextlib.suppress(websockets.ConnectionClosed):  # a refused client may be closed while it sends
            await ws.send(json.dumps(initial))
            for chunk in chunks:
                await ws.send(json.dumps({"text": chunk, "try_trigger_generation": True}))
            await ws.send(json.dumps({"text": ""}))
        answers = []
        try:
            async for frame in ws:
                answers.append(json.loads(frame))
        except websockets.ConnectionClosedError:
            pass
        return answers, ws.close_code


def audio_of(answers: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(a["audio"]) for a in answers if a.get("audio"))


@pytest.mark.parametrize("output_format", ["pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100", "ulaw_8000",
                                           "mp3_44100_128", "mp3_22050_32", "opus_48000_64"])
async def test_stream_input_each_output_format(stub: Server, output_format: str) -> None:
    expected = await v1_audio_ms(stub, TEXT)
    answers, code = await stream(stub, CHUNKS, output_format=output_format)
    assert code == 1000
    for a in answers[:-1]:
        AudioOutput.model_validate(a)
        assert a["audio"]
    assert FinalOutput.model_validate(answers[-1]).is_final is True and "audio" not in answers[-1]
    fmt, rate = output_format.split("_")[:2]
    assert_duration(duration_s(audio_of(answers), fmt, int(rate)), expected, fmt)


async def test_alignment_is_the_word_timing_per_character(stub: Server) -> None:
    """Characters in order, the text as spoken; each word's first character starts where protocol v1's `words`
    put the word (chunk-relative times plus the chunk's place in the audio)."""
    answers, _ = await stream(stub, CHUNKS, output_format="pcm_24000")
    chars: list[str] = []
    starts: list[float] = []
    offset_ms = 0.0
    for a in answers:
        if not a.get("audio"):
            continue
        al = a["alignment"]
        if al is not None:
            assert len(al["chars"]) == len(al["charStartTimesMs"]) == len(al["charDurationsMs"])
            assert al == a["normalizedAlignment"]
            chars += al["chars"]
            starts += [offset_ms + t for t in al["charStartTimesMs"]]
        offset_ms += len(base64.b64decode(a["audio"])) / 2 / 24000 * 1000
    assert "".join(chars) == TEXT
    v1 = await Client.connect(stub.url + f"?token={API_KEY}")
    await v1.start(output={"codec": "pcm16", "sample_rate": 24000, "timestamps": "words"})
    for chunk in CHUNKS:
        await v1.send(type="text", text=chunk)
    await v1.send(type="turn.end")
    _, msgs = await v1.until("turn.done")
    await v1.close()
    words = [w for m in msgs if m["type"] == "words" for w in m["words"]]
    firsts = [i for i, c in enumerate(chars) if c != " " and (i == 0 or chars[i - 1] == " ")]
    assert len(firsts) == len(words)
    for i, w in zip(firsts, words):
        assert starts[i] == pytest.approx(w["start_ms"], abs=1.0), (chars[i], w)


async def test_auth_and_errors(stub: Server) -> None:
    answers, code = await stream(stub, CHUNKS, key="wrong")
    assert code == 1008 and answers == [{"message": "invalid API key (xi-api-key)", "error": "unauthorized"}]
    answers, code = await stream(stub, CHUNKS, in_header=False)  # the key in the initial message works too
    assert code == 1000 and answers[-1] == {"isFinal": True}
    answers, code = await stream(stub, CHUNKS, voice="no-such-voice")
    assert code == 1008 and answers[0]["error"] == "bad_message" and "not registered" in answers[0]["message"]
    answers, code = await stream(stub, CHUNKS, output_format="wav_44100")
    assert code == 1008 and "output_format" in answers[0]["message"]
    answers, code = await stream(stub, [])  # nothing said: final at once
    assert answers == [{"isFinal": True}] and code == 1000


async def test_a_named_session_resumes_over_protocol_v1(stub: Server) -> None:
    answers, _ = await stream(stub, CHUNKS, output_format="pcm_16000", session="eleven-1")
    assert answers[-1] == {"isFinal": True}
    v1 = await Client.connect(stub.url + f"?token={API_KEY}")
    ready = await v1.start(session="eleven-1")
    assert ready["resumed"] is True and ready["history"][0]["text"] == TEXT
    await v1.close()


async def test_multi_stream_input_contexts_side_by_side(stub: Server) -> None:
    """Two contexts speak at once; one is closed with its text unflushed (a barge-in: it stops at once), the other
    finishes what was flushed; close_socket ends the socket after every context's isFinal."""
    async with websockets.connect(url(stub, "/v1/text-to-speech/default/multi-stream-input",
                                      output_format="pcm_24000"),
                                  additional_headers={"xi-api-key": API_KEY}, max_size=None) as ws:
        send = lambda **m: ws.send(json.dumps(m))  # noqa: E731
        await send(text=" ", context_id="narrator", voice_settings={"speed": 1.0})
        await send(text="Once upon a time there was a very long story that went on and on. ", context_id="narrator")
        await send(text="It had many sentences, each one longer than the one before it. ", context_id="narrator")
        await send(text=" ", context_id="guard")
        await send(text="Halt! Who goes there? ", context_id="guard", flush=True)
        answers: list[dict[str, Any]] = []
        by_context: dict[str, list[dict[str, Any]]] = {"narrator": [], "guard": []}
        async def read_until(pred) -> None:  # type: ignore[no-untyped-def]
            while True:
                a = json.loads(await asyncio.wait_for(ws.recv(), 20))
                answers.append(a)
                if a.get("audio"):
                    AudioOutputMulti.model_validate(a)
                else:
                    FinalOutputMulti.model_validate(a)
                by_context[a["contextId"]].append(a)
                if pred(a):
                    return
        await read_until(lambda a: a["contextId"] == "narrator" and a.get("audio"))
        await send(context_id="narrator", close_context=True)  # unflushed text: it stops now
        await read_until(lambda a: a["contextId"] == "narrator" and a.get("isFinal"))
        await send(close_socket=True)
        with pytest.raises(websockets.ConnectionClosedOK):
            await read_until(lambda a: False)
    assert by_context["guard"][-1] == {"isFinal": True, "contextId": "guard"}
    guard = b"".join(base64.b64decode(a["audio"]) for a in by_context["guard"] if a.get("audio"))
    expected = await v1_audio_ms(stub, "Halt! Who goes there?")
    assert_duration(duration_s(guard, "pcm", 24000), expected, "pcm")
    narrator = b"".join(base64.b64decode(a["audio"]) for a in by_context["narrator"] if a.get("audio"))
    full = await v1_audio_ms(stub, "Once upon a time there was a very long story that went on and on.")
    assert duration_s(narrator, "pcm", 24000) * 1000 < full, "the closed context stopped early"
