"""Word timing from the engines: the words a text has, the built-in voice's exact timing, the stub's deterministic
timing, the estimating aligner, and the phoneme -> viseme table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.alignment import ProportionalAligner, speech_span
from engine.base import AudioChunk, Sampling, SynthesisRequest, Timing
from engine.espeak import SAMPLE_RATE, EspeakConfig, EspeakSynthesizer
from engine.markup import split_markup, spoken_words, words_of
from engine.stub import StubConfig, StubSynthesizer
from engine.visemes import VISEMES, viseme_of

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. "
    "[whisper] Seven silver spoons, please! <|speaker:1|>It's 3.5 km to the station — maybe more."
)


@pytest.fixture
async def espeak() -> AsyncIterator[EspeakSynthesizer]:
    synth = EspeakSynthesizer(EspeakConfig(workers=1))
    await synth.start()
    yield synth
    await synth.aclose()


async def collect(engine: object, text: str, **fields: object) -> tuple[list[AudioChunk], Timing | None]:
    async with asyncio.timeout(30):
        chunks = [c async for c in engine.synthesize(SynthesisRequest(text, **fields))]  # type: ignore[attr-defined]
    complete = [c.timing for c in chunks if c.timing is not None and c.timing.complete]
    assert len(complete) <= 1, "complete timing comes once"
    return chunks, complete[0] if complete else None


# -- the words of a text ------------------------------------------------------------------------------------------

_TOKENS = st.sampled_from([*"ab1 ,.-_[]|<>:\n\t\u200béç", "<|speaker:2|>", "[laughs]", "<|x|>", "dog.", "it's"])


@given(st.lists(_TOKENS, max_size=40).map("".join))
def test_written_words_are_the_spoken_words_in_order(text: str) -> None:
    spoken = [w for piece in split_markup(text) for w in words_of(piece.text)]
    written = spoken_words(text)
    assert [w.text for w in written] == spoken
    for w in written:  # each span holds the word as written (brackets aside), outside any markup
        assert text[w.start : w.end].replace("[", "").replace("]", "") == w.text


def test_words_keep_their_punctuation_and_skip_lone_symbols() -> None:
    assert words_of("Hello, world — it's 3.5 km. _ !") == ["Hello,", "world", "it's", "3.5", "km."]


# -- the built-in voice: exact ------------------------------------------------------------------------------------


async def test_builtin_voice_times_every_word_in_order(espeak: EspeakSynthesizer) -> None:
    chunks, timing = await collect(espeak, SENTENCES)
    assert timing is not None and not timing.estimated
    total = sum(c.pcm.size for c in chunks)
    assert [w.word for w in timing.words] == list(range(len(spoken_words(SENTENCES))))
    for before, after in zip(timing.words, timing.words[1:]):
        assert before.end <= after.start
    assert all(0 <= w.start < w.end <= total for w in timing.words)
    assert timing.words[-1].end < total  # the end pause is not part of the last word
    assert chunks[-1].timing is timing  # on the last chunk: complete only when the audio is


async def test_builtin_voice_reports_progress_before_the_end(espeak: EspeakSynthesizer) -> None:
    """A barge-in mid-request still finds the words heard so far: earlier chunks carry the timing known then."""
    text = " ".join(f"Sentence number {i} goes on a while." for i in range(8))
    chunks, timing = await collect(espeak, text)
    partial = [c.timing for c in chunks[:-1] if c.timing is not None]
    assert partial and not any(t.complete for t in partial)
    assert assert_prefixes(partial, timing)


def assert_prefixes(partial: list[Timing], final: Timing | None) -> bool:
    assert final is not None
    counts = [len(t.words) for t in partial]
    assert counts == sorted(counts) and counts[0] < len(final.words)
    for t in partial:
        assert [w.start for w in t.words] == [w.start for w in final.words[: len(t.words)]]
    return True


async def test_builtin_voice_phonemes_are_ipa_with_pauses(espeak: EspeakSynthesizer) -> None:
    _, timing = await collect(espeak, "Hello, world.")
    assert timing is not None
    names = [p.phoneme for p in timing.phonemes]
    assert "" in names and any("oʊ" in n for n in names) and "w" in names
    assert [p.start for p in timing.phonemes] == sorted(p.start for p in timing.phonemes)


async def test_builtin_voice_timing_stops_at_max_frames(espeak: EspeakSynthesizer) -> None:
    chunks, _ = await collect(espeak, SENTENCES, sampling=Sampling(max_frames=20))
    total = sum(c.pcm.size for c in chunks)
    timing = chunks[-1].timing
    assert timing is not None and 0 < len(timing.words) < len(spoken_words(SENTENCES))
    assert all(w.start < total for w in timing.words)


# -- the stub: deterministic --------------------------------------------------------------------------------------


async def test_stub_timing_shares_each_piece_by_characters() -> None:
    stub = StubSynthesizer(StubConfig(ttft_ms=0, frame_ms=0, chars_per_frame=1.0))
    await stub.start()
    chunks, timing = await collect(stub, "ab cd [whisper] efgh")
    assert chunks[0].timing is timing and timing is not None
    step = stub.config.samples_per_frame
    # pieces "ab cd" (5 frames) and "efgh" (4 frames); a word spans its characters' share of its piece
    assert [(w.word, w.start, w.end) for w in timing.words] == [
        (0, 0, 2 * step),
        (1, 3 * step, 5 * step),
        (2, 5 * step, 9 * step),
    ]
    assert [p.phoneme for p in timing.phonemes][:3] == ["a", "b", ""]


# -- the aligner: estimated ---------------------------------------------------------------------------------------


def test_speech_span_finds_the_loud_part() -> None:
    rate = 16000
    rng = np.random.default_rng(1)
    pcm = np.concatenate([np.zeros(rate // 5), 0.3 * rng.standard_normal(rate), 0.001 * rng.standard_normal(rate // 2)])
    first, last = speech_span(pcm.astype(np.float32), rate)
    assert abs(first - rate // 5) <= rate // 100
    assert abs(last - (rate // 5 + rate)) <= rate // 100


async def test_aligner_spreads_the_real_audio_over_the_builtin_voices_words(espeak: EspeakSynthesizer) -> None:
    aligner = ProportionalAligner(espeak)
    rate = 44100
    rng = np.random.default_rng(2)
    speech = (0.2 * rng.standard_normal(3 * rate)).astype(np.float32)
    pcm = np.concatenate([np.zeros(rate // 4, np.float32), speech, np.zeros(rate // 2, np.float32)])
    text = "[excited] One two three, four five six seven."
    timing = await aligner.align(text, 0, pcm, rate)
    assert timing is not None and timing.estimated and timing.complete
    assert [w.word for w in timing.words] == list(range(7))
    assert abs(timing.words[0].start - rate // 4) <= rate // 100  # speech starts after the leading silence
    assert abs(timing.words[-1].end - (rate // 4 + 3 * rate)) <= rate // 100  # and ends before the trailing one
    for before, after in zip(timing.words, timing.words[1:]):
        assert before.start < before.end <= after.start
    # proportional to the built-in voice: the pause at the comma carries over
    _, reference = await collect(espeak, text)
    assert reference is not None
    gap = lambda t: (t.words[3].start - t.words[2].end) / (t.words[-1].end - t.words[0].start)  # noqa: E731
    assert gap(timing) == pytest.approx(gap(reference), abs=0.01)


def test_the_aligner_needs_an_engine_with_timing() -> None:
    class NoTiming:
        info = StubSynthesizer().info.__class__(name="x", sample_rate=16000, cloning=False)

    with pytest.raises(ValueError, match="no timing"):
        ProportionalAligner(NoTiming())  # type: ignore[arg-type]


# -- visemes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phoneme", "name"),
    [("", "sil"), ("p", "PP"), ("m", "PP"), ("f", "FF"), ("θ", "TH"), ("ð", "TH"), ("t", "DD"), ("k", "kk"),
     ("ɡ", "kk"), ("tʃ", "CH"), ("dʒ", "CH"), ("ʃ", "CH"), ("s", "SS"), ("z", "SS"), ("n", "nn"), ("l", "nn"),
     ("ɹ", "RR"), ("ˈaɪ", "aa"), ("æ", "aa"), ("ɛ", "E"), ("ə", "E"), ("ˈiː", "ih"), ("ɪ", "ih"), ("ˈoʊ", "oh"),
     ("ɔɪ", "oh"), ("uː", "ou"), ("w", "ou"), ("ʊ", "ou"), ("ˈ", "sil"), ("ʘ", "E")],
)
def test_phonemes_map_to_the_oculus_visemes(phoneme: str, name: str) -> None:
    assert VISEMES[viseme_of(phoneme)] == name


async def test_every_builtin_voice_phoneme_has_a_viseme_of_its_own(espeak: EspeakSynthesizer) -> None:
    """No phoneme espeak-ng says in ordinary English falls through to the table's default."""
    _, timing = await collect(espeak, "The quick brown fox jumps over the lazy dog; she sells thick jam, yes?")
    assert timing is not None
    known = {p.phoneme for p in timing.phonemes}
    assert len(VISEMES) == 15
    fallbacks = {p for p in known if p and viseme_of(p) == 11 and not any(c in p for c in "eɛəɜɘ")}
    assert not fallbacks, fallbacks
    assert SAMPLE_RATE == 22050
