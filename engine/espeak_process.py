"""The built-in voice's process: espeak-ng in this process, served to the parent over the worker RPC.

espeak-ng keeps global state and is not thread-safe, so each process owns one instance and says one utterance at a
time; the parent (:mod:`engine.espeak`) runs a pool of them. Run as ``python -m engine.espeak_process``: it loads
espeak-ng and its voice, then serves :class:`EspeakVoice` (a ``Synthesizer``) on its stdin/stdout with the same RPC,
framing and credit window as any engine worker (``engine.rpc``, ``engine.rpc_process``), or, if espeak-ng cannot be
loaded, answers ``error`` in place of ``hello`` with the reason.

Everything about a request happens here: its plan (``engine.espeak_voice.plan_segments``), the audio, the
``max_frames`` budget, and its word and phoneme timing from espeak-ng's events (``timing_from_events``): one chunk
is held back, so the last one can carry the complete timing, and earlier chunks carry what is known so far.

Flow control: espeak-ng delivers audio through a synchronous callback as it is made; the callback hands each chunk
to the request's stream through a small bounded queue and blocks while it is full, and the stream is pulled only
while the parent holds credit, so a consumer that stops pulling stops synthesis; a cancel (the stream closed) makes
the callback return 1, which aborts espeak-ng mid-utterance. A closed stdin (the parent went away) ends everything.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from engine.base import AudioChunk, EngineError, EngineInfo, SynthesisRequest
from engine.espeak_voice import SAMPLE_RATE, Segment, plan_segments, timing_from_events

_Item = tuple[bytes, list[Any]] | EngineError | None  # a chunk and the events since the last; a failure; the end

__all__ = ["Espeak", "EspeakUnavailable", "EspeakVoice", "main"]

_FRAMES_PER_SECOND = 21.5  # Sampling.max_frames counts codec frames of 1000 / 21.5 ms
_QUEUE_CHUNKS = 2  # chunks made by espeak-ng and not yet pulled by the stream

# espeak-ng's speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1  # plain UTF-8 text: no espeakSSML, no espeakPHONEMES, so nothing in it is read as markup
_ENDPAUSE = 0x1000
_POS_CHARACTER = 1
_PHONEME_EVENTS, _PHONEME_IPA = 0x0001, 0x0002
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_EVENT_END_OF_LIST, _EVENT_WORD, _EVENT_END, _EVENT_PHONEME = 0, 1, 5, 7
_EVENT_KINDS = {_EVENT_WORD: "w", _EVENT_PHONEME: "p", _EVENT_END: "e"}


class _Event(ctypes.Structure):
    """speak_lib.h's espeak_EVENT; ``id`` is a union whose phoneme form is 8 bytes of UTF-8."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


Event = tuple[str, int, int, str]  # kind, character position, sample within the utterance, phoneme
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class EspeakUnavailable(Exception):
    """libespeak-ng or its data could not be loaded."""


