"""Golden protocol v1 frames shared by the Python codec and ``web/protocol.js``.

``messages.json`` lists each case as its wire map (binary fields as ``{"$bytes": base64}``); ``NAME.msgpack`` and
``NAME.json`` hold the exact binary and text frames. Rewrite them with ``python -m tests.golden.make_golden`` only
when the wire format changes on purpose, and then make ``web/protocol.js`` match.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from realtime import protocol
from realtime.protocol import ClientMessage, ServerMessage, SpeakerSpec, decode_client

GOLDEN_DIR = Path(__file__).resolve().parent
MANIFEST = GOLDEN_DIR / "messages.json"

SERVER_CLASSES: dict[str, type] = {cls.type: cls for cls in typing.get_args(ServerMessage)}
CLIENT_TYPES = frozenset(cls.type for cls in typing.get_args(ClientMessage))


@dataclass(frozen=True)
class Case:
    name: str
    wire: dict[str, Any]  # the message's wire map, binary fields as bytes

    @property
    def client(self) -> bool:
        return self.wire["type"] in CLIENT_TYPES

    @property
    def msgpack_path(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.msgpack"

    @property
    def json_path(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.json"

    def typed(self) -> ClientMessage | ServerMessage:
        """The typed message: client ones through the Python decoder, server ones built from their fields."""
        if self.client:
            msg, _ = decode_client(msgpack.packb(self.wire, use_bin_type=True))
            return msg
        fields = {k: v for k, v in self.wire.items() if k != "type"}
        if "speakers" in fields:
            fields["speakers"] = tuple(SpeakerSpec(**s) for s in fields["speakers"])
        cls = SERVER_CLASSES[self.wire["type"]]
        for f in dataclasses.fields(cls):  # a field left out of the wire map is None (Python's to_wire skips None)
            if f.name not in fields and f.default is dataclasses.MISSING:
                fields[f.name] = None
        return cls(**fields)  # type: ignore[no-any-return]


def _unbox(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: _unbox(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unbox(v) for v in value]
    return value


def load_manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def load_cases() -> list[Case]:
    return [Case(c["name"], _unbox(c["message"])) for c in load_manifest()["cases"]]


__all__ = ["Case", "GOLDEN_DIR", "MANIFEST", "load_cases", "load_manifest", "protocol"]
