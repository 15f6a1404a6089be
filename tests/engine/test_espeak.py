"""The built-in espeak-ng voice: streaming, voices, instructions, cancel, worker failure, flow control."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from engine.base import EngineError, SynthesisRequest, VoiceRef
from engine.espeak import SAMPLE_RATE, EspeakConfig, EspeakSynthesizer
from engine.espeak_voice import TIMBRES, plan_segments, speaker_timbre, style_of, voice_timbres

LONG = " ".join(f"This is sentence number {i} of a long and winding reply." for i in range(60))  # ~ 3 minutes


async def started(**options: object) -> EspeakSynthesizer:
    synth = EspeakSynthesizer(EspeakConfig(**options))  # type: ignore[arg-type]
    await synth.start()
    return synth


@pytest.fixture
async def espeak() -> AsyncIterator[EspeakSynthesizer]:
    synth = await started(workers=2)
    yield synth
    await synth.aclose()


@pytest.fixture
async def single() -> AsyncIterator[EspeakSynthesizer]:
    synth = await started(workers=1, window=4, stall_timeout_s=1.0)
    yield synth
    await synth.aclose()


async def speak(synth: EspeakSynthesizer, text: str, **fields: object) -> np.ndarray:
    async with asyncio.timeout(30):
        chunks = [c.pcm async for c in synth.synthesize(SynthesisRequest(text, **fields))]  # type: ignore[arg-type]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def duration(pcm: np.ndarray) -> float:
    return pcm.size / SAMPLE_RATE


# -- the engine ------------------------------------------------------------------------------------------------


def test_info() -> None:
    info = EspeakSynthesizer(EspeakConfig(workers=1)).info
    assert (info.name, info.sample_rate, info.cloning) == ("espeak", 22050, False)


@pytest.mark.parametrize(
    "options",
    [{"workers": 0}, {"workers": 1.5}, {"window": 0}, {"language": "en us; rm"}, {"stall_timeout_s": -1},
     {"start_timeout_s": float("nan")}, {"buffer_ms": True}],
)
def test_config_is_validated(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EspeakConfig(**options)  # type: ignore[arg-type]


async def test_first_chunk_comes_long_before_the_utterance_is_done(espeak: EspeakSynthesizer) -> None:
    start = time.perf_counter()
    first_at, first_size, total = 0.0, 0, 0
    async for chunk in espeak.synthesize(SynthesisRequest(LONG)):
        if not total:
            first_at, first_size = time.perf_counter() - start, chunk.pcm.size
        total += chunk.pcm.size
    done_at = time.perf_counter() - start
    assert total / SAMPLE_RATE > 60  # a long utterance...
    assert first_size < 0.2 * SAMPLE_RATE  # ...that arrives in small pieces...
    assert first_at < done_at / 5  # ...the first of them long before the last


async def test_distinct_speakers_sound_different(espeak: EspeakSynthesizer) -> None:
    text = "Hello there, how are you doing today?"
    audio = [await speak(espeak, text, speaker=s) for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert audio[i].size != audio[j].size or not np.allclose(audio[i], audio[j], atol=1e-3)


async def test_speaker_tags_switch_voices_mid_request(espeak: EspeakSynthesizer) -> None:
    one = await speak(espeak, "Hello there. <|speaker:1|>Hello there.")
    zero = await speak(espeak, "Hello there. Hello there.")
    assert one.size != zero.size or not np.allclose(one, zero, atol=1e-3)


async def test_same_voice_id_gives_identical_audio_in_separate_engines() -> None:
    texts = ["Nice to meet you, my name is Alice.", "[whisper] And this is a secret."]
    voices = {0: VoiceRef("alice", "transcript")}
    runs = []
    for _ in range(2):
        synth = await started(workers=1)
        try:
            runs.append([await speak(synth, text, voices=voices) for text in texts])
        finally:
            await synth.aclose()
    for first, second in zip(*runs):
        assert first.size > 0 and np.array_equal(first, second)


async def test_different_voice_ids_sound_different(espeak: EspeakSynthesizer) -> None:
    text = "Nice to meet you."
    alice = await speak(espeak, text, voices={0: VoiceRef("alice", "")})
    bob = await speak(espeak, text, voices={0: VoiceRef("bob", "")})
    assert alice.size != bob.size or not np.allclose(alice, bob, atol=1e-3)


async def test_bracket_instructions_are_never_spoken(single: EspeakSynthesizer) -> None:
    plain = duration(await speak(single, "hello world"))
    spoken_word = duration(await speak(single, "hello whisper world"))
    assert spoken_word > plain + 0.2  # the word itself is clearly audible in duration
    # An unknown instruction is dropped; a trailing one has nothing to apply to.
    assert abs(duration(await speak(single, "hello [laughs] world")) - plain) < 0.02
    assert abs(duration(await speak(single, "hello world [whisper]")) - plain) < 0.02
    # A known one changes delivery, not content: nowhere near the spoken-word length.
    leading = await speak(single, "[whisper] hello world")
    assert abs(duration(leading) - plain) < 0.1
    assert abs(duration(await speak(single, "hello [whisper] world")) - plain) < spoken_word - plain - 0.1
    # ...and it does change the delivery: a whisper is quieter than the voice.
    assert np.sqrt(np.mean(leading**2)) < 0.9 * np.sqrt(np.mean((await speak(single, "hello world")) ** 2))


async def test_markup_like_text_is_read_not_obeyed(single: EspeakSynthesizer) -> None:
    # No SSML or phoneme flags are passed: a <break> is not a three-second pause, [[...]] is not phonemes.
    assert duration(await speak(single, "hello <break time='3s'/> world")) < 3.5
    assert duration(await speak(single, "a < b & c > d")) > 1.0
    plain = duration(await speak(single, "hello world"))
    assert abs(duration(await speak(single, "hello [[h@loU]] world")) - plain) < 0.02  # brackets are instructions


async def test_cancel_mid_utterance_frees_the_worker(single: EspeakSynthesizer) -> None:
    pid = single.worker_pids()
    stream = single.synthesize(SynthesisRequest(LONG))
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    start = time.perf_counter()
    assert duration(await speak(single, "Next, please.")) > 0.5
    assert time.perf_counter() - start < 2.0  # the worker did not finish three minutes of speech first
    assert single.worker_pids() == pid and single.stats().restarts == 0  # freed by cancel, not replaced
    assert single.stats().busy == 0


async def test_a_worker_is_free_once_it_has_spoken_however_slowly_its_audio_is_taken() -> None:
    """A paced consumer (the gateway plays audio in real time) does not hold the worker: a second request gets the
    only worker while the first one's audio is still being taken."""
    one = await started(workers=1)  # the default window: a sentence fits in it many times over
    try:
        first = one.synthesize(SynthesisRequest("A short sentence, said at once."))
        await anext(first)  # taken one chunk at a time from here on
        await asyncio.sleep(0.3)
        async with asyncio.timeout(5):
            second = [c async for c in one.synthesize(SynthesisRequest("And another one."))]
        assert second and sum(c.pcm.size for c in second) > SAMPLE_RATE // 2
        rest = [c async for c in first]
        assert rest
    finally:
        await one.aclose()


