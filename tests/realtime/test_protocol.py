"""Protocol v1 codec: every client message decodes, every bad input maps to one documented error."""

from __future__ import annotations

import base64
import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import protocol as p
from realtime.protocol import ERROR_CODES, ProtocolError, decode_client, encode


def mp(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_every_client_message_decodes_from_msgpack_and_json() -> None:
    cases = [
        ({"type": "session.start", "session": "abc", "speakers": [{"speaker": 1, "voice": "v1"}],
          "output": {"codec": "pcm16"}, "sampling": {"seed": 3}}, p.SessionStart),
        ({"type": "text", "text": "Hello", "speaker": 2}, p.Text),
        ({"type": "flush"}, p.Flush),
        ({"type": "turn.end"}, p.TurnEnd),
        ({"type": "cancel"}, p.Cancel),
        ({"type": "playback", "turn": 3, "played_ms": 1234.5}, p.Playback),
        ({"type": "session.update", "speakers": [{"speaker": 0}]}, p.SessionUpdate),
        ({"type": "ping"}, p.Ping),
    ]
    for obj, cls in cases:
        msg, enc = p.decode_client(mp(obj))
        assert isinstance(msg, cls) and enc is p.Encoding.MSGPACK
        msg2, enc2 = p.decode_client(json.dumps(obj))
        assert msg2 == msg and enc2 is p.Encoding.JSON


def test_voice_create_binary_field_in_both_encodings() -> None:
    audio = bytes(range(256))
    m1, _ = p.decode_client(mp({"type": "voice.create", "audio": audio, "text": "hi", "voice": "anna"}))
    m2, _ = p.decode_client(json.dumps({"type": "voice.create", "audio": base64.b64encode(audio).decode(), "text": "hi",
                                        "voice": "anna"}))
    assert isinstance(m1, p.VoiceCreate) and m1 == m2 and m1.audio == audio


def test_server_messages_round_trip_with_binary_audio() -> None:
    msg = p.Audio(turn=1, seq=7, ms=140.0, data=b"\x00\xffopus")
    for enc in p.Encoding:
        wire = p.decode_server(p.encode(msg, enc))
        assert wire == {"type": "audio", "turn": 1, "seq": 7, "ms": 140.0, "data": b"\x00\xffopus"}
    ready = p.decode_server(p.encode(p.SessionReady(session="s", engine={"name": "espeak"}, output={}, resumed=False,
                                                    turns=0), p.Encoding.JSON))
    assert ready["type"] == "session.ready" and ready["protocol"] == 1 and ready["resumed"] is False


@settings(max_examples=200, deadline=None)
@given(
    turn=st.integers(0, 2**40),
    seq=st.integers(0, 2**33),
    ms=st.one_of(st.integers(0, 2**33), st.floats(allow_nan=False)),
    data=st.one_of(st.binary(max_size=300), st.sampled_from([b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536])),
    context=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True)),
)
def test_audio_fast_path_packs_what_the_generic_walk_packs(turn: int, seq: int, ms: float, data: bytes,
                                                           context: str | None) -> None:
    """``audio`` is packed from a fixed head (it is the message sent 50 times a second per stream): its bytes are
    the generic ``to_wire`` map's, for every size of integer, float, binary and context (the golden frames pin the
    common cases)."""
    msg = p.Audio(turn=turn, seq=seq, ms=ms, data=data, context=context)
    assert p.encode(msg, p.Encoding.MSGPACK) == msgpack.packb(p.to_wire(msg), use_bin_type=True)


