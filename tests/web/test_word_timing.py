"""Word timing on the voice chat page (output.timestamps "visemes", the page's default) in real headless Chromium
against a real `shoal serve` with the built-in voice, whose word timing is exact.

What a user sees: the live caption highlights the word being heard, on the player's clock, and moves on while the
audio plays; the mouth beside it changes shape with the visemes; Stop freezes the caption on the word where the
voice was cut, and the transcript keeps the words heard (start_ms before the played_ms reported), the rest struck.
Everything is sampled in the page every 20 ms and asserted on afterwards, with generous waits (2 shared cores).
"""

from __future__ import annotations

import time
from typing import Any

from tests.web.conftest import ShoalPage
from tests.web.test_voice_chat import LONG

TEXT = "Hello there, this caption follows every word I say. The mouth moves with it, shape after shape."

# Every 20 ms: the live caption's state and highlighted word, and the mouth's shape, with the player's position.
RECORDER = """() => {
  window.__timing = [];
  window.__timingTimer = setInterval(() => {
    const cap = document.getElementById('caption');
    const lane = shoal.stats().contexts[''];
    window.__timing.push({ state: cap.dataset.state, segment: Number(cap.dataset.segment),
      word: Number(cap.dataset.word), now: cap.querySelector('.w.now')?.textContent ?? null,
      shape: document.getElementById('mouth').dataset.shape, playing: lane?.playback === 'playing' });
  }, 20);
}"""

CAPTION = """() => { const c = document.getElementById('caption');
  return { state: c.dataset.state, segment: c.dataset.segment, word: c.dataset.word, html: c.innerHTML,
           now: c.querySelector('.w.now')?.textContent ?? null, start: Number(c.querySelector('.w.now')?.dataset.start) }; }"""

# The words of one transcript turn: text, start_ms and whether they are marked unheard.
WORDS = """(turn) => [...document.querySelectorAll(`#transcript .turn[data-turn="${turn}"] .w`)].map((w) =>
  ({ text: w.textContent, start: Number(w.dataset.start), unheard: w.classList.contains('unheard') }))"""


