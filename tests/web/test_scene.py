"""Scene mode of the voice chat page (web/): two characters speaking at once, each in its own context, against a
real `shoal serve --engine stub` (the stub is a test instrument: deterministic tones paced like a GPU, so both
contexts' audio really interleaves on the socket) in real headless Chromium.

Each context has its own Opus decoder and its own jitter buffer in the AudioWorklet, which sums them: the numbers
asserted are per context (packets decoded = frames the server sent for it, no underruns), the worklet's `mixedMs`
(time two contexts were audible at once), and the caption lines a user sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.realtime.conftest import Server, start_server
from tests.web.conftest import VIEWPORTS, ShoalPage, screenshot, sized_page

CHARS = ("char-0", "char-1")

# Records, every 20 ms, what each caption line shows while it is live (the segment being heard), and whether both
# contexts had audio queued in their own jitter buffers at the same moment.
RECORDER = """() => {
  window.__scene = { captions: [], bothBuffered: 0 };
  window.__sceneTimer = setInterval(() => {
    const t = performance.now();
    for (const li of document.querySelectorAll('#cast .character')) {
      const cap = li.querySelector('.caption');
      window.__scene.captions.push({ t, context: li.dataset.context, state: cap.dataset.state, text: cap.textContent });
    }
    const c = shoal.stats().contexts;
    if (c['char-0']?.bufferMs > 0 && c['char-1']?.bufferMs > 0) window.__scene.bothBuffered += 1;
  }, 20);
}"""


@pytest.fixture(scope="module")
def stub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("web-stub"), "--engine", "stub", "--stub-ttft-ms", "20")
    yield srv
    srv.stop()


def open_scene(page: ShoalPage, server: Server) -> None:
    page.open("?mode=scene", server=server)
    assert page.page.locator("#scene").is_visible() and not page.page.locator("#composer").is_visible()
    assert page.page.locator("#cast .character").count() == 2


def set_line(page: ShoalPage, index: int, text: str) -> None:
    page.page.locator("#cast .character .text").nth(index).fill(text)


def live_spans(captions: list[dict[str, Any]], context: str) -> tuple[float, float, set[str]]:
    """First and last moment the caption of `context` was live, and the texts it showed meanwhile."""
    live = [c for c in captions if c["context"] == context and c["state"] == "live" and c["text"] not in ("", "…")]
    assert live, f"the caption of {context} never showed a segment being heard"
    return live[0]["t"], live[-1]["t"], {c["text"] for c in live}


def test_two_characters_speak_at_once_mixed_with_a_caption_each(shoal_page: ShoalPage, stub_server: Server) -> None:
    page = shoal_page
    open_scene(page, stub_server)
    lines = [
        "Halt! Who goes there? Stand where you are. Keep your hands where I can see them.",
        "Only a traveller, friend. I am looking for the harbour road. Nothing more, I promise.",
    ]
    for i, text in enumerate(lines):
        set_line(page, i, text)
    page.page.evaluate(RECORDER)
    page.page.click("#play-scene")  # both lines at once, each in its own context
    page.wait_for("shoal.stats().contexts['char-0']?.done && shoal.stats().contexts['char-1']?.done")
    page.wait_played_out()
    page.page.evaluate("clearInterval(window.__sceneTimer)")
    scene = page.page.evaluate("window.__scene")
    stats = page.stats()

    done = {ctx: stats["contexts"][ctx]["done"] for ctx in CHARS}
    assert {d["reason"] for d in done.values()} == {"complete"}
    assert sorted(d["turn"] for d in done.values()) == [0, 1]
    for ctx in CHARS:
        c = stats["contexts"][ctx]
        assert c["packetsDecoded"] == c["packetsReceived"] == done[ctx]["frames"] > 0, (ctx, c, done[ctx])
        assert c["underruns"] == 0 and c["droppedMs"] == 0 and c["playbackStarts"] == 1, (ctx, c)
        assert abs(c["playedMs"] - done[ctx]["audio_ms"]) <= 20, (ctx, c["playedMs"], done[ctx]["audio_ms"])
    assert stats["underruns"] == 0
    # really mixed: both jitter buffers held audio at the same moment, and the worklet summed two lanes for most of
    # the shorter line
    shorter = min(d["audio_ms"] for d in done.values())
    assert scene["bothBuffered"] > 5, scene["bothBuffered"]
    assert stats["mixedMs"] > 0.6 * shorter, (stats["mixedMs"], shorter)

    # each caption line showed its own character's segments while it played, and the two were live at once
    turns = page.page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#transcript .turn')].map((li) =>
             [li.dataset.context, [...li.querySelectorAll('.seg')].map((s) => s.textContent)]))"""
    )
    spans = {ctx: live_spans(scene["captions"], ctx) for ctx in CHARS}
    for ctx in CHARS:
        assert spans[ctx][2] <= set(turns[ctx]) and len(spans[ctx][2]) >= 2, (ctx, spans[ctx][2], turns[ctx])
    (a0, a1, _), (b0, b1, _) = spans["char-0"], spans["char-1"]
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.5 * min(a1 - a0, b1 - b0), ("captions did not overlap in time", spans)
    assert turns["char-0"][0].startswith("Halt!") and turns["char-1"][0].startswith("Only a traveller")

    # once over, each caption keeps its last line; the stats panel lists both contexts
    captions = page.page.evaluate(
        "[...document.querySelectorAll('#cast .caption')].map((c) => [c.dataset.state, c.textContent])"
    )
    assert captions == [["done", turns["char-0"][-1]], ["done", turns["char-1"][-1]]]
    table = page.page.inner_text("#st-contexts")
    assert "char-0" in table and "char-1" in table
    assert page.page.inner_text("#st-mixed").endswith(" s")
    assert page.errors() == []


