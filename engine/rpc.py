"""The engine worker RPC, version 1: any ``Synthesizer`` served out of process. Every out-of-process engine speaks
it: the worker pool's ``shoal worker`` processes over TCP, and the built-in voice's espeak-ng processes over their
stdin / stdout (``engine.rpc_process``).

It knows nothing of the client protocol (``realtime/``) or the store (``sessions/``): it carries
``SynthesisRequest``s in and ``AudioChunk``s out. The server is ``engine.rpc_server.WorkerServer``, the client
``engine.rpc_client.WorkerClient``.

Framing. A connection is a stream of frames, each a 4-byte big-endian unsigned length ``N`` followed by ``N``
bytes of one msgpack map. ``N`` is at most the receiver's ``max_frame`` (the worker announces its own in
``hello``, default 32 MiB); a longer frame is a protocol error and the receiver closes the connection. Every map has
``type``. Arrays (PCM, codes) travel as ``{"shape": [..], "dtype": "<f4" | "<i2", "data": bytes}`` (little-endian,
C order; codes are ``(10, frames)`` ``<i2``, as in the session store).

Requests are multiplexed: the client picks an ``id`` (an unsigned integer, unique among its requests in flight on
the connection) for each ``submit``, ``encode_voice`` and ``stats``; everything about that request carries the
same ``id``. Unknown fields are ignored; an unknown ``type`` gets an ``error`` with code ``protocol``.

Worker -> client, once, first: ``hello`` {``version`` 1, ``worker`` (its id), ``engine`` {``name``,
``sample_rate``, ``cloning``, ``frame_ms``?, ``timing`` exact or none}, ``max_frame``}.

Client -> worker

| type | fields | meaning |
|---|---|---|
| ``submit`` | ``id``, ``text``, ``speaker``, ``voices`` [{``speaker``, ``voice``, ``text``, ``codes``?}], ``history`` [{``speaker``, ``text``, ``codes``?}], ``sampling`` {``temperature``, ``top_p``, ``top_k``, ``seed``, ``max_frames``}, ``session``?, ``window``, ``pcm`` ``"f32"`` \\| ``"i16"`` | synthesize; ``window`` is the initial credit |
| ``credit`` | ``id``, ``n`` | the consumer took ``n`` more chunks: the worker may send ``n`` more |
| ``cancel`` | ``id`` | stop now; answered by ``done`` (``cancelled``) unless the request already ended |
| ``encode_voice`` | ``id``, ``pcm`` (float32 array), ``sample_rate``, ``text`` | reference audio -> codes |
| ``stats`` | ``id`` | counters, health and load |
| ``ping`` | | answered by ``pong`` (keepalive) |

Worker -> client

| type | fields | meaning |
|---|---|---|
| ``frames`` | ``id``, ``pcm`` (array, ``<f4`` or ``<i2`` as asked), ``codes``?, ``timing``? {``words`` [[word, start, end]], ``phonemes`` [[ipa, start]], ``estimated``, ``complete``} | one audio chunk; each spends one credit |
| ``done`` | ``id``, ``reason`` ``complete`` \\| ``cancelled`` | the request ended; the id is free |
| ``error`` | ``id``?, ``code``, ``message`` | the request ended in failure (or, without ``id``, the connection is closing) |
| ``voice`` | ``id``, ``codes``? | answer to ``encode_voice`` (no codes: the engine cannot clone) |
| ``report`` | ``id``, ``stats`` {name: number}, ``health`` (null when ready), ``load`` | answer to ``stats`` |
| ``pong`` | | |

Error codes: ``bad_request`` (the request is malformed: do not retry), ``unavailable`` (this worker cannot take
it now — shutting down, engine not ready, too many requests: try another worker), ``engine`` (synthesis failed),
``internal`` (a bug in the worker), ``protocol`` (a frame that does not decode; the connection closes).

Flow control. The worker sends at most ``window`` ``frames`` for a request before the first ``credit``, and never
more than the credit granted so far; it pulls the next chunk from its engine only when it holds a credit, so a
consumer that stops reading stops that request's generation (the engines are pull-driven) without holding up any
other request on the connection. The client therefore buffers at most ``window`` chunks per request and its reader
never blocks; a worker that overruns the credit is a protocol error. Credit is capped (``MAX_WINDOW``).
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

from engine.base import (
    AudioChunk,
    EngineInfo,
    PastTurn,
    PhonemeTiming,
    Sampling,
    SynthesisRequest,
    Timing,
    VoiceRef,
    WordTiming,
)

__all__ = [
    "ERROR_CODES",
    "MAX_FRAME",
    "MAX_WINDOW",
    "RPC_VERSION",
    "Cancel",
    "Credit",
    "Done",
    "EncodeVoice",
    "Failed",
    "Frames",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "RpcError",
    "Stats",
    "Report",
    "Submit",
    "VoiceReply",
    "decode",
    "encode",
    "read_message",
    "write_message",
]

RPC_VERSION = 1
MAX_FRAME = 32 << 20  # default largest frame, bytes
MAX_WINDOW = 1024  # most credit a request may hold (the built-in voice runs ~15 s ahead: 256 chunks of ~60 ms)
ERROR_CODES = frozenset({"bad_request", "unavailable", "engine", "internal", "protocol"})
_HEADER = struct.Struct(">I")
_DTYPES = {"<f4": np.dtype("<f4"), "<i2": np.dtype("<i2")}
_MAX_ID = (1 << 63) - 1


class RpcError(Exception):
    """A frame or message that cannot be accepted: the one error ``decode`` and ``read_message`` raise."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# --------------------------------------------------------------------------------------------- client -> worker