class Espeak:
    """The espeak-ng library in synchronous (retrieval) mode: audio leaves through ``sink`` as it is made."""

    def __init__(self, library: str, data: str, buffer_ms: int) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as exc:
            raise EspeakUnavailable(f"cannot load {library}: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        self._set_seed: Callable[[int], None] | None = getattr(lib, "espeak_ng_SetRandSeed", None)  # espeak-ng >= 1.51
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
            self._set_seed.restype = None
        options = _INITIALIZE_DONT_EXIT | _PHONEME_EVENTS | _PHONEME_IPA
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, buffer_ms, data.encode(), options)
        if rate <= 0:
            raise EspeakUnavailable(f"espeak_Initialize failed (data at {data})")
        self._lib = lib
        self.sample_rate: int = rate
        self.sink: Callable[[bytes, list[Event]], bool] = lambda pcm, events: True  # False aborts the utterance
        self.sink_error: BaseException | None = None
        self._callback = _SynthCallback(self._on_synth)  # keep a reference: espeak-ng holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav: Any, count: int, events: Any) -> int:
        try:
            found: list[Event] = []
            i = 0
            while events and (event := events[i]).type != _EVENT_END_OF_LIST:
                kind = _EVENT_KINDS.get(event.type)
                if kind is not None:
                    name = event.id.decode("utf-8", "replace") if kind == "p" else ""
                    found.append((kind, event.text_position, event.sample, name))
                i += 1
            go_on = self.sink(ctypes.string_at(wav, count * 2) if count > 0 and wav else b"", found)
        except BaseException as exc:  # noqa: BLE001 - an exception must not cross the C frame; re-raised by speak()
            self.sink_error = exc
            return 1
        return 0 if go_on else 1

    def reseed(self) -> None:
        """Restart espeak-ng's noise generator (breathy and whispering voices use it; unseeded it differs per run)."""
        if self._set_seed is not None:
            self._set_seed(1)

    def speak(self, text: str, voice: str, rate: int, pitch: int, range_: int, volume: int, end_pause: bool) -> None:
        """Say ``text``; returns when it is said or the sink aborted. Raises RuntimeError on espeak-ng errors."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        for parameter, value in ((_RATE, rate), (_VOLUME, volume), (_PITCH, pitch), (_RANGE, range_)):
            self._lib.espeak_SetParameter(parameter, value, 0)
        data = text.replace("\0", " ").encode("utf-8") + b"\0"
        flags = _CHARS_UTF8 | (_ENDPAUSE if end_pause else 0)
        status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
        if self.sink_error is not None:
            error, self.sink_error = self.sink_error, None
            raise error
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status}")


class _Stop(Exception):
    """The stream was closed: espeak-ng is to abort the utterance."""


class EspeakVoice:
    """espeak-ng in this process behind the Synthesizer interface, one utterance at a time (its state is global)."""

    info = EngineInfo(name="espeak", sample_rate=SAMPLE_RATE, cloning=False, timing=True)

    def __init__(self, espeak: Espeak, language: str) -> None:
        self.espeak, self.language = espeak, language
        self._lock = asyncio.Lock()  # one utterance at a time; a cancelled one finishes aborting first
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="espeak")
        self._closed = False

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        self._closed = True
        self._thread.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str | None:
        return "closed" if self._closed else None

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        return None

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if self._closed:
            raise EngineError("espeak engine is closed")
        segments = plan_segments(request, self.language)
        if not segments:
            return
        async with self._lock:
            loop = asyncio.get_running_loop()
            items: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_CHUNKS)
            stop = threading.Event()

            def put(item: _Item) -> None:  # on the espeak thread: waits for room
                future = asyncio.run_coroutine_threadsafe(items.put(item), loop)
                while True:
                    try:
                        future.result(0.05)
                        return
                    except concurrent.futures.TimeoutError:
                        if stop.is_set():
                            future.cancel()
                            raise _Stop from None

            spoken = loop.run_in_executor(self._thread, self._speak, segments, put, stop)
            try:
                async for chunk in self._chunks(segments, items, request.sampling.max_frames):
                    yield chunk
            finally:
                stop.set()  # the thread stops at its next chunk (or now, if it waits for room)
                await asyncio.wait([spoken])

    async def _chunks(self, segments: Sequence[Segment], items: asyncio.Queue[_Item],
                      max_frames: int) -> AsyncIterator[AudioChunk]:
        """The utterance's chunks; one is held back, so the last one can carry the timing, complete only at the end."""
        budget = int(max_frames * SAMPLE_RATE / _FRAMES_PER_SECOND)  # samples
        held: np.ndarray | None = None
        events: list[Any] = []
        made = 0  # samples
        while (item := await items.get()) is not None:
            if isinstance(item, EngineError):
                raise item
            pcm_bytes, found = item
            events.extend(found)
            if not pcm_bytes:  # the end of the utterance: its last events
                continue
            pcm = np.frombuffer(pcm_bytes, dtype="<i2")[:budget].astype(np.float32) / np.float32(32768.0)
            budget -= pcm.size
            made += pcm.size
            if pcm.size:
                if held is not None:
                    # what is known so far: a barge-in before the end still cuts the turn at a word
                    news = any(e[0] == "w" for e in found)
                    so_far = timing_from_events(segments, events, made, complete=False) if news else None
                    yield AudioChunk(pcm=held, timing=so_far)
                held = pcm
            if budget <= 0:  # max_frames reached: closing the stream cancels the rest
                if held is not None:
                    yield AudioChunk(pcm=held, timing=timing_from_events(segments, events, made, ended=False))
                return
        if held is not None:
            yield AudioChunk(pcm=held, timing=timing_from_events(segments, events, made))

    def _speak(self, segments: Sequence[Segment], put: Callable[[_Item], None], stop: threading.Event) -> None:
        """On the espeak thread: say every segment; each chunk goes to ``put`` with espeak-ng's events since the
        last one (``[kind, segment, position, sample, phoneme]``, samples counted from the request's start), then
        the last events and None (or an EngineError if espeak-ng failed)."""
        events: list[list[Any]] = []
        made = 0  # samples of this request
        segment_index, segment_start = 0, 0

        def sink(pcm: bytes, found: list[Event]) -> bool:
            nonlocal made
            events.extend([kind, segment_index, position, segment_start + sample, name]
                          for kind, position, sample, name in found)
            if stop.is_set():
                return False
            if pcm:
                put((pcm, events[:]))
                events.clear()
                made += len(pcm) // 2
            return True

        self.espeak.sink = sink
        self.espeak.reseed()
        try:
            for index, segment in enumerate(segments):
                if stop.is_set():
                    return
                segment_index, segment_start = index, made  # espeak-ng counts samples from each utterance's start
                p = segment.prosody
                self.espeak.speak(segment.text, p.voice, p.rate, p.pitch, p.range, p.volume,
                                  end_pause=index == len(segments) - 1)
            put((b"", events[:]))
            put(None)
        except _Stop:
            return
        except RuntimeError as exc:
            with contextlib.suppress(_Stop):
                put(EngineError(f"espeak-ng failed: {exc}"))


