"""web/protocol.js against the golden frames of tests/golden/ (the Python codec is held to the same bytes in
tests/realtime/test_golden.py): in Chromium, on the page as the gateway serves it, and in node where there is one."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from realtime.protocol import Encoding, InputRelay, SessionReady, SpeakerSpec, encode, to_wire
from tests.golden import load_cases, load_manifest
from tests.realtime.conftest import Server
from tests.web.conftest import REPO

CHECK = Path(__file__).resolve().parent / "golden_check.mjs"

# Floats whose JSON text Python and JavaScript write differently unless protocol.js takes care.
FLOATS = [0.0, -0.0, 1.0, 20.0, 1250.0, 0.125, 12.345, 1e-05, 0.0001, 1.5e-07, 1e16, 1.5e16, 123456789012345.6,
          46.51162790697674, 86400000.0, 1e22, 2.5e-300, -3.75]


def _boxed(value: Any) -> Any:
    """A wire map as messages.json writes it: bytes as {"$bytes": base64}."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _boxed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_boxed(v) for v in value]
    return value


# Messages tests/golden/ has no case for yet, framed here by the Python codec itself: the relay of a call's audio
# (the server's "input.audio", a type the client sends too) and session.ready with its history and input echo.
PYTHON_CASES = {
    "py_input_relay": InputRelay(data=bytes(range(250, 256)) + b"\x7f\x00", ms=1240.0, codec="mulaw"),
    "py_session_ready_input": SessionReady(
        session="s-3", engine={"name": "stub", "sample_rate": 24000, "cloning": False, "timing": "exact"},
        output={"codec": "mulaw", "sample_rate": 8000, "frame_ms": 20, "lead_ms": 1500, "bitrate": 32000},
        resumed=True, turns=2, speakers=(SpeakerSpec(0), SpeakerSpec(1, "v-bob")),
        history=({"turn": 0, "speaker": 0, "text": "Hello.", "state": "complete", "audio_ms": 820},
                 {"turn": 1, "speaker": 1, "text": "Wait —", "state": "cancelled", "audio_ms": 0}),
        input={"codec": "mulaw", "sample_rate": 8000, "vad": "on", "barge_in": True, "threshold": 0.5,
               "min_speech_ms": 96, "min_silence_ms": 500},
    ),
}


def python_cases() -> list[dict[str, Any]]:
    out = []
    for name, msg in PYTHON_CASES.items():
        binary, text = encode(msg, Encoding.MSGPACK), encode(msg, Encoding.JSON)
        assert isinstance(binary, bytes) and isinstance(text, str)
        out.append({"name": name, "message": _boxed(to_wire(msg)), "msgpack": base64.b64encode(binary).decode(),
                    "json": text})
    return out


def golden_data() -> dict[str, Any]:
    manifest = load_manifest()
    cases = []
    for entry, case in zip(manifest["cases"], load_cases(), strict=True):
        cases.append(
            {
                "name": case.name,
                "message": entry["message"],
                "msgpack": base64.b64encode(case.msgpack_path.read_bytes()).decode(),
                "json": case.json_path.read_text(encoding="utf-8"),
            }
        )
    return {"cases": cases + python_cases(), "floats": [[x, repr(x)] for x in FLOATS]}


def test_the_golden_set_is_not_empty() -> None:
    data = golden_data()
    assert len(data["cases"]) >= 20
    assert all(c["json"].startswith('{"type":') for c in data["cases"])


def test_protocol_js_matches_the_golden_frames_in_chromium(browser: Any, web_server: Server) -> None:
    page = browser.new_page()
    try:
        page.goto(f"{web_server.http}/")  # protocol.js exactly as the gateway serves it, imported by the page
        failures = page.evaluate(
            """async ([source, data]) => {
                const protocol = await import('/protocol.js');
                const url = URL.createObjectURL(new Blob([source], {type: 'text/javascript'}));
                const { checkGolden } = await import(url);
                return checkGolden(protocol, data);
            }""",
            [CHECK.read_text(encoding="utf-8"), golden_data()],
        )
    finally:
        page.close()
    assert failures == []


def test_protocol_js_matches_the_golden_frames_in_node(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Chromium test covers protocol.js)")
    # web/ has no package.json: give node a copy that says "ES modules", as browsers assume
    shutil.copytree(REPO / "web", tmp_path / "web", ignore=shutil.ignore_patterns("*.html", "*.css", "*.svg"))
    (tmp_path / "web" / "package.json").write_text('{"type": "module"}\n')
    shutil.copy(CHECK, tmp_path / "golden_check.mjs")
    (tmp_path / "data.json").write_text(json.dumps(golden_data()), encoding="utf-8")
    script = """
        import { readFileSync } from "node:fs";
        import * as protocol from "./web/protocol.js";
        import { checkGolden } from "./golden_check.mjs";
        const failures = checkGolden(protocol, JSON.parse(readFileSync("data.json", "utf8")));
        console.log(JSON.stringify(failures));
    """
    result = subprocess.run(
        [node, "--input-type=module", "-e", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
