"""The voice chat page (web/) in real headless Chromium against a real `shoal serve` with the built-in voice.

Audio really plays: Opus is decoded by WebCodecs and rendered by the AudioWorklet in real time (headless Chromium
has a fake audio output), so the numbers asserted here are what a listener would hear. Timeouts are generous
and nothing asserts on latency: the machine may have two cores shared by the server, espeak and Chromium.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.realtime.conftest import Server, start_server
from tests.web.conftest import VIEWPORTS, ShoalPage, screenshot, sized_page

LONG = " ".join(["This sentence goes on for a while, so that there is plenty of speech left to interrupt."] * 6)


def turns_in_transcript(page: ShoalPage) -> list[dict[str, Any]]:
    return page.page.evaluate(  # type: ignore[no-any-return]
        """() => [...document.querySelectorAll('#transcript .turn')].map((li) => ({
            turn: Number(li.dataset.turn), speaker: Number(li.dataset.speaker),
            segments: [...li.querySelectorAll('.seg')].map((s) => s.textContent),
            unheard: li.querySelectorAll('.unheard').length,
            classes: li.className, info: li.querySelector('.info').textContent }))"""
    )


def start_long_turn(page: ShoalPage, submit: str = "Enter") -> None:
    """Type a long turn into the composer, send it with Enter, and wait until it is audibly playing."""
    page.page.fill("#text", LONG)
    page.page.press("#text", submit)
    page.wait_for("shoal.stats().playback === 'playing' && shoal.stats().playedMs > 300")


def test_two_speakers_take_turns_and_play_gaplessly_without_underruns(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    first = page.stats()
    assert first["engine"] == "espeak" and first["codec"] == "opus" and first["resumed"] is False
    assert page.page.locator("#speaker option").count() == 2  # two speakers to pick from
    lines = [(0, "Hello there. I am the first speaker."), (1, "And I am the second one. Nice to meet you!")]
    # both turns at once, as a chat client with a reply queued would: the second plays right after the first
    done = page.page.evaluate("(lines) => Promise.all(lines.map(([s, t]) => shoal.say(t, s)))", lines)
    assert [d["turn"] for d in done] == [0, 1]
    assert [d["reason"] for d in done] == ["complete", "complete"]
    page.wait_for("document.querySelector('#transcript .seg.playing') !== null")  # captions follow the audio
    page.wait_played_out()

    stats = page.stats()
    frames = sum(d["frames"] for d in done)
    assert stats["packetsDecoded"] > 0 and stats["packetsDecoded"] == stats["packetsReceived"] == frames
    assert stats["underruns"] == 0, "the buffer ran dry after its first fill"
    assert stats["playbackStarts"] == 1, "a gap between the two turns"
    assert stats["droppedMs"] == 0
    heard = sum(d["audio_ms"] for d in done)
    assert abs(stats["playedMs"] - heard) <= 20, (stats["playedMs"], heard)  # everything sent was played
    assert stats["turnsDone"] == 2 and stats["reason"] == "complete"
    assert stats["ttfaMs"] is not None and stats["ttfaMs"] > 0
    assert stats["clientTtfaMs"] is not None and stats["clientTtfaMs"] > 0
    assert 6 < stats["bitrateKbps"] < 64  # Opus at the server's 32 kbit/s, plus or minus framing

    turns = turns_in_transcript(page)
    assert [(t["turn"], t["speaker"]) for t in turns] == [(0, 0), (1, 1)]
    assert turns[0]["segments"] == ["Hello there.", "I am the first speaker."]
    assert turns[1]["segments"] == ["And I am the second one.", "Nice to meet you!"]
    assert page.page.locator("#transcript .seg.playing").count() == 0  # nothing highlighted once it is over
    assert page.page.inner_text("#st-packets") == str(frames)  # the panel shows the same numbers
    assert page.page.inner_text("#st-underruns") == "0"
    assert page.errors() == []


def test_stop_and_esc_cancel_and_the_server_reports_cancelled(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    start_long_turn(page)
    page.page.click("#stop")
    page.wait_for("shoal.stats().turnsDone === 1")
    stats = page.stats()
    assert stats["reason"] == "cancelled"  # turn.done from the server
    assert stats["bufferMs"] == 0 and stats["playback"] == "idle"
    played = stats["playedMs"]
    page.page.wait_for_timeout(600)
    assert page.stats()["playedMs"] == played, "audio went on after Stop"
    turn = turns_in_transcript(page)[0]
    assert "reason-cancelled" in turn["classes"] and "stopped at" in turn["info"]
    assert turn["unheard"] > 0  # the text that was never heard is marked
    report = stats["playbackReports"][-1]  # what the listener heard, for the server to cut the stored turn
    assert report["turn"] == 0 and abs(report["played_ms"] - played) < 50, (report, played)

    # Esc does the same, and the session goes on
    start_long_turn(page)
    page.page.keyboard.press("Escape")
    page.wait_for("shoal.stats().turnsDone === 2")
    assert page.stats()["reason"] == "cancelled"
    done = page.say("Still here.", 1)
    assert done["reason"] == "complete" and done["turn"] == 2
    page.wait_played_out()
    assert page.stats()["underruns"] == 0
    assert page.errors() == []


def test_stream_as_tokens_sends_word_by_word(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    page.page.check("#stream-tokens")
    page.page.fill("#text", "Tokens arrive one by one. The first sentence speaks before the rest is typed.")
    page.page.press("#text", "Enter")
    page.wait_for("shoal.stats().turnsDone === 1")
    assert page.stats()["reason"] == "complete"
    turn = turns_in_transcript(page)[0]
    assert turn["segments"] == ["Tokens arrive one by one.", "The first sentence speaks before the rest is typed."]
    page.wait_played_out()
    assert page.stats()["underruns"] == 0
    assert page.errors() == []


def test_reload_resumes_the_session_with_its_history(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    page.say("Remember this line.", 1)
    page.wait_played_out()
    session = page.stats()["session"]
    assert f"session={session}" in page.page.url

    page.page.reload()
    page.wait_connected()
    stats = page.stats()
    assert stats["session"] == session and stats["resumed"] is True and stats["turns"] == 1
    turns = turns_in_transcript(page)
    assert [(t["turn"], t["speaker"], t["segments"]) for t in turns] == [(0, 1, ["Remember this line."])]
    done = page.say("And the conversation goes on.", 0)
    assert done["turn"] == 1 and done["reason"] == "complete"
    page.wait_played_out()
    # another browser (nothing in local storage) still sees the conversation: session.ready carries its history
    page.page.evaluate("localStorage.clear()")
    page.page.reload()
    page.wait_connected()
    turns = turns_in_transcript(page)
    assert [(t["turn"], t["speaker"], t["segments"]) for t in turns] == [
        (0, 1, ["Remember this line."]),
        (1, 0, ["And the conversation goes on."]),
    ]
    assert page.errors() == []


def test_a_voice_recorded_from_the_microphone_is_registered_and_used(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    page.page.click("#voice-panel summary")
    note = page.page.locator("#cloning-note")
    assert note.is_visible() and "cannot clone" in note.inner_text()  # the built-in voice says so plainly
    page.page.click("#voice-record")
    page.wait_for("parseFloat(document.getElementById('voice-timer').textContent) >= 10.5")
    page.page.click("#voice-record")
    status = page.page.inner_text("#voice-status")
    assert status.startswith("recorded") and "very quiet" not in status, status  # the fake mic really spoke
    assert page.page.locator("#voice-preview").is_visible()
    page.page.fill("#voice-id", "fake-mic")
    page.page.click("#voice-register")
    page.wait_for("document.getElementById('voices').textContent.includes('fake-mic')")
    assert page.page.inner_text("#voice-status").startswith("Registered fake-mic")
    assert page.stats()["errors"] == []

    page.page.select_option('select[data-speaker="1"]', "fake-mic")  # session.update
    page.wait_for("document.querySelector('#speaker option[value=\"1\"]') !== null")
    done = page.say("Now I speak with my registered voice.", 1)
    assert done["reason"] == "complete"
    assert page.stats()["errors"] == []
    assert page.errors() == []


def test_speaking_into_the_microphone_barges_in(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    start_long_turn(page)
    page.page.check("#mic-bargein")  # the fake microphone is talking all the time
    page.wait_for("shoal.stats().turnsDone === 1")
    stats = page.stats()
    assert stats["reason"] == "cancelled" and stats["bargeIns"] == 1
    assert stats["bufferMs"] == 0
    page.page.uncheck("#mic-bargein")
    assert page.errors() == []


def test_pcm16_fallback_over_json_frames(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open("?codec=pcm16&wire=json")  # what a browser without WebCodecs gets, on text frames
    assert page.stats()["codec"] == "pcm16"
    done = page.say("No WebCodecs needed here.", 0)
    assert done["reason"] == "complete"
    page.wait_played_out()
    stats = page.stats()
    assert stats["packetsDecoded"] == done["frames"] > 0 and stats["underruns"] == 0
    assert abs(stats["playedMs"] - done["audio_ms"]) <= 20
    assert page.errors() == []


def test_server_errors_are_shown(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    # a voice id the server never saw: session.update is refused with an error the page shows
    page.page.evaluate(
        """() => { const s = document.querySelector('select[data-speaker="0"]');
                   s.append(new Option('ghost', 'ghost')); s.value = 'ghost'; s.dispatchEvent(new Event('change')); }"""
    )
    page.wait_for("shoal.stats().errors.length === 1")
    assert page.stats()["errors"][0]["code"] == "bad_message"
    banner = page.page.locator("#banner")
    assert banner.is_visible() and "ghost" in banner.inner_text() and "not registered" in banner.inner_text()
    assert page.stats()["connected"] is True  # not fatal: the session goes on
    assert page.page.input_value('select[data-speaker="0"]') == ""  # back to the voice the server has
    assert page.say("Fine.", 0)["reason"] == "complete"


def test_a_wrong_api_key_is_shown_and_not_retried(shoal_page: ShoalPage, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", "--api-key", "sesame")
    try:
        page = shoal_page
        page.page.goto(f"{server.http}/?token=wrong")
        page.wait_for("document.getElementById('conn').dataset.state === 'closed'")
        assert "unauthorized" in page.page.inner_text("#banner")
        page.page.wait_for_timeout(1500)
        assert page.page.locator("#conn").get_attribute("data-state") == "closed"  # no retry loop
        page.open("?token=sesame", server=server)
        assert page.say("Let me in.", 0)["reason"] == "complete"
    finally:
        server.stop()


def test_reconnects_after_the_server_restarts_and_resumes(shoal_page: ShoalPage, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    try:
        page = shoal_page
        page.open(server=server)
        page.say("Before the restart.", 0)
        session = page.stats()["session"]
        assert server.stop() == 0
        page.wait_for("document.getElementById('conn').dataset.state === 'reconnecting'")
        server = start_server(tmp_path / "data", "--port", str(server.port))
        page.wait_connected()  # back-off brings it back by itself
        stats = page.stats()
        assert stats["session"] == session and stats["resumed"] is True and stats["turns"] == 1
        assert page.say("After the restart.", 1)["turn"] == 1
        assert "shutting down" in page.page.text_content("#log")  # the server's going-away error was shown
    finally:
        server.stop(signal.SIGTERM)


@VIEWPORTS
def test_screenshot(browser: Any, web_server: Server, name: str, viewport: dict[str, int]) -> None:
    with sized_page(browser, web_server, name, viewport) as page:
        page.open()
        page.page.evaluate("shoal.say('Hi! [excited] Welcome to Shoal. Type a line and I will say it.', 0)")
        page.page.evaluate("shoal.say('[whisper] And I am the second voice. Press Escape to interrupt us.', 1)")
        page.wait_for("document.querySelectorAll('#transcript .seg.playing').length === 1")
        page.page.wait_for_timeout(300)
        screenshot(page, f"voice-chat-{name}.png")
        page.wait_played_out()
        assert page.errors() == []
