from __future__ import annotations

from dataclasses import replace

import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest

from sessions.model import SCHEMA_VERSION, Session, Speaker, Turn, Voice
from sessions.errors import StoreError
from sessions.serialize import decode, encode


def codes(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32768, size=(10, frames), dtype=np.int16)


def test_session_round_trip() -> None:
    session = Session(
        id="s-1",
        speakers=[Speaker(0, "alice"), Speaker(1, None)],
        output={"format": "opus", "sample_rate": 48000, "nested": {"a": [1, 2.5, None, True]}},
        sampling={"temperature": 0.7, "top_p": 0.9, "seed": 42},
        turns=3,
        created_at=1.5,
        updated_at=2.25,
    )
    assert decode(encode(session), Session) == session


def test_turn_round_trip_with_codes() -> None:
    turn = Turn(index=4, speaker=1, text="héllo ✓", state="cancelled", audio_ms=1234, codes=codes(321), created_at=9.0)
    back = decode(encode(turn), Turn)
    assert back.codes is not None and turn.codes is not None
    assert back.codes.dtype == np.int16 and back.codes.shape == (10, 321)
    np.testing.assert_array_equal(back.codes, turn.codes)
    back.codes[0, 0] = 7  # decoded codes are a writable array of their own
    assert replace(back, codes=None) == replace(turn, codes=None)


@pytest.mark.parametrize("value", [None, np.zeros((10, 0), np.int16), codes(5).astype(">i2")])
def test_turn_codes_edge_cases(value: np.ndarray | None) -> None:
    back = decode(encode(Turn(0, 0, "", "complete", 0, codes=value)), Turn)
    if value is None:
        assert back.codes is None
    else:
        assert back.codes is not None and back.codes.dtype == np.dtype("=i2")
        np.testing.assert_array_equal(back.codes, value)


def test_voice_round_trip() -> None:
    audio = np.arange(-1000, 1000, dtype="<i2").tobytes()
    voice = Voice("v1", "the transcript", 2.5, 24000, audio, codes=codes(60, seed=1), created_at=3.0)
    back = decode(encode(voice), Voice)
    assert back.audio == audio and back.codes is not None and voice.codes is not None
    np.testing.assert_array_equal(back.codes, voice.codes)
    assert replace(back, codes=None) == replace(voice, codes=None)


def test_encoding_carries_the_schema_version_and_codes_layout() -> None:
    obj = msgpack.unpackb(encode(Turn(0, 0, "x", "complete", 10, codes=codes(2))))
    assert obj["v"] == SCHEMA_VERSION and obj["t"] == "turn"
    assert obj["codes"]["shape"] == [10, 2] and obj["codes"]["dtype"] == "<i2" and len(obj["codes"]["bytes"]) == 40


def test_newer_schema_version_is_refused() -> None:
    obj = msgpack.unpackb(encode(Session("s")))
    obj["v"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*reads version {SCHEMA_VERSION}"):
        decode(msgpack.packb(obj), Session)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"not msgpack at all \xff", msgpack.packb([1, 2]), msgpack.packb({"t": "session"})],
    ids=["empty", "reserved-byte", "garbage", "not-a-map", "no-version"],
)
def test_malformed_bytes_raise_store_error(data: bytes) -> None:
    with pytest.raises(StoreError, match="malformed session record"):
        decode(data, Session)


def test_wrong_kind_missing_field_and_bad_codes_raise_store_error() -> None:
    with pytest.raises(StoreError, match="tagged 'turn'"):
        decode(encode(Turn(0, 0, "x", "complete", 0)), Session)
    obj = msgpack.unpackb(encode(Turn(0, 0, "x", "complete", 0, codes=codes(3))))
    del obj["text"]
    with pytest.raises(StoreError, match="text"):
        decode(msgpack.packb(obj), Turn)
    obj = msgpack.unpackb(encode(Turn(0, 0, "x", "complete", 0, codes=codes(3))))
    obj["codes"]["bytes"] = obj["codes"]["bytes"][:-2]
    with pytest.raises(StoreError, match="codes hold 58 bytes"):
        decode(msgpack.packb(obj), Turn)
    obj = msgpack.unpackb(encode(Turn(0, 0, "x", "complete", 0)))
    obj["state"] = "weird"
    with pytest.raises(StoreError, match="unknown turn state"):
        decode(msgpack.packb(obj), Turn)


@pytest.mark.parametrize("bad", [np.zeros((9, 4), np.int16), np.zeros((10, 4), np.int32), np.zeros(40, np.int16)])
def test_encoding_codes_of_the_wrong_shape_or_dtype_is_a_value_error(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\(10, frames\) int16"):
        encode(Turn(0, 0, "x", "complete", 0, codes=bad))