async def test_requests_queue_for_a_free_worker(single: EspeakSynthesizer) -> None:
    results = await asyncio.gather(*(speak(single, f"Request {i}.") for i in range(4)))
    assert all(duration(pcm) > 0.3 for pcm in results)


async def test_killed_worker_fails_its_request_and_the_pool_recovers(single: EspeakSynthesizer) -> None:
    [pid] = single.worker_pids()
    stream = single.synthesize(SynthesisRequest(LONG))
    await anext(stream)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EngineError):
        async with asyncio.timeout(10):
            async for _ in stream:
                pass  # the chunks already in flight, then the error
    assert duration(await speak(single, "Still here.")) > 0.3
    assert single.worker_pids() != [pid] and single.stats().restarts >= 1
    assert single.health() is None


async def test_worker_killed_while_idle_is_replaced(single: EspeakSynthesizer) -> None:
    [pid] = single.worker_pids()
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert duration(await speak(single, "Still here.")) > 0.3
    assert single.worker_pids() != [pid]


async def test_hung_worker_fails_its_request_and_is_replaced(single: EspeakSynthesizer) -> None:
    [pid] = single.worker_pids()
    stream = single.synthesize(SynthesisRequest(LONG))
    await anext(stream)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(EngineError, match="stopped answering"):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
        assert duration(await speak(single, "Still here.")) > 0.3
        assert single.worker_pids() != [pid]
    finally:
        if single.worker_pids() == [pid]:
            os.kill(pid, signal.SIGCONT)


