"""Protocol v1: the closed set of messages, and their one encoder/decoder (msgpack binary or JSON text).

Sans-I/O and total: ``decode_client`` either returns a typed message or raises ``ProtocolError`` — the one
documented error, whose ``code`` maps to an ``error`` message in one place (``ProtocolError.to_message``).
Binary fields (``audio.data``, ``voice.create.audio``) are raw bytes in msgpack and base64 strings in JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1

ERROR_CODES = frozenset(
    {
        "bad_message",
        "unknown_type",
        "too_large",
        "not_started",
        "busy",
        "limit",
        "unauthorized",
        "quota",  # a tenant's or client address's quota is used up; the message names which
        "engine_unavailable",
        "internal",
    }
)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # whole string: fullmatch
MAX_SPEAKER = 63  # speaker indices are 0..63
MAX_SPEAKERS = 16  # entries in a speakers list


def valid_id(value: str) -> bool:
    """Is this a well-formed id (session, voice, context, tenant)? The whole string must match: ``abc\\n`` is not."""
    return _ID_RE.fullmatch(value) is not None


class Encoding(Enum):
    MSGPACK = "msgpack"
    JSON = "json"


class ProtocolError(Exception):
    """A client input that cannot be accepted. ``fatal`` errors end the connection."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal

    def to_message(self) -> Error:
        return Error(code=self.code, message=self.message, fatal=self.fatal)


# --------------------------------------------------------------------------------------------- client -> server


@dataclass(frozen=True)
class SpeakerSpec:
    speaker: int
    voice: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"speaker": self.speaker, "voice": self.voice}


@dataclass(frozen=True)
class SessionStart:
    type: ClassVar[str] = "session.start"
    session: str | None = None
    speakers: tuple[SpeakerSpec, ...] | None = None
    output: Mapping[str, Any] | None = None  # validated by realtime.audio.OutputFormat.from_wire
    sampling: Mapping[str, Any] | None = None  # validated by engine.base.Sampling
    input: Mapping[str, Any] | None = None  # the caller's audio: validated by realtime.caller.InputFormat.from_wire


@dataclass(frozen=True)
class Text:
    type: ClassVar[str] = "text"
    text: str
    speaker: int | None = None
    context: str | None = None  # concurrent contexts: the turn stream this belongs to (None: the default one)


@dataclass(frozen=True)
class Flush:
    type: ClassVar[str] = "flush"
    context: str | None = None


@dataclass(frozen=True)
class TurnEnd:
    type: ClassVar[str] = "turn.end"
    context: str | None = None


@dataclass(frozen=True)
class Cancel:
    type: ClassVar[str] = "cancel"
    context: str | None = None  # None: every context


@dataclass(frozen=True)
class Playback:
    type: ClassVar[str] = "playback"
    turn: int
    played_ms: float
    context: str | None = None  # informational: the turn index alone names the turn


@dataclass(frozen=True)
class VoiceCreate:
    type: ClassVar[str] = "voice.create"
    audio: bytes
    text: str
    voice: str | None = None
    sample_rate: int | None = None  # only for raw pcm16 audio (default 16000)


@dataclass(frozen=True)
class SessionUpdate:
    type: ClassVar[str] = "session.update"
    speakers: tuple[SpeakerSpec, ...] | None = None
    output: Mapping[str, Any] | None = None
    sampling: Mapping[str, Any] | None = None
    input: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class InputAudio:
    """One frame of the caller's audio (20 ms is typical), in the session's ``input.codec``."""

    type: ClassVar[str] = "input.audio"
    data: bytes


@dataclass(frozen=True)
class InputCommit:
    """What the caller said between two instants of the input clock: stored as a turn of ``speaker``, with its
    audio, so the next reply's context holds both sides."""

    type: ClassVar[str] = "input.commit"
    speaker: int
    text: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"


ClientMessage = (
    SessionStart | Text | Flush | TurnEnd | Cancel | Playback | VoiceCreate | SessionUpdate | InputAudio | InputCommit
    | Ping
)