def spoken_words(text: str) -> list[str]:
    """The words of a text as the protocol counts them: whitespace-separated runs with a letter or a digit."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def recorded(page: ShoalPage) -> list[dict[str, Any]]:
    return page.page.evaluate("clearInterval(window.__timingTimer), window.__timing")  # type: ignore[no-any-return]


def test_the_caption_follows_the_words_and_the_mouth_the_visemes(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    stats = page.stats()
    assert stats["timestamps"] == "visemes" and stats["timing"] == "exact"  # espeak reports its own timing
    assert page.page.locator("#caption").get_attribute("data-state") == "idle"
    page.page.evaluate(RECORDER)
    done = page.say(TEXT, 1)
    assert done["reason"] == "complete"
    page.wait_played_out()
    page.wait_for("document.getElementById('caption').dataset.state === 'done'")
    samples = recorded(page)

    stats = page.stats()
    assert stats["wordsMessages"] == stats["visemesMessages"] == 2  # one of each per segment
    words = page.page.evaluate(WORDS, 0)
    assert [w["text"] for w in words] == spoken_words(TEXT)
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:])), words
    assert not any(w["unheard"] for w in words)

    # while audio played the highlighted word moved forward through both segments, never back
    live = [(s["segment"], s["word"]) for s in samples if s["state"] == "live" and s["word"] >= 0]
    steps = [p for i, p in enumerate(live) if i == 0 or p != live[i - 1]]
    assert steps == sorted(steps), steps
    assert len(steps) >= len(words) // 2, (steps, len(words))  # most words were seen highlighted (20 ms sampling)
    assert {seg for seg, _ in steps} == {0, 1}
    # the mouth changed shape while it played, and closed once it was over
    shapes = [s["shape"] for s in samples if s["playing"]]
    changes = sum(a != b for a, b in zip(shapes, shapes[1:]))
    assert changes >= 8 and len(set(shapes)) >= 4, (changes, set(shapes))
    assert page.page.locator("#mouth").get_attribute("data-shape") == "closed"
    assert page.errors() == []


def test_stop_freezes_the_caption_and_the_transcript_keeps_the_words_heard(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open()
    page.page.fill("#text", LONG)
    page.page.press("#text", "Enter")
    page.wait_for("document.getElementById('caption').dataset.state === 'live' && "
                  "Number(document.getElementById('caption').dataset.word) >= 4")
    page.page.click("#stop")
    page.wait_for("shoal.stats().turnsDone === 1 && shoal.stats().playbackReports.length === 1 && "
                  "document.getElementById('caption').dataset.state === 'cut'")
    played = page.stats()["playbackReports"][0]["played_ms"]
    frozen = page.page.evaluate(CAPTION)
    assert frozen["state"] == "cut" and frozen["now"], frozen
    assert frozen["start"] < played, (frozen, played)  # the word it froze on was heard
    page.page.wait_for_timeout(1000)
    assert page.page.evaluate(CAPTION) == frozen, "the caption moved after Stop"

    words = page.page.evaluate(WORDS, 0)
    heard = [w for w in words if not w["unheard"]]
    assert heard and len(heard) < len(words), words
    assert all(w["start"] < played for w in heard) and all(w["start"] >= played for w in words if w["unheard"])
    assert heard[-1]["text"] == frozen["now"] and heard[-1]["start"] == frozen["start"]
    heard_text = [w["text"] for w in heard]
    assert heard_text == spoken_words(LONG)[: len(heard)]

    # the server stored the turn cut at the same word: another browser (nothing in localStorage) sees that text
    deadline = time.monotonic() + 30
    while True:
        page.page.evaluate("localStorage.clear()")
        page.page.reload()
        page.wait_connected()
        stored = page.page.evaluate("document.querySelector('#transcript .turn[data-turn=\"0\"] .text')?.textContent ?? ''")
        if spoken_words(stored) == heard_text or time.monotonic() > deadline:
            break
        page.page.wait_for_timeout(500)
    assert spoken_words(stored) == heard_text, (stored, heard_text)
    assert page.errors() == []


def test_without_timestamps_the_caption_shows_whole_segments(shoal_page: ShoalPage) -> None:
    page = shoal_page
    page.open("?timestamps=none")
    assert page.stats()["timestamps"] == "none"
    assert page.page.inner_text("#st-timing") == "—"
    page.say("Just the segments. No word timing here.", 0)
    page.wait_played_out()
    stats = page.stats()
    assert stats["wordsMessages"] == 0 and stats["visemesMessages"] == 0
    assert page.page.locator("#transcript .w").count() == 0
    caption = page.page.locator("#caption")
    assert caption.get_attribute("data-state") == "done" and caption.inner_text() == "No word timing here."
    assert page.page.locator("#mouth").get_attribute("data-shape") == "closed"
    assert page.errors() == []


def test_timed_words_keep_the_segments_markup_as_chips(shoal_page: ShoalPage) -> None:
    """A segment's words are found in its markup (tags and instructions shown as chips, as without word timing); a
    markup that does not split into the server's words falls back to the words themselves."""
    page = shoal_page
    page.open()
    shown = page.page.evaluate(
        """async () => {
            const { renderSegment } = await import('/transcript.js');
            const w = (...texts) => texts.map((text, i) => ({ text, start_ms: 100 * i, end_ms: 100 * i + 90 }));
            const show = (seg) => {
                const el = document.createElement('span');
                const spans = renderSegment(el, seg);
                return { text: el.textContent, words: spans.map((s) => [s.textContent, Number(s.dataset.start)]),
                         chips: el.querySelectorAll('.chip').length };
            };
            return [
                show({ text: '¿Qué tal? Fine.', markup: '[whisper] ¿Qué tal? — <|speaker:1|>Fine.', words: w('¿Qué', 'tal?', 'Fine.') }),
                show({ text: 'one two', markup: 'one  two three', words: w('one', 'two') }),
                show({ text: 'No timing.', markup: null, words: null }),
            ];
        }"""
    )
    assert shown[0] == {"text": "[whisper] ¿Qué tal? — → speaker 1Fine.", "chips": 2,
                        "words": [["¿Qué", 0], ["tal?", 100], ["Fine.", 200]]}
    assert shown[1] == {"text": "one two", "chips": 0, "words": [["one", 0], ["two", 100]]}
    assert shown[2] == {"text": "No timing.", "chips": 0, "words": []}
