"""A voice registered while the built-in voice served has no codes; the S2 Pro engine encodes its stored reference
audio the first time it meets it, once, and the codes are stored back."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from sessions.embedded import EmbeddedRedis
from sessions.store import SessionStore
from tests.engine.dualar import CODEC, MODEL_DIR
from tests.realtime.conftest import Client, start_server, tone_wav
from tests.realtime.test_e2e import speak

RATE, SECONDS = 16000, 2.0


async def stored_voice(data_dir: Path, voice: str):  # noqa: ANN201
    async with SessionStore(EmbeddedRedis(data_dir).url) as store:
        return await store.get_voice(voice)


def encoded_total(http: str) -> float:
    for line in httpx.get(f"{http}/metrics", timeout=10).text.splitlines():
        if line.startswith("shoal_engine_voices_encoded_total "):
            return float(line.split()[1])
    raise AssertionError("no shoal_engine_voices_encoded_total in /metrics")


async def test_a_voice_made_under_the_built_in_voice_is_encoded_once_by_s2pro_and_stored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    builtin = start_server(data)  # the built-in voice: it cannot clone
    try:
        client = await Client.connect(builtin.url)
        await client.start()
        await client.send(type="voice.create", voice="ref", audio=tone_wav(RATE, SECONDS), text="A steady tone.")
        created, _ = await client.until("voice.created", timeout=30)
        assert created["frames"] == 0
        await client.close()
        voice = await stored_voice(data, "ref")
        assert voice is not None and voice.codes is None  # no codes: the built-in voice cannot clone
        assert voice.audio_format == "ogg-opus" and voice.seconds == SECONDS  # the audio kept, compressed
    finally:
        builtin.stop()

    s2 = start_server(data, "--model", str(MODEL_DIR), "--codec", str(CODEC), timeout=120)
    try:
        assert encoded_total(s2.http) == 0
        for turn in range(2):  # two sessions: the first meets the voice without codes, the second finds them stored
            client = await Client.connect(s2.url)
            await client.start(speakers=[{"speaker": 0, "voice": "ref"}], sampling={"seed": 1, "max_frames": 4})
            done, _ = await speak(client, ["In the reference voice."], 0)
            assert done["reason"] == "length" and done["frames"] > 0
            await client.close()
            assert encoded_total(s2.http) == 1, turn  # encoded once, not once per session
        voice = await stored_voice(data, "ref")
        assert voice is not None and voice.codes is not None
        assert voice.codes.dtype == np.int16 and voice.codes.shape == (10, int(np.ceil(SECONDS * 44100 / 2048)))
    finally:
        s2.stop()
