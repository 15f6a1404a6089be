"""Fuzz targets: one function per thing under test, taking the fuzzer's bytes and raising only on a bug.

Shared by the coverage-guided harness (``python -m tests.fuzz.fuzz``, atheris, for long runs) and by CI, which
replays the committed corpus through the same functions without atheris (``tests/fuzz/test_corpus.py``).
"""

from __future__ import annotations

from typing import Any

from realtime.protocol import ERROR_CODES, ProtocolError, decode_client, encode


def protocol(data: bytes) -> None:
    """The decoder is total: a frame decodes, or raises the one documented error with a known code; what it
    accepts encodes again and decodes to the same message. The first byte picks a binary (even) or text frame."""
    if not data:
        return
    frame: bytes | str = data[1:]
    if data[0] % 2:
        try:
            frame = data[1:].decode("utf-8")  # a WebSocket text frame is valid UTF-8 (the socket checks)
        except UnicodeDecodeError:
            return
    try:
        msg, encoding = decode_client(frame)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES and exc.message, exc
        return
    wire = encode(msg, encoding)
    again, _ = decode_client(wire)
    assert encode(again, encoding) == wire, (msg, again)  # compared as bytes: a NaN in a settings map is kept


_TEXTS = ("Hi", " there. ", "Yes! ", "word ", "\n")
_CONTEXTS = (None, "a", "b")
_PLAYED = (0.0, 15.0, 50.0, 150.0, 400.0, 9e3)
_TICKS = (0.5, 5.0, 31.0)


def turn_ops(data: bytes) -> list[tuple[str, Any]]:
    """Bytes -> the operations of the turn machine's property test (two bytes each: an op and its argument)."""
    ops: list[tuple[str, Any]] = []
    for i in range(0, len(data) - 1, 2):
        op, arg = data[i] % 11, data[i + 1]
        context = _CONTEXTS[arg % 3]
        ops.append([
            ("say", None),
            ("playback", (arg % 3, _PLAYED[(arg // 3) % len(_PLAYED)])),
            ("text", (_TEXTS[(arg // 3) % len(_TEXTS)], context)),
            ("flush", context),
            ("end", context),
            ("cancel", None if arg % 4 == 3 else context),
            ("job", arg % 5),
            ("deliver", arg % 9),
            ("write", bool(arg % 2)),
            ("tick", _TICKS[arg % 3]),
            ("playback", (arg % 3, _PLAYED[(arg // 3) % len(_PLAYED)])),
        ][op])
    return ops[:60]


def turns(data: bytes) -> None:
    """The turn machine keeps every invariant of its property test over any sequence of operations."""
    from tests.realtime.test_turns import test_random_sessions_keep_every_invariant as prop

    prop.hypothesis.inner_test(turn_ops(data))  # type: ignore[attr-defined]


TARGETS = {"protocol": protocol, "turns": turns}