def main(argv: list[str] | None = None) -> int:
    from engine.rpc_process import refuse_stdio, serve_stdio

    parser = argparse.ArgumentParser(prog="python -m engine.espeak_process", description=__doc__.split("\n")[0])
    parser.add_argument("--buffer-ms", type=int, default=20, help="espeak-ng buffer length (it rounds up to 60)")
    parser.add_argument("--language", default="en-us", help="voice to load before reporting ready")
    parser.add_argument("--library", help="path of libespeak-ng (default: the espeakng-loader wheel's)")
    parser.add_argument("--data", help="path of espeak-ng-data (default: the espeakng-loader wheel's)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop (it closes our stdin)

    try:
        library, data = args.library, args.data
        if library is None or data is None:
            import espeakng_loader

            library = library or espeakng_loader.get_library_path()
            data = data or espeakng_loader.get_data_path()
        espeak = Espeak(str(library), str(data), args.buffer_ms)
        if espeak.sample_rate != SAMPLE_RATE:
            raise EspeakUnavailable(f"espeak-ng runs at {espeak.sample_rate} Hz, not {SAMPLE_RATE}")
        # warm up: the first utterance loads the voice and dictionary; do it before anyone waits for audio
        espeak.speak("ready", args.language, 175, 50, 50, 100, end_pause=False)
    except (ImportError, EspeakUnavailable, RuntimeError) as exc:
        refuse_stdio(f"espeak-ng cannot start: {exc or type(exc).__name__}")
        return 2
    serve_stdio(EspeakVoice(espeak, args.language), worker_id=f"espeak-{os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
