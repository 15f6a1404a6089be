"""A phone call joins the session the voice chat page drives (Twilio Media Streams at /v1/twilio), in real headless
Chromium against a real `shoal serve`: while the call is joined the page's turns are heard on the call, not in the
page, and the page notes the call and counts the caller's relayed audio; when the call hangs up the audio comes
back to the page. The Twilio side is a few frames of its documented messages, sent from the test."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from websockets.sync.client import connect

from tests.web.conftest import ShoalPage

SILENCE = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence
STREAM = "MZ" + "5" * 32


def log_text(page: ShoalPage) -> str:
    return page.page.evaluate("document.getElementById('log').textContent")  # type: ignore[no-any-return]


def test_a_phone_call_takes_the_pages_audio_and_gives_it_back(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    session = page.stats()["session"]
    twilio = page.server.url.replace("/v1/realtime", "/v1/twilio")
    with connect(twilio, max_size=None) as call:
        call.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        call.send(json.dumps({"event": "start", "streamSid": STREAM, "start": {
            "streamSid": STREAM, "callSid": "CA" + "6" * 32, "customParameters": {"session": session},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        page.wait_for("document.getElementById('log').textContent.includes('joined')")
        for i in range(25):  # half a second of a quiet line
            call.send(json.dumps({"event": "media", "streamSid": STREAM,
                                  "media": {"track": "inbound", "chunk": str(i), "payload": SILENCE}}))
            time.sleep(0.02)
        page.wait_for("shoal.stats().callerFrames >= 25")

        before = page.stats()["packetsReceived"]
        done = page.say("This goes down the phone line.", 1)
        assert done["reason"] == "complete" and done["frames"] > 10
        assert page.stats()["packetsReceived"] == before  # the call heard it, the page did not
        media: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(media) < done["frames"] and time.monotonic() < deadline:
            message = json.loads(call.recv(timeout=10))
            if message["event"] == "media":
                media.append(message)
        assert len(media) == done["frames"]
        assert {len(base64.b64decode(m["media"]["payload"])) for m in media} == {160}  # mu-law 8 kHz, 20 ms

        call.send(json.dumps({"event": "stop", "streamSid": STREAM, "stop": {"callSid": "CA" + "6" * 32}}))
        page.wait_for("document.getElementById('log').textContent.includes('ended (hangup)')")
    done = page.say("And now the page hears me again.", 0)
    assert done["reason"] == "complete"
    page.wait_for(f"shoal.stats().packetsReceived >= {before + done['frames']}")
    text = log_text(page)
    assert "phone call CA6666" in text and "unknown message type" not in text
    assert page.errors() == []
