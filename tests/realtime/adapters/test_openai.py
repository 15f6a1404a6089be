"""OpenAI's speech endpoint through the official `openai` client, pointed at a real `shoal serve` by `base_url`."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from tests.realtime.adapters.conftest import API_KEY, assert_duration, duration_s, v1_audio_ms
from tests.realtime.conftest import Client, Server

TEXT = "Hello there. How are you doing today?"


def client(server: Server, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.http + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
async def test_each_format_streams_audio_of_the_right_length(stub: Server, fmt: str) -> None:
    expected = await v1_audio_ms(stub, TEXT)
    chunks: list[bytes] = []
    async with client(stub).audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input=TEXT, response_format=fmt  # type: ignore[arg-type]
    ) as response:
        assert response.status_code == 200
        async for chunk in response.iter_bytes():
            chunks.append(chunk)
    assert_duration(duration_s(b"".join(chunks), fmt, 24000), expected, fmt)


async def test_sse_stream_format(stub: Server) -> None:
    expected = await v1_audio_ms(stub, TEXT)
    async with httpx.AsyncClient(base_url=stub.http, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "pcm", "stream_format": "sse"}
        async with http.stream("POST", "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] == len(TEXT)
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert_duration(duration_s(pcm, "pcm", 24000), expected, "pcm")


async def test_errors_come_in_openais_shape(stub: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as auth:
        await client(stub, "sk-wrong").audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as voice:
        await client(stub).audio.speech.create(model="tts-1", voice="no-such-voice", input="Hi.")
    assert "not registered" in voice.value.message and voice.value.code == "bad_message"
    async with httpx.AsyncClient(base_url=stub.http, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        for body, param in (({"model": "tts-1", "voice": "alloy"}, "input"),
                            ({"model": "tts-1", "voice": "alloy", "input": "x", "response_format": "ogg"},
                             "response_format"),
                            ({"model": "tts-1", "voice": "alloy", "input": "x", "speed": 9}, "speed")):
            r = await http.post("/v1/audio/speech", json=body)
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        r = await http.post("/v1/audio/speech", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


async def test_a_named_session_is_resumable_over_protocol_v1(stub: Server) -> None:
    await client(stub).audio.speech.create(model="tts-1", voice="alloy", input="First line.", response_format="pcm",
                                          extra_body={"session": "openai-named-1"}, speed=0.5,
                                          instructions="Speak warmly")
    await client(stub).audio.speech.create(model="tts-1", voice="alloy", input="Second line.", response_format="pcm",
                                          extra_body={"session": "openai-named-1"})
    v1 = await Client.connect(stub.url + f"?token={API_KEY}")
    ready = await v1.start(session="openai-named-1")
    assert ready["resumed"] is True and ready["turns"] == 2
    texts = [t["text"] for t in ready["history"]]
    assert texts[0].endswith("First line.") and "[slow]" in texts[0] and "[Speak warmly]" in texts[0]
    assert texts[1] == "Second line."
    await v1.send(type="text", text="And a third, over protocol v1.")
    await v1.send(type="turn.end")
    done, _ = await v1.until("turn.done")
    assert done["turn"] == 2 and done["reason"] == "complete"
    await v1.close()
