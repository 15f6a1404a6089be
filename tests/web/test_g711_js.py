"""web/g711.js (the page's mu-law and A-law decoders) against the server's codec in realtime/audio.py: every one of
the 256 byte values decodes to the same sample, in node and in Chromium (the module the page's player imports)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime.audio import alaw_decode, mulaw_decode
from tests.realtime.conftest import Server
from tests.web.conftest import REPO

ALL_BYTES = bytes(range(256))
DECODE = "[[...mulawToFloat(Uint8Array.from(bytes))], [...alawToFloat(Uint8Array.from(bytes))]]"


def check(decoded: list[list[float]]) -> None:
    mulaw, alaw = (np.asarray(d, dtype=np.float32) for d in decoded)
    np.testing.assert_array_equal(mulaw, mulaw_decode(ALL_BYTES))
    np.testing.assert_array_equal(alaw, alaw_decode(ALL_BYTES))
    assert alaw.min() < -0.9 and alaw.max() > 0.9  # the whole range, both signs


def test_g711_js_decodes_as_the_server_does_in_node(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Chromium test covers g711.js)")
    shutil.copy(REPO / "web" / "g711.js", tmp_path / "g711.mjs")
    script = f"""
        import {{ alawToFloat, mulawToFloat }} from "./g711.mjs";
        const bytes = {json.dumps(list(ALL_BYTES))};
        console.log(JSON.stringify({DECODE}));
    """
    result = subprocess.run([node, "--input-type=module", "-e", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    check(json.loads(result.stdout))


def test_g711_js_decodes_as_the_server_does_in_chromium(browser: Any, web_server: Server) -> None:
    page = browser.new_page()
    try:
        page.goto(f"{web_server.http}/")
        decoded = page.evaluate(
            f"async (bytes) => {{ const {{ alawToFloat, mulawToFloat }} = await import('/g711.js'); return {DECODE}; }}",
            list(ALL_BYTES),
        )
    finally:
        page.close()
    check(decoded)