def test_stopping_one_character_cuts_only_that_one(shoal_page: ShoalPage, stub_server: Server) -> None:
    page = shoal_page
    open_scene(page, stub_server)
    set_line(page, 0, " ".join(["I keep talking and talking, so that there is plenty to interrupt."] * 3))
    set_line(page, 1, "Meanwhile I say my piece. It is not short, but it ends. And then I am done.")
    page.page.click("#play-scene")
    page.wait_for(
        "(() => { const c = shoal.stats().contexts; return c['char-0']?.playback === 'playing' && "
        "c['char-0'].playedMs > 600 && c['char-1']?.playback === 'playing'; })()"
    )
    page.page.locator("#cast .character").nth(0).locator(".stop-btn").click()  # barge-in on character 1 only
    page.wait_for("shoal.stats().contexts['char-0']?.done?.reason === 'cancelled'")
    stats = page.stats()
    heard = stats["contexts"]["char-0"]["playedMs"]
    assert stats["contexts"]["char-0"]["bufferMs"] == 0 and stats["contexts"]["char-0"]["playback"] == "idle"
    report = stats["playbackReports"][-1]  # what character 1's listener heard, reported before the cancel
    assert report["context"] == "char-0" and report["turn"] == stats["contexts"]["char-0"]["turn"]
    assert abs(report["played_ms"] - heard) < 50, (report, heard)
    assert stats["contexts"]["char-1"]["done"] is None  # the other one goes on
    cut = page.page.locator("#cast .character").nth(0).locator(".caption")
    assert cut.get_attribute("data-state") == "cut" and cut.inner_text() not in ("", "…")
    struck = "(els) => els.map((e) => getComputedStyle(e).textDecorationLine.includes('line-through'))"
    if cut.locator(".w").count():  # word timing: frozen on the word where it was cut, the words after it struck
        assert cut.locator(".w.now").count() <= 1 and all(cut.locator(".w.unheard").evaluate_all(struck))
        assert not any(cut.locator(".w:not(.unheard)").evaluate_all(struck))
    else:
        assert cut.locator(".line").evaluate_all(struck) == [True]

    page.wait_for("shoal.stats().contexts['char-1']?.done !== null && shoal.stats().contexts['char-1']?.done !== undefined")
    page.wait_played_out()
    stats = page.stats()
    other = stats["contexts"]["char-1"]
    assert other["done"]["reason"] == "complete"
    assert other["packetsDecoded"] == other["done"]["frames"] and other["underruns"] == 0
    assert abs(other["playedMs"] - other["done"]["audio_ms"]) <= 20
    assert stats["contexts"]["char-0"]["playedMs"] == heard, "character 1 went on after its Stop"
    assert page.page.locator("#cast .character").nth(1).locator(".caption").get_attribute("data-state") == "done"
    transcript = page.page.locator('#transcript .turn[data-context="char-0"]')
    assert "reason-cancelled" in (transcript.get_attribute("class") or "") and transcript.locator(".unheard").count() > 0

    # Esc still stops every character at once, and the scene goes on afterwards
    page.page.click("#play-scene")
    page.wait_for(
        "(() => { const c = shoal.stats().contexts; return c['char-0'].playback === 'playing' && "
        "c['char-1'].playback === 'playing' && c['char-1'].turn >= 2; })()"
    )
    page.page.keyboard.press("Escape")
    page.wait_for("shoal.stats().turnsDone === 4")
    stats = page.stats()
    assert {stats["contexts"][ctx]["done"]["reason"] for ctx in CHARS} == {"cancelled"}
    assert stats["bufferMs"] == 0 and stats["playback"] == "idle"
    assert page.page.evaluate("[...document.querySelectorAll('#cast .caption')].map((c) => c.dataset.state)") == [
        "cut", "cut"]
    done = page.page.evaluate("shoal.scene.say(1)")
    assert done["reason"] == "complete"
    page.wait_played_out()
    assert page.stats()["contexts"]["char-1"]["underruns"] == 0
    assert page.errors() == []


@VIEWPORTS
def test_scene_screenshot(browser: Any, web_server: Server, name: str, viewport: dict[str, int]) -> None:
    """Scene mode with the built-in voice: two characters talking over each other, one of them stopped."""
    with sized_page(browser, web_server, name, viewport) as page:
        page.open("?mode=scene")
        page.page.click("#play-scene")
        page.wait_for(
            "(() => { const c = shoal.stats().contexts; return c['char-0']?.playback === 'playing' && "
            "c['char-1']?.playback === 'playing' && c['char-0'].playedMs > 1500; })()"
        )
        page.page.locator("#cast .character").nth(1).locator(".stop-btn").click()
        page.wait_for("document.querySelectorAll('#cast .caption[data-state=\"cut\"]').length === 1")
        page.wait_for("document.querySelector('#cast .caption[data-state=\"live\"]') !== null")
        page.page.wait_for_timeout(250)
        screenshot(page, f"scene-{name}.png")
        page.wait_played_out()
        assert page.errors() == []