@dataclass(frozen=True)
class Submit:
    type: ClassVar[str] = "submit"
    id: int
    request: SynthesisRequest
    window: int = 4
    pcm: str = "f32"  # how the worker should send PCM: "f32" (exact) or "i16" (half the bytes)


@dataclass(frozen=True)
class Credit:
    type: ClassVar[str] = "credit"
    id: int
    n: int


@dataclass(frozen=True)
class Cancel:
    type: ClassVar[str] = "cancel"
    id: int


@dataclass(frozen=True)
class EncodeVoice:
    type: ClassVar[str] = "encode_voice"
    id: int
    pcm: np.ndarray  # float32 mono
    sample_rate: int
    text: str


@dataclass(frozen=True)
class Stats:
    type: ClassVar[str] = "stats"
    id: int


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"


# --------------------------------------------------------------------------------------------- worker -> client


@dataclass(frozen=True)
class Hello:
    type: ClassVar[str] = "hello"
    worker: str
    engine: EngineInfo
    max_frame: int = MAX_FRAME
    version: int = RPC_VERSION


@dataclass(frozen=True)
class Frames:
    type: ClassVar[str] = "frames"
    id: int
    chunk: AudioChunk
    pcm: str = "f32"  # encoding of chunk.pcm on the wire


@dataclass(frozen=True)
class Done:
    type: ClassVar[str] = "done"
    id: int
    reason: str  # complete | cancelled


@dataclass(frozen=True)
class Failed:
    type: ClassVar[str] = "error"
    id: int | None
    code: str
    message: str


@dataclass(frozen=True)
class VoiceReply:
    type: ClassVar[str] = "voice"
    id: int
    codes: np.ndarray | None


@dataclass(frozen=True)
class Report:
    type: ClassVar[str] = "report"
    id: int
    stats: Mapping[str, float] = field(default_factory=dict)
    health: str | None = None
    load: int = 0


@dataclass(frozen=True)
class Pong:
    type: ClassVar[str] = "pong"


Message = (
    Submit | Credit | Cancel | EncodeVoice | Stats | Ping | Hello | Frames | Done | Failed | VoiceReply | Report
    | Pong
)

