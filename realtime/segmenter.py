"""Cut incremental text into synthesis segments: at sentence ends, on request, or at a length bound.

Pure and incremental: ``feed`` takes whatever arrived (whole lines or single LLM tokens) and returns the
segments completed by it, so the first sentence can be synthesized before the rest of the reply exists.
A sentence end is only known once the next character arrives ("3." may become "3.5"), so a trailing
terminator waits for more text, a ``flush`` or the end of the turn.
"""

from __future__ import annotations

import re

# terminator run, optional closing quotes/brackets, then whitespace
_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*(?=\s)|[。！？]+|\n+")
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "e.g.", "i.e.", "etc.", "prof.", "jr.", "sr."})
# spans that must never be split: <|speaker:N|> tags and [bracket] instructions
_PROTECTED = re.compile(r"<\|[^|>]{0,40}\|>|\[[^\]\n]{0,80}\]")
_SPEAKER_TAG = re.compile(r"<\|speaker:(\d{1,2})\|>")

DEFAULT_MAX_CHARS = 240


def last_speaker(text: str, default: int) -> int:
    """The speaker in effect after ``text``, given the speaker in effect before it."""
    tags = _SPEAKER_TAG.findall(text)
    return int(tags[-1]) if tags else default


class Segmenter:
    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        if max_chars < 16:
            raise ValueError("max_chars must be at least 16")
        self.max_chars = max_chars
        self._buf = ""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out: list[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                return out
            segment, self._buf = self._buf[:cut], self._buf[cut:]
            if segment.strip():
                out.append(segment.strip())

    def flush(self) -> str | None:
        segment, self._buf = self._buf.strip(), ""
        return segment or None

    def clear(self) -> None:
        self._buf = ""

    def _next_cut(self) -> int | None:
        buf = self._buf
        protected = [m.span() for m in _PROTECTED.finditer(buf)]
        for m in _SENTENCE_END.finditer(buf):
            end = m.end()
            if any(a < end < b for a, b in protected):
                continue
            if buf[m.start()] == "." and self._is_abbreviation(buf, m.start()):
                continue
            if not buf[:end].strip():
                continue
            return end
        if len(buf) <= self.max_chars:
            return None
        # length bound: the last space (or comma) before the bound that is not inside a protected span
        limit = self.max_chars
        for i in range(limit, limit // 2, -1):
            if buf[i - 1] in " ,;:\t" and not any(a < i < b for a, b in protected):
                return i
        for a, b in protected:  # never cut a tag in half: cut before it
            if a < limit < b:
                return a if a > 0 else b
        return limit

    @staticmethod
    def _is_abbreviation(buf: str, dot: int) -> bool:
        start = dot
        while start > 0 and not buf[start - 1].isspace():
            start -= 1
        word = buf[start : dot + 1].lower().lstrip("\"'(")
        return word in _ABBREVIATIONS