def test_turn_done_ttfa_none_is_omitted_not_null() -> None:
    wire = p.decode_server(p.encode(p.TurnDone(turn=0, reason="cancelled", audio_ms=0, frames=0, ttfa_ms=None),
                                    p.Encoding.MSGPACK))
    assert "ttfa_ms" not in wire and wire["reason"] == "cancelled"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1", "bad_message"),  # never-used msgpack byte
        (b"\x93\x01\x02\x03", "bad_message"),  # an array, not a map
        ("{not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        (mp({"text": "no type"}), "bad_message"),
        (mp({"type": 5}), "bad_message"),
        (mp({"type": "dance"}), "unknown_type"),
        (mp({"type": "text"}), "bad_message"),
        (mp({"type": "text", "text": 5}), "bad_message"),
        (mp({"type": "text", "text": "x", "speaker": "one"}), "bad_message"),
        (mp({"type": "text", "text": "x", "speaker": 99}), "bad_message"),
        (mp({"type": "text", "text": "x", "speaker": True}), "bad_message"),
        (mp({"type": "text", "text": "x" * 20_001}), "limit"),
        (b"\x82\xa4type\xa4text\xa4text\xa2\xff\xfe", "bad_message"),  # invalid UTF-8 in a str
        (mp({"type": "playback", "turn": -1, "played_ms": 5}), "bad_message"),
        (mp({"type": "playback", "turn": 0, "played_ms": float("nan")}), "bad_message"),
        (mp({"type": "session.start", "session": "has space"}), "bad_message"),
        (mp({"type": "session.start", "speakers": [{"speaker": 0}, {"speaker": 0}]}), "bad_message"),
        (mp({"type": "session.start", "speakers": "all"}), "bad_message"),
        (mp({"type": "session.start", "output": [1]}), "bad_message"),
        (mp({"type": "voice.create", "audio": "notbytes", "text": "t"}), "bad_message"),
        (json.dumps({"type": "voice.create", "audio": "***", "text": "t"}), "bad_message"),
        (mp({"type": "voice.create", "audio": b"x", "text": "  "}), "bad_message"),
        (mp({1: 2}), "bad_message"),  # non-string keys
    ],
)
def test_bad_input_raises_one_documented_error(frame: bytes | str, code: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_client(frame)
    assert info.value.code == code
    assert info.value.code in p.ERROR_CODES
    assert not info.value.fatal
    err = p.decode_server(p.encode(info.value.to_message(), p.Encoding.MSGPACK))
    assert err["type"] == "error" and err["code"] == code and err["message"]


def test_unknown_fields_are_ignored() -> None:
    msg, _ = p.decode_client(mp({"type": "ping", "extra": [1, 2, 3]}))
    assert isinstance(msg, p.Ping)


def test_deeply_nested_json_is_a_bad_message_not_a_crash() -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_client("[" * 100_000 + "]" * 100_000)


# ---- property: the decoder is total (a message, or one ProtocolError), and what it accepts can be sent back


_SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
_VALUES = st.recursive(_SCALARS | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_TYPES = st.sampled_from(["session.start", "text", "flush", "turn.end", "cancel", "playback", "voice.create",
                          "session.update", "ping", "nope", ""])
_FIELDS = st.sampled_from(["session", "speakers", "output", "sampling", "text", "speaker", "turn", "played_ms",
                           "audio", "voice", "sample_rate", "x"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    st.builds(lambda t, f: {"type": t, **f}, _TYPES, st.dictionaries(_FIELDS, _VALUES, max_size=4)),
    st.builds(lambda t, f: {"type": t, **f}, _TYPES, st.dictionaries(_FIELDS, st.text(max_size=6).map(
        lambda s: s + "\ud800"), max_size=2)),
))
def test_the_decoder_is_total(frame: object) -> None:
    if isinstance(frame, dict):
        try:
            frame = json.dumps(frame) if "audio" not in frame else msgpack.packb(frame, use_bin_type=True)
        except (TypeError, ValueError):
            frame = msgpack.packb(frame, use_bin_type=True, unicode_errors="surrogatepass")
    try:
        msg, encoding = decode_client(frame)  # type: ignore[arg-type]
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES and exc.message
        return
    # accepted input can be encoded and sent back (no lone surrogates, nothing unencodable)
    wire = encode(msg, encoding)
    (wire if isinstance(wire, bytes) else wire.encode("utf-8"))