# ------------------------------------------------------------------------------------------------------- encode


def _array(a: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(a, dtype=_DTYPES[dtype])
    return {"shape": list(arr.shape), "dtype": dtype, "data": arr.tobytes()}


def _codes(codes: np.ndarray | None) -> dict[str, Any] | None:
    return None if codes is None else _array(codes, "<i2")


def _pcm(pcm: np.ndarray, fmt: str) -> dict[str, Any]:
    if fmt == "i16":
        return _array(np.round(np.clip(pcm, -1.0, 1.0) * 32767.0), "<i2")
    return _array(pcm, "<f4")


def _timing(t: Timing) -> dict[str, Any]:
    return {"words": [[w.word, w.start, w.end] for w in t.words],
            "phonemes": [[p.phoneme, p.start] for p in t.phonemes], "estimated": t.estimated, "complete": t.complete}


def _request(r: SynthesisRequest) -> dict[str, Any]:
    s = r.sampling
    return {
        "text": r.text,
        "speaker": r.speaker,
        "voices": [{"speaker": k, "voice": v.voice, "text": v.text, "codes": _codes(v.codes)} for k, v in r.voices.items()],
        "history": [{"speaker": t.speaker, "text": t.text, "codes": _codes(t.codes)} for t in r.history],
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed,
                     "max_frames": s.max_frames},
        "session": r.session,
    }


def encode(msg: Message) -> bytes:
    """One message as a msgpack map (without the length prefix)."""
    body: dict[str, Any] = {"type": msg.type}
    if isinstance(msg, Submit):
        body.update(id=msg.id, window=msg.window, pcm=msg.pcm, **_request(msg.request))
    elif isinstance(msg, Credit):
        body.update(id=msg.id, n=msg.n)
    elif isinstance(msg, (Cancel, Stats)):
        body["id"] = msg.id
    elif isinstance(msg, EncodeVoice):
        body.update(id=msg.id, pcm=_array(msg.pcm, "<f4"), sample_rate=msg.sample_rate, text=msg.text)
    elif isinstance(msg, Hello):
        body.update(version=msg.version, worker=msg.worker, engine=msg.engine.to_wire(), max_frame=msg.max_frame)
    elif isinstance(msg, Frames):
        body.update(id=msg.id, pcm=_pcm(msg.chunk.pcm, msg.pcm), codes=_codes(msg.chunk.codes))
        if msg.chunk.timing is not None:
            body["timing"] = _timing(msg.chunk.timing)
    elif isinstance(msg, Done):
        body.update(id=msg.id, reason=msg.reason)
    elif isinstance(msg, Failed):
        body.update(id=msg.id, code=msg.code, message=msg.message)
    elif isinstance(msg, VoiceReply):
        body.update(id=msg.id, codes=_codes(msg.codes))
    elif isinstance(msg, Report):
        body.update(id=msg.id, stats=dict(msg.stats), health=msg.health, load=msg.load)
    return msgpack.packb(body, use_bin_type=True)


# ------------------------------------------------------------------------------------------------------- decode