# --------------------------------------------------------------------------------------------- server -> client


@dataclass(frozen=True)
class SessionReady:
    type: ClassVar[str] = "session.ready"
    session: str
    engine: Mapping[str, Any]
    output: Mapping[str, Any]
    resumed: bool
    turns: int
    protocol: int = PROTOCOL_VERSION
    speakers: tuple[SpeakerSpec, ...] = ()
    # on resume: the last turns as {turn, speaker, text, state, audio_ms}, so a client can show the conversation
    history: tuple[Mapping[str, Any], ...] | None = None
    input: Mapping[str, Any] | None = None  # the caller's audio settings, once set


@dataclass(frozen=True)
class TurnStarted:
    type: ClassVar[str] = "turn.started"
    turn: int
    speaker: int
    context: str | None = None  # on every message of a turn that belongs to a named context


@dataclass(frozen=True)
class Audio:
    type: ClassVar[str] = "audio"
    turn: int
    seq: int
    ms: float
    data: bytes
    context: str | None = None


@dataclass(frozen=True)
class Segment:
    type: ClassVar[str] = "segment"
    turn: int
    text: str  # what is spoken: markup removed
    ms: float
    context: str | None = None
    speaker: int | None = None  # the speaker at the segment's start
    markup: str | None = None  # the segment as sent: speaker tags and [instructions] included


@dataclass(frozen=True)
class Words:
    """When each word of a segment is heard (``output.timestamps``), before the first audio packet it covers."""

    type: ClassVar[str] = "words"
    turn: int
    words: tuple[Mapping[str, Any], ...]  # {text, start_ms, end_ms}: turn-relative, the clock of audio.ms
    estimated: bool  # True: spread over the audio by an aligner, not reported by the engine
    context: str | None = None


@dataclass(frozen=True)
class Visemes:
    """Mouth shapes for a segment (``output.timestamps: visemes``): ids of the 15 Oculus visemes, each held until the
    next one's ``start_ms``; sent after ``words`` and before the audio they cover."""

    type: ClassVar[str] = "visemes"
    turn: int
    visemes: tuple[Mapping[str, Any], ...]  # {id, start_ms}
    context: str | None = None


@dataclass(frozen=True)
class TurnDone:
    type: ClassVar[str] = "turn.done"
    turn: int
    reason: str  # complete | cancelled | length | error
    audio_ms: float
    frames: int
    ttfa_ms: float | None
    context: str | None = None


@dataclass(frozen=True)
class VoiceCreated:
    type: ClassVar[str] = "voice.created"
    voice: str
    seconds: float
    frames: int


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class Pong:
    type: ClassVar[str] = "pong"


@dataclass(frozen=True)
class SpeechStarted:
    """The caller started speaking at ``ms`` on the input clock (voice activity: the onset, not the detection)."""

    type: ClassVar[str] = "input.speech_started"
    ms: float


@dataclass(frozen=True)
class SpeechStopped:
    type: ClassVar[str] = "input.speech_stopped"
    ms: float


@dataclass(frozen=True)
class InputRelay:
    """A phone call's audio, relayed to the application driving its session (as the call sent it)."""

    type: ClassVar[str] = "input.audio"
    data: bytes
    ms: float  # where it starts on the input clock
    codec: str = "mulaw"


@dataclass(frozen=True)
class Dtmf:
    type: ClassVar[str] = "input.dtmf"
    digit: str
    ms: float


@dataclass(frozen=True)
class CallStarted:
    type: ClassVar[str] = "call.started"
    call: str  # the carrier's call id (Twilio's callSid)
    stream: str  # the media stream's id (Twilio's streamSid)
    parameters: Mapping[str, Any] | None = None  # the call's custom parameters, credentials removed


@dataclass(frozen=True)
class CallStopped:
    type: ClassVar[str] = "call.stopped"
    call: str
    reason: str  # hangup (the carrier stopped the stream) | disconnected (its socket closed)