async def test_a_consumer_that_stops_pulling_stops_the_worker(single: EspeakSynthesizer) -> None:
    window = single.config.window
    before = single.stats().chunks_received
    stream = single.synthesize(SynthesisRequest(LONG))
    await anext(stream)
    await asyncio.sleep(0.5)  # unthrottled, espeak-ng would make minutes of audio in this time
    # a window in flight, a window taken ahead (so a worker is free as soon as it has spoken, whatever the consumer's
    # pace), the chunk pulled, and the one held back so the last chunk can carry the timing
    assert single.stats().chunks_received - before <= 2 * window + 2
    assert single.stats().busy == 1
    rest = 0
    async with asyncio.timeout(30):
        async for _ in stream:
            rest += 1
    assert rest > 20 * window  # it was waiting, not finished
    # LONG runs past the default max_frames, so the stream stops with at most a window of chunks unused.
    assert 0 <= single.stats().chunks_received - before - (rest + 1) <= window + 1


async def test_health_reports_why_no_worker_starts() -> None:
    synth = await started(workers=1, language="zz")  # no such espeak-ng voice
    try:
        reason = synth.health()
        assert reason is not None and "zz" in reason
        with pytest.raises(EngineError):
            await speak(synth, "hello")
    finally:
        await synth.aclose()


# -- voices and instructions (pure) ----------------------------------------------------------------------------


def test_voice_choice_is_stable_across_processes() -> None:
    ids = ["alice", "bob", "carol", "voice-0001"]
    script = (
        "import json; from engine.base import VoiceRef; from engine.espeak_voice import voice_timbres;"
        f"print(json.dumps({{s: list(t) for s, t in voice_timbres({{i: VoiceRef(v, '') for i, v in enumerate({ids!r})}}).items()}}))"
    )
    here = {str(s): list(t) for s, t in voice_timbres({i: VoiceRef(v, "") for i, v in enumerate(ids)}).items()}
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert json.loads(out.stdout) == here


def test_distinct_voice_ids_get_distinct_timbres_while_the_palette_lasts() -> None:
    voices = {i: VoiceRef(f"voice-{i}", "") for i in range(len(TIMBRES))}
    timbres = voice_timbres(voices)
    assert len({t.variant for t in timbres.values()}) == len(TIMBRES)
    shared = voice_timbres({0: VoiceRef("same", ""), 5: VoiceRef("same", "")})
    assert shared[0] == shared[5]


def test_builtin_speakers_are_distinct() -> None:
    assert len({speaker_timbre(s) for s in range(3 * len(TIMBRES))}) == 3 * len(TIMBRES)


def test_styles() -> None:
    assert style_of(["whisper"]) == "whisper"
    assert style_of(["Whispering".lower()]) == "whisper"
    assert style_of(["slow", "laughs"]) == "slow"  # unknown instructions are ignored
    assert style_of(["shouting", "normal"]) is None
    assert style_of(["laughs"]) is None


def test_plan_segments_applies_instructions_until_the_next_tag() -> None:
    request = SynthesisRequest("Hi [laughs] there. [whisper] secret <|speaker:1|>loud [shouting] LOUD [fast] quick")
    plan = plan_segments(request, "en-us")
    assert [s.text for s in plan] == ["Hi there.", "secret", "loud", "LOUD", "quick"]
    base, whisper, other, shout, fast = (s.prosody for s in plan)
    assert "whisper" in whisper.voice and "whisper" not in base.voice
    assert other.voice != base.voice  # speaker 1 has a timbre of its own; the whisper did not carry over
    assert shout.volume > other.volume and shout.pitch > other.pitch
    assert fast.rate > other.rate and fast.volume == other.volume  # [fast] replaced [shouting]
    sad, = (s.prosody for s in plan_segments(SynthesisRequest("[sad] oh no"), "en-us"))
    excited, = (s.prosody for s in plan_segments(SynthesisRequest("[excited] oh yes"), "en-us"))
    assert sad.pitch < base.pitch < excited.pitch and sad.rate < base.rate < excited.rate
