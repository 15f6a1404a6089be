"""espeak-ng synthesis worker: one process, one utterance at a time, driven over stdin/stdout.

espeak-ng keeps global state and is not thread-safe, so each worker process owns one instance and the parent
(:mod:`engine.espeak`) runs a pool of them. Run as ``python -m engine.espeak_process``.

Wire: frames of a 4-byte big-endian length and a msgpack map, in both directions.

    parent -> worker   {"t": "synth", "id", "segments": [{"text", "voice", "rate", "pitch", "range", "volume"}]}
                       {"t": "ack", "id", "n"}        the parent took n audio chunks of request id
                       {"t": "cancel", "id"}          stop request id now
    worker -> parent   {"t": "ready", "sample_rate", "pid"}   once, after espeak-ng is initialized
                       {"t": "fatal", "message"}              instead of ready, then exit
                       {"t": "audio", "id", "pcm", "ev"}      int16 little-endian mono at sample_rate
                       {"t": "done", "id", "cancelled", "error", "ev"}  always ends a request (error: str | None)

``ev`` lists espeak-ng's events since the last message, each ``[kind, segment, position, sample, phoneme]``: kind
"w" (a word starts: ``position`` is its 1-based character position in the segment's text), "p" (a phoneme starts:
``phoneme`` in IPA, "" for a pause) or "e" (the segment ends); ``sample`` counts from the start of the request.

Flow control: at most ``window`` audio chunks may be un-acknowledged. espeak-ng delivers audio through a
synchronous callback as it is made; when the window is full the callback blocks until an ack or a cancel, so a
consumer that stops pulling stops synthesis, and a cancel makes the callback return 1, which aborts espeak-ng
mid-utterance. A closed stdin (the parent went away) aborts and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import signal
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import msgpack

__all__ = ["MAX_FRAME", "Espeak", "EspeakUnavailable", "Flow", "encode_frame", "main", "read_frame"]

MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")

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


def encode_frame(message: Mapping[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes is over {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    """The next frame from a blocking stream; None at a clean end of stream."""
    header = stream.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise EOFError("stream ended inside a frame header")
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over {MAX_FRAME}")
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("stream ended inside a frame")
    message = msgpack.unpackb(payload, raw=False)
    if not isinstance(message, dict):
        raise ValueError("frame is not a map")
    return message


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


class Flow:
    """Credit window and cancellation for the request in progress; shared by the reader and synthesis threads."""

    def __init__(self, window: int) -> None:
        self._cond = threading.Condition()
        self._window = window
        self._current = -1
        self._sent = 0
        self._acked = 0
        self._cancelled = False
        self._cancel_next = -1  # a cancel that arrived before its request started
        self._closed = False

    def begin(self, request_id: int) -> bool:
        """Start a request; False if it was cancelled before it began (or the parent is gone)."""
        with self._cond:
            self._current, self._sent, self._acked = request_id, 0, 0
            self._cancelled = self._cancel_next == request_id
            return not (self._cancelled or self._closed)

    def ack(self, request_id: int, count: int) -> None:
        with self._cond:
            if request_id == self._current:
                self._acked += count
                self._cond.notify_all()

    def cancel(self, request_id: int) -> None:
        with self._cond:
            if request_id == self._current:
                self._cancelled = True
                self._cond.notify_all()
            elif request_id > self._current:
                self._cancel_next = request_id

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        with self._cond:
            return self._cancelled or self._closed

    @property
    def cancelled(self) -> bool:
        with self._cond:
            return self._cancelled

    def take_credit(self) -> bool:
        """Wait for room to send one more chunk and claim it; False if the request is to stop instead."""
        with self._cond:
            while not (self._cancelled or self._closed) and self._sent - self._acked >= self._window:
                self._cond.wait()
            if self._cancelled or self._closed:
                return False
            self._sent += 1
            return True


class _Output:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def send(self, message: Mapping[str, Any]) -> None:
        self._stream.write(encode_frame(message))
        self._stream.flush()


def _read_requests(source: BinaryIO, flow: Flow, inbox: queue.Queue[tuple[int, list[dict[str, Any]]] | None]) -> None:
    try:
        while (message := read_frame(source)) is not None:
            kind = message.get("t")
            if kind == "synth":
                inbox.put((int(message["id"]), list(message["segments"])))
            elif kind == "ack":
                flow.ack(int(message["id"]), int(message.get("n", 1)))
            elif kind == "cancel":
                flow.cancel(int(message["id"]))
            else:
                raise ValueError(f"unknown message type {kind!r}")
    except (EOFError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        print(f"espeak worker: bad input from parent: {exc!r}", file=sys.stderr)
    finally:
        flow.close()
        inbox.put(None)


def _synthesize(espeak: Espeak, flow: Flow, out: _Output, request_id: int, segments: list[dict[str, Any]]) -> None:
    error: str | None = None
    events: list[list[Any]] = []  # since the last message
    made = 0  # samples sent for this request
    segment_index, segment_start = 0, 0
    if flow.begin(request_id):

        def sink(pcm: bytes, found: list[Event]) -> bool:
            nonlocal made
            events.extend([kind, segment_index, position, segment_start + sample, name]
                          for kind, position, sample, name in found)
            if not pcm:
                return not flow.stopped
            if not flow.take_credit():
                return False
            out.send({"t": "audio", "id": request_id, "pcm": pcm, "ev": events[:]})
            events.clear()
            made += len(pcm) // 2
            return True

        espeak.sink = sink
        espeak.reseed()
        for index, segment in enumerate(segments):
            if flow.stopped:
                break
            segment_index, segment_start = index, made  # espeak-ng counts samples from each utterance's start
            try:
                espeak.speak(str(segment["text"]), str(segment["voice"]), int(segment["rate"]),
                             int(segment["pitch"]), int(segment["range"]), int(segment["volume"]),
                             end_pause=index == len(segments) - 1)
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                error = str(exc) or type(exc).__name__
                break
    out.send({"t": "done", "id": request_id, "cancelled": flow.cancelled, "error": error, "ev": events})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.espeak_process", description=__doc__.split("\n")[0])
    parser.add_argument("--buffer-ms", type=int, default=20, help="espeak-ng buffer length (it rounds up to 60)")
    parser.add_argument("--window", type=int, default=6, help="most un-acknowledged audio chunks in flight")
    parser.add_argument("--language", default="en-us", help="voice to load before reporting ready")
    parser.add_argument("--library", help="path of libespeak-ng (default: the espeakng-loader wheel's)")
    parser.add_argument("--data", help="path of espeak-ng-data (default: the espeakng-loader wheel's)")
    args = parser.parse_args(argv)

    # The protocol owns the real stdout; anything else that writes to fd 1 (espeak-ng included) goes to stderr.
    out = _Output(os.fdopen(os.dup(sys.stdout.fileno()), "wb"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop (it closes our stdin)

    try:
        library, data = args.library, args.data
        if library is None or data is None:
            import espeakng_loader

            library = library or espeakng_loader.get_library_path()
            data = data or espeakng_loader.get_data_path()
        espeak = Espeak(str(library), str(data), args.buffer_ms)
    except (ImportError, EspeakUnavailable) as exc:
        out.send({"t": "fatal", "message": str(exc) or type(exc).__name__})
        return 2

    try:  # warm up: the first utterance loads the voice and dictionary; do it before anyone waits for audio
        espeak.speak("ready", args.language, 175, 50, 50, 100, end_pause=False)
    except RuntimeError as exc:
        out.send({"t": "fatal", "message": str(exc)})
        return 2

    flow = Flow(args.window)
    inbox: queue.Queue[tuple[int, list[dict[str, Any]]] | None] = queue.Queue()
    threading.Thread(target=_read_requests, args=(sys.stdin.buffer, flow, inbox), daemon=True).start()
    out.send({"t": "ready", "sample_rate": espeak.sample_rate, "pid": os.getpid()})
    try:
        while (request := inbox.get()) is not None:
            _synthesize(espeak, flow, out, *request)
    except BrokenPipeError:
        return 0  # the parent is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