ServerMessage = (
    SessionReady | TurnStarted | Audio | Segment | Words | Visemes | TurnDone | VoiceCreated | Error | Pong
    | SpeechStarted | SpeechStopped | InputRelay | Dtmf | CallStarted | CallStopped
)

_BINARY_FIELDS = {"audio": "data", "voice.create": "audio", "input.audio": "data"}

# --------------------------------------------------------------------------------------------- encoding


def to_wire(msg: ServerMessage | ClientMessage) -> dict[str, Any]:
    """The message as a plain map (binary fields as bytes), ``type`` first."""
    out: dict[str, Any] = {"type": msg.type}
    for name in msg.__dataclass_fields__:
        value = getattr(msg, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = [v.to_wire() if isinstance(v, SpeakerSpec) else dict(v) if isinstance(v, Mapping) else v for v in value]
        elif isinstance(value, Mapping):
            value = dict(value)
        out[name] = value
    return out


def encode(msg: ServerMessage | ClientMessage, encoding: Encoding) -> bytes | str:
    """One frame: bytes for msgpack (a binary frame), str for JSON (a text frame)."""
    if type(msg) is Audio and encoding is Encoding.MSGPACK:
        return _encode_audio(msg)
    wire = to_wire(msg)
    if encoding is Encoding.MSGPACK:
        return msgpack.packb(wire, use_bin_type=True)
    binary = _BINARY_FIELDS.get(msg.type)
    if binary is not None and binary in wire:
        wire[binary] = base64.b64encode(wire[binary]).decode("ascii")
    return json.dumps(wire, separators=(",", ":"), ensure_ascii=False)


_AUDIO_HEAD = (b"\x85\xa4type\xa5audio\xa4turn", b"\x86\xa4type\xa5audio\xa4turn")  # fixmap of 5 or 6 keys
_pack = msgpack.Packer(use_bin_type=True).pack  # autoreset: each call returns its own bytes


def _encode_audio(msg: Audio) -> bytes:
    """``encode(msg, MSGPACK)`` for ``audio``, the message sent 50 times a second per stream: the bytes ``to_wire``
    would give (the golden frames hold both to them), from a fixed head and the fields packed in order, without the
    generic walk over the dataclass's fields and the map built for it."""
    context = msg.context
    parts = [_AUDIO_HEAD[context is not None], _pack(msg.turn), b"\xa3seq", _pack(msg.seq), b"\xa2ms", _pack(msg.ms),
             b"\xa4data", _pack(msg.data)]
    if context is not None:
        parts += (b"\xa7context", _pack(context))
    return b"".join(parts)


def parse_frame(frame: bytes | str) -> tuple[dict[str, Any], Encoding]:
    """Frame -> (map, encoding). Raises ProtocolError(bad_message)."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        try:
            obj = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True, max_bin_len=len(frame))
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
            # UnicodeDecodeError is a ValueError: invalid UTF-8 in a str field lands here too.
            raise ProtocolError("bad_message", f"binary frame is not a msgpack map: {exc}") from None
        encoding = Encoding.MSGPACK
    elif isinstance(frame, str):
        try:
            obj = json.loads(frame)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError("bad_message", f"text frame is not a JSON object: {exc}") from None
        if "\\u" in frame and _has_lone_surrogate(obj):
            # JSON may escape half of a UTF-16 pair ("\ud800"); such a string cannot be sent, stored or spoken
            raise ProtocolError("bad_message", "a string holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
        encoding = Encoding.JSON
    else:  # pragma: no cover - the shell only passes bytes or str
        raise ProtocolError("bad_message", "frame must be binary or text")
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", f"a message must be a map, got {type(obj).__name__}")
    return obj, encoding


def _has_lone_surrogate(obj: Any) -> bool:
    """Does any string (key or value) in a decoded JSON value hold a lone surrogate?"""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decode_client(frame: bytes | str) -> tuple[ClientMessage, Encoding]:
    """Decode one client frame into a typed message. Raises ProtocolError, never anything else."""
    obj, encoding = parse_frame(frame)
    try:
        return _decode_map(obj, encoding), encoding
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # defensive: nothing else escapes
        raise ProtocolError("bad_message", f"malformed message: {exc}") from None


def decode_server(frame: bytes | str) -> dict[str, Any]:
    """Decode a server frame into its map (binary fields as bytes): for clients and tests."""
    obj, encoding = parse_frame(frame)
    binary = _BINARY_FIELDS.get(obj.get("type", ""))
    if encoding is Encoding.JSON and binary and isinstance(obj.get(binary), str):
        obj[binary] = base64.b64decode(obj[binary])
    return obj


# --------------------------------------------------------------------------------------------- field checks


class _Fields:
    """Typed access to one message's fields with errors that name the field."""

    def __init__(self, obj: Mapping[str, Any], mtype: str, encoding: Encoding) -> None:
        self.obj, self.mtype, self.encoding = obj, mtype, encoding

    def _bad(self, name: str, want: str) -> ProtocolError:
        got = type(self.obj[name]).__name__
        return ProtocolError("bad_message", f"{self.mtype}.{name} must be {want}, got {got}")

    def str_(self, name: str, *, required: bool = False, max_len: int | None = None) -> str | None:
        if self.obj.get(name) is None:
            if required:
                raise ProtocolError("bad_message", f"{self.mtype}.{name} is required")
            return None
        value = self.obj[name]
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        if max_len is not None and len(value) > max_len:
            raise ProtocolError("limit", f"{self.mtype}.{name} is longer than {max_len} characters")
        return value

    def id_(self, name: str) -> str | None:
        value = self.str_(name)
        if value is not None and not valid_id(value):
            raise ProtocolError(
                "bad_message", f"{self.mtype}.{name} must be 1-64 characters of A-Z a-z 0-9 _ . : - (got {value!r})"
            )
        return value

    def int_(self, name: str, lo: int, hi: int, *, required: bool = False) -> int | None:
        if self.obj.get(name) is None:
            if required:
                raise ProtocolError("bad_message", f"{self.mtype}.{name} is required")
            return None
        value = self.obj[name]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(name, "an integer")
        if not lo <= value <= hi:
            raise ProtocolError("bad_message", f"{self.mtype}.{name} must be within [{lo}, {hi}], got {value}")
        return value

    def num(self, name: str, lo: float, hi: float, *, required: bool = False) -> float | None:
        if self.obj.get(name) is None:
            if required:
                raise ProtocolError("bad_message", f"{self.mtype}.{name} is required")
            return None
        value = self.obj[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self._bad(name, "a finite number")
        if not lo <= value <= hi:
            raise ProtocolError("bad_message", f"{self.mtype}.{name} must be within [{lo}, {hi}], got {value}")
        return float(value)

    def map_(self, name: str) -> Mapping[str, Any] | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._bad(name, "a map")
        return value

    def bytes_(self, name: str) -> bytes:
        value = self.obj.get(name)
        if value is None:
            raise ProtocolError("bad_message", f"{self.mtype}.{name} is required")
        if self.encoding is Encoding.JSON:
            if not isinstance(value, str):
                raise self._bad(name, "a base64 string")
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError("bad_message", f"{self.mtype}.{name} is not valid base64") from None
        if not isinstance(value, (bytes, bytearray)):
            raise self._bad(name, "binary")
        return bytes(value)

    def speakers(self, name: str = "speakers") -> tuple[SpeakerSpec, ...] | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._bad(name, "a list")
        if len(value) > MAX_SPEAKERS:
            raise ProtocolError("limit", f"{self.mtype}.{name} has more than {MAX_SPEAKERS} entries")
        out: list[SpeakerSpec] = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict):
                raise ProtocolError("bad_message", f"{self.mtype}.{name}[{i}] must be a map")
            sub = _Fields(entry, f"{self.mtype}.{name}[{i}]", self.encoding)
            speaker = sub.int_("speaker", 0, MAX_SPEAKER, required=True)
            assert speaker is not None
            out.append(SpeakerSpec(speaker=speaker, voice=sub.id_("voice")))
        if len({s.speaker for s in out}) != len(out):
            raise ProtocolError("bad_message", f"{self.mtype}.{name} lists a speaker twice")
        return tuple(out)


MAX_TEXT_CHARS = 20_000  # per message; the per-turn bound is enforced by the conversation


def _decode_map(obj: Mapping[str, Any], encoding: Encoding) -> ClientMessage:
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError("bad_message", "every message needs a string 'type'")
    f = _Fields(obj, mtype, encoding)
    if mtype == "session.start":
        return SessionStart(session=f.id_("session"), speakers=f.speakers(), output=f.map_("output"),
                            sampling=f.map_("sampling"), input=f.map_("input"))
    if mtype == "text":
        text = f.str_("text", required=True, max_len=MAX_TEXT_CHARS)
        assert text is not None
        return Text(text=text, speaker=f.int_("speaker", 0, MAX_SPEAKER), context=f.id_("context"))
    if mtype == "flush":
        return Flush(context=f.id_("context"))
    if mtype == "turn.end":
        return TurnEnd(context=f.id_("context"))
    if mtype == "cancel":
        return Cancel(context=f.id_("context"))
    if mtype == "playback":
        turn = f.int_("turn", 0, 2**31 - 1, required=True)
        played = f.num("played_ms", 0.0, 24 * 3600 * 1000.0, required=True)
        assert turn is not None and played is not None
        return Playback(turn=turn, played_ms=played, context=f.id_("context"))
    if mtype == "voice.create":
        text = f.str_("text", required=True, max_len=MAX_TEXT_CHARS)
        assert text is not None
        if not text.strip():
            raise ProtocolError("bad_message", "voice.create.text (the transcript) must not be empty")
        return VoiceCreate(
            audio=f.bytes_("audio"),
            text=text,
            voice=f.id_("voice"),
            sample_rate=f.int_("sample_rate", 8000, 192000),
        )
    if mtype == "session.update":
        return SessionUpdate(speakers=f.speakers(), output=f.map_("output"), sampling=f.map_("sampling"),
                             input=f.map_("input"))
    if mtype == "input.audio":
        return InputAudio(data=f.bytes_("data"))
    if mtype == "input.commit":
        text = f.str_("text", required=True, max_len=MAX_TEXT_CHARS)
        speaker = f.int_("speaker", 0, MAX_SPEAKER, required=True)
        start = f.num("start_ms", 0.0, 24 * 3600 * 1000.0, required=True)
        end = f.num("end_ms", 0.0, 24 * 3600 * 1000.0, required=True)
        assert text is not None and speaker is not None and start is not None and end is not None
        if not text.strip():
            raise ProtocolError("bad_message", "input.commit.text (what the caller said) must not be empty")
        if end <= start:
            raise ProtocolError("bad_message", "input.commit needs start_ms < end_ms")
        return InputCommit(speaker=speaker, text=text, start_ms=start, end_ms=end)
    if mtype == "ping":
        return Ping()
    raise ProtocolError("unknown_type", f"unknown message type {mtype!r}")


__all__ = [
    "Audio",
    "CallStarted",
    "CallStopped",
    "Cancel",
    "Dtmf",
    "InputAudio",
    "InputCommit",
    "InputRelay",
    "SpeechStarted",
    "SpeechStopped",
    "ClientMessage",
    "ERROR_CODES",
    "Encoding",
    "Error",
    "Flush",
    "PROTOCOL_VERSION",
    "Ping",
    "Playback",
    "Pong",
    "ProtocolError",
    "ServerMessage",
    "Segment",
    "SessionReady",
    "SessionStart",
    "SessionUpdate",
    "SpeakerSpec",
    "Text",
    "TurnDone",
    "TurnEnd",
    "TurnStarted",
    "Visemes",
    "VoiceCreate",
    "VoiceCreated",
    "Words",
    "decode_client",
    "decode_server",
    "encode",
    "to_wire",
    "valid_id",
]
