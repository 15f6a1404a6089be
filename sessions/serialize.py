"""The one msgpack serializer for `Session`, `Turn` and `Voice`.

Every record is a map with `"v": SCHEMA_VERSION` and `"t"` (its kind). Codes travel as
`{"shape": [10, frames], "dtype": "<i2", "bytes": ...}`. Anything that does not decode into the requested
record of this schema version raises `StoreError`; encoding a record that breaks the model's invariants (codes
that are not (10, frames) int16) raises `ValueError`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]
import numpy as np

from sessions.errors import StoreError
from sessions.model import SCHEMA_VERSION, TURN_STATES, Session, Speaker, Turn, Voice

__all__ = ["decode", "encode"]


R = TypeVar("R", Session, Turn, Voice)

CODEBOOKS = 10
_CODES_DTYPE = "<i2"
_KINDS: dict[type, str] = {Session: "session", Turn: "turn", Voice: "voice"}


def encode(record: Session | Turn | Voice) -> bytes:
    """Encode a record as msgpack bytes tagged with the schema version."""
    body: dict[str, Any]
    if isinstance(record, Session):
        body = {
            "id": record.id,
            "speakers": [{"speaker": s.speaker, "voice": s.voice} for s in record.speakers],
            "output": record.output,
            "sampling": record.sampling,
            "turns": record.turns,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
        }
    elif isinstance(record, Turn):
        body = {
            "index": record.index,
            "speaker": record.speaker,
            "text": record.text,
            "state": record.state,
            "audio_ms": record.audio_ms,
            "codes": _encode_codes(record.codes),
            "created_at": record.created_at,
            # added within schema 1: optional, absent in older records, ignored by older readers
            "context": record.context,
            "started_at": record.started_at,
        }
    elif isinstance(record, Voice):
        body = {
            "voice": record.voice,
            "text": record.text,
            "seconds": record.seconds,
            "sample_rate": record.sample_rate,
            "audio": bytes(record.audio),
            "codes": _encode_codes(record.codes),
            "created_at": record.created_at,
            "audio_format": record.audio_format,  # added within schema 1: absent in older records (pcm16)
        }
    else:
        raise TypeError(f"cannot encode {type(record).__name__}")
    out = msgpack.packb({"v": SCHEMA_VERSION, "t": _KINDS[type(record)], **body}, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def decode(data: bytes, kind: type[R]) -> R:
    """Decode bytes written by `encode` into a record of `kind`; raise `StoreError` if they are not one."""
    name = _KINDS[kind]
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types (ExtraData, FormatError, ValueError, ...)
        raise StoreError(f"malformed {name} record: not msgpack ({e})") from e
    if not isinstance(obj, dict):
        raise StoreError(f"malformed {name} record: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(f"malformed {name} record: missing schema version")
    if version != SCHEMA_VERSION:
        newer = " (written by a newer Shoal?)" if version > SCHEMA_VERSION else ""
        raise StoreError(
            f"unsupported {name} record schema version {version}{newer}; this build reads version {SCHEMA_VERSION}"
        )
    if obj.get("t") != name:
        raise StoreError(f"malformed {name} record: it is tagged {obj.get('t')!r}")
    try:
        record: Session | Turn | Voice
        if kind is Session:
            record = Session(
                id=_typed(obj["id"], str),
                speakers=[Speaker(_typed(s["speaker"], int), _opt_str(s["voice"])) for s in obj["speakers"]],
                output=_typed(obj["output"], dict),
                sampling=_typed(obj["sampling"], dict),
                turns=_typed(obj["turns"], int),
                created_at=float(obj["created_at"]),
                updated_at=float(obj["updated_at"]),
            )
        elif kind is Turn:
            state = _typed(obj["state"], str)
            if state not in TURN_STATES:
                raise ValueError(f"unknown turn state {state!r}")
            record = Turn(
                index=_typed(obj["index"], int),
                speaker=_typed(obj["speaker"], int),
                text=_typed(obj["text"], str),
                state=state,
                audio_ms=_typed(obj["audio_ms"], int),
                codes=_decode_codes(obj["codes"]),
                created_at=float(obj["created_at"]),
                context=_opt_str(obj.get("context")),
                started_at=None if obj.get("started_at") is None else float(obj["started_at"]),
            )
        else:
            record = Voice(
                voice=_typed(obj["voice"], str),
                text=_typed(obj["text"], str),
                seconds=float(obj["seconds"]),
                sample_rate=_typed(obj["sample_rate"], int),
                audio=_typed(obj["audio"], bytes),
                codes=_decode_codes(obj["codes"]),
                created_at=float(obj["created_at"]),
                audio_format=_typed(obj.get("audio_format", "pcm16"), str),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"malformed {name} record: {e!r}") from e
    assert isinstance(record, kind)
    return record


def _encode_codes(codes: np.ndarray | None) -> dict[str, Any] | None:
    if codes is None:
        return None
    if codes.dtype.kind != "i" or codes.dtype.itemsize != 2 or codes.ndim != 2 or codes.shape[0] != CODEBOOKS:
        raise ValueError(f"codes must be a ({CODEBOOKS}, frames) int16 array, got {codes.shape} {codes.dtype}")
    return {"shape": list(codes.shape), "dtype": _CODES_DTYPE, "bytes": codes.astype(_CODES_DTYPE).tobytes()}


def _decode_codes(obj: Any) -> np.ndarray | None:
    if obj is None:
        return None
    shape = [_typed(n, int) for n in obj["shape"]]
    if obj["dtype"] != _CODES_DTYPE or len(shape) != 2 or shape[0] != CODEBOOKS or shape[1] < 0:
        raise ValueError(f"codes must be ({CODEBOOKS}, frames) {_CODES_DTYPE}, got {shape} {obj['dtype']}")
    raw = _typed(obj["bytes"], bytes)
    if len(raw) != shape[0] * shape[1] * 2:
        raise ValueError(f"codes hold {len(raw)} bytes, shape {shape} needs {shape[0] * shape[1] * 2}")
    return np.frombuffer(raw, dtype=_CODES_DTYPE).reshape(shape).astype(np.int16)  # native order, writable


T = TypeVar("T")


def _typed(value: Any, cls: type[T]) -> T:
    if not isinstance(value, cls) or (cls is int and isinstance(value, bool)):
        raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _typed(value, str)