class _Fields:
    """Typed access to one decoded map; every failure is an ``RpcError`` naming the field."""

    def __init__(self, body: Mapping[str, Any], where: str, request_id: int | None = None) -> None:
        self.body = body
        self.where = where
        self.request_id = request_id

    def bad(self, name: str, what: str) -> RpcError:
        return RpcError("bad_request", f"{self.where}.{name}: {what}", self.request_id)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., optional: bool = False) -> Any:
        if name not in self.body or (optional and self.body[name] is None):
            if default is ...:
                raise self.bad(name, "missing")
            return default
        value = self.body[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
            raise self.bad(name, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def integer(self, name: str, lo: int, hi: int, default: Any = ...) -> int:
        value = self.get(name, int, default)
        if not lo <= value <= hi:
            raise self.bad(name, f"must be within {lo}..{hi}")
        return value

    def ident(self) -> int:
        return self.integer("id", 0, _MAX_ID)

    def array(self, name: str, dtype: str, ndim: int, optional: bool = False) -> np.ndarray | None:
        spec = self.get(name, dict, None if optional else ..., optional=optional)
        if spec is None:
            return None
        f = _Fields(spec, f"{self.where}.{name}", self.request_id)
        shape = f.get("shape", list)
        if f.get("dtype", str) != dtype:
            raise f.bad("dtype", f"must be {dtype}")
        if len(shape) != ndim or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise f.bad("shape", f"must be {ndim} non-negative integers")
        data = f.get("data", bytes)
        dt = _DTYPES[dtype]
        if len(data) != math.prod(shape) * dt.itemsize:
            raise f.bad("data", f"{len(data)} bytes do not hold shape {shape} of {dtype}")
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()  # writable, owned (torch.from_numpy)

    def timing(self, name: str) -> Timing | None:
        spec = self.get(name, dict, None, optional=True)
        if spec is None:
            return None
        f = _Fields(spec, f"{self.where}.{name}", self.request_id)
        try:
            words = tuple(WordTiming(int(w), int(s), int(e)) for w, s, e in f.get("words", list))
            phonemes = tuple(PhonemeTiming(str(p), int(s)) for p, s in f.get("phonemes", list, []))
        except (TypeError, ValueError) as exc:
            raise f.bad("words", f"must be [word, start, end] triples and [phoneme, start] pairs ({exc})") from None
        if any(not 0 <= w.start < w.end for w in words):
            raise f.bad("words", "each word needs 0 <= start < end")
        return Timing(words=words, phonemes=phonemes, estimated=f.get("estimated", bool, False),
                      complete=f.get("complete", bool, True))

    def codes(self, name: str) -> np.ndarray | None:
        codes = self.array(name, "<i2", 2, optional=True)
        if codes is not None and codes.shape[0] != 10:
            raise self.bad(name, f"codes must be (10, frames), got {codes.shape}")
        return codes


def _decode_request(f: _Fields) -> SynthesisRequest:
    voices: dict[int, VoiceRef] = {}
    for i, v in enumerate(f.get("voices", list, [])):
        vf = _Fields(v if isinstance(v, dict) else {}, f"submit.voices[{i}]", f.request_id)
        speaker = vf.integer("speaker", 0, 1 << 16)
        voices[speaker] = VoiceRef(voice=vf.get("voice", str), text=vf.get("text", str, ""), codes=vf.codes("codes"))
    history: list[PastTurn] = []
    for i, t in enumerate(f.get("history", list, [])):
        tf = _Fields(t if isinstance(t, dict) else {}, f"submit.history[{i}]", f.request_id)
        history.append(PastTurn(speaker=tf.integer("speaker", 0, 1 << 16), text=tf.get("text", str), codes=tf.codes("codes")))
    sf = _Fields(f.get("sampling", dict, {}), "submit.sampling", f.request_id)
    known = {k: sf.body[k] for k in ("temperature", "top_p", "top_k", "seed", "max_frames") if k in sf.body}
    try:
        sampling = Sampling(**known)
    except (TypeError, ValueError) as exc:
        raise f.bad("sampling", str(exc)) from None
    return SynthesisRequest(
        text=f.get("text", str),
        speaker=f.integer("speaker", 0, 1 << 16, 0),
        voices=voices,
        history=tuple(history),
        sampling=sampling,
        session=f.get("session", str, None, optional=True),
    )


def _decode_info(f: _Fields) -> EngineInfo:
    e = _Fields(f.get("engine", dict), "hello.engine")
    frame_ms = e.get("frame_ms", (int, float), None, optional=True)
    return EngineInfo(name=e.get("name", str), sample_rate=e.integer("sample_rate", 1, 1 << 20),
                      cloning=e.get("cloning", bool), frame_ms=None if frame_ms is None else float(frame_ms),
                      timing=e.get("timing", str, "none") == "exact")


def decode(payload: bytes) -> Message:
    """One frame's payload as a typed message. Raises ``RpcError`` (with the request's id when it is known)."""
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RpcError("protocol", f"frame is not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise RpcError("protocol", "frame is not a map with a type")
    kind = body["type"]
    rid = body.get("id")
    valid = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _MAX_ID
    f = _Fields(body, kind, rid if valid else None)
    if kind == "submit":
        fmt = f.get("pcm", str, "f32")
        if fmt not in ("f32", "i16"):
            raise f.bad("pcm", "must be f32 or i16")
        return Submit(id=f.ident(), request=_decode_request(f), window=f.integer("window", 1, MAX_WINDOW, 4), pcm=fmt)
    if kind == "credit":
        return Credit(id=f.ident(), n=f.integer("n", 1, MAX_WINDOW))
    if kind == "cancel":
        return Cancel(id=f.ident())
    if kind == "encode_voice":
        pcm = f.array("pcm", "<f4", 1)
        assert pcm is not None
        return EncodeVoice(id=f.ident(), pcm=pcm, sample_rate=f.integer("sample_rate", 1, 1 << 20), text=f.get("text", str, ""))
    if kind == "stats":
        return Stats(id=f.ident())
    if kind == "ping":
        return Ping()
    if kind == "hello":
        return Hello(worker=f.get("worker", str), engine=_decode_info(f), max_frame=f.integer("max_frame", 1024, 1 << 31),
                     version=f.integer("version", 0, 1 << 16))
    if kind == "frames":
        pcm_arr = f.get("pcm", dict)
        fmt = "i16" if pcm_arr.get("dtype") == "<i2" else "f32"
        pcm = f.array("pcm", "<i2" if fmt == "i16" else "<f4", 1)
        assert pcm is not None
        samples = pcm.astype(np.float32) / np.float32(32767.0) if fmt == "i16" else pcm
        return Frames(id=f.ident(), chunk=AudioChunk(pcm=samples, codes=f.codes("codes"), timing=f.timing("timing")),
                      pcm=fmt)
    if kind == "done":
        reason = f.get("reason", str)
        if reason not in ("complete", "cancelled"):
            raise f.bad("reason", "must be complete or cancelled")
        return Done(id=f.ident(), reason=reason)
    if kind == "error":
        code = f.get("code", str)
        rid_opt = f.get("id", int, None, optional=True)
        return Failed(id=rid_opt, code=code if code in ERROR_CODES else "internal", message=f.get("message", str, ""))
    if kind == "voice":
        return VoiceReply(id=f.ident(), codes=f.codes("codes"))
    if kind == "report":
        stats = {k: float(v) for k, v in f.get("stats", dict).items()
                 if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return Report(id=f.ident(), stats=stats, health=f.get("health", str, None, optional=True),
                          load=f.integer("load", 0, 1 << 31, 0))
    if kind == "pong":
        return Pong()
    raise RpcError("protocol", f"unknown message type {kind!r}", f.request_id)


# ----------------------------------------------------------------------------------------------------- streams


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


async def read_message(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> Message | None:
    """The next message, or None at a clean end of stream. Raises ``RpcError`` (code ``protocol`` for a frame that
    cannot be read at all: the connection must close) and ``ConnectionError`` / ``asyncio.IncompleteReadError``."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    (size,) = _HEADER.unpack(header)
    if size > max_frame:
        raise RpcError("protocol", f"frame of {size} bytes exceeds the limit of {max_frame}")
    return decode(await reader.readexactly(size))


def write_message(writer: asyncio.StreamWriter, msg: Message) -> int:
    """Queue one message on the transport (the caller drains). Returns its framed size."""
    data = frame(encode(msg))
    writer.write(data)
    return len(data)


