"""The Python codec against the golden frames in tests/golden/ (web/protocol.js is held to the same bytes in
tests/web/test_protocol_js.py): encoding a case gives exactly its frames, and decoding its frames gives it back."""

from __future__ import annotations

import pytest

from realtime.protocol import Encoding, decode_client, decode_server, encode, to_wire
from tests.golden import GOLDEN_DIR, Case, load_cases

CASES = load_cases()


def test_every_golden_file_belongs_to_a_case() -> None:
    names = {c.name for c in CASES}
    assert len(names) == len(CASES), "duplicate case names"
    files = {p.stem for p in GOLDEN_DIR.iterdir() if p.suffix in (".msgpack", ".json") and p.name != "messages.json"}
    assert files == names, "golden files and messages.json disagree: run python -m tests.golden.make_golden"


def test_the_cases_cover_every_message_type() -> None:
    from tests.golden import CLIENT_TYPES, SERVER_CLASSES

    assert {c.wire["type"] for c in CASES} == set(CLIENT_TYPES) | set(SERVER_CLASSES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_python_encodes_the_golden_bytes(case: Case) -> None:
    msg = case.typed()
    wire = to_wire(msg)
    assert wire == case.wire and list(wire) == list(case.wire), "field order is part of the wire format"
    assert encode(msg, Encoding.MSGPACK) == case.msgpack_path.read_bytes()
    assert encode(msg, Encoding.JSON) == case.json_path.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_python_decodes_the_golden_bytes(case: Case) -> None:
    binary = case.msgpack_path.read_bytes()
    text = case.json_path.read_text(encoding="utf-8")
    if case.client:
        assert decode_client(binary) == (case.typed(), Encoding.MSGPACK)
        assert decode_client(text) == (case.typed(), Encoding.JSON)
    else:
        assert decode_server(binary) == case.wire
        assert decode_server(text) == case.wire
