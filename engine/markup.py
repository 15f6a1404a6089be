"""Request text markup: ``<|speaker:N|>`` tags and inline ``[bracket]`` instructions.

The text of a request is plain prose interleaved with two kinds of markup. A speaker tag switches the voice for
the text after it (text before the first tag belongs to the request's speaker). A bracket instruction
(``[whisper]``, ``[laughs]``) describes how the text after it is delivered; it is never spoken. Other
``<|...|>`` control tokens are dropped. What an instruction means is the engine's business: this module only
splits the text and says which instructions precede each piece.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

__all__ = ["Piece", "SpokenWord", "clean_text", "is_word", "plain_text", "split_markup", "spoken_words", "word_runs",
           "words_of"]

_TOKEN = re.compile(
    r"<\|speaker:(?P<speaker>\d{1,9})\|>"  # speaker tag
    r"|<\|[^|<>]*\|>"  # any other control token: dropped
    r"|\[(?P<instruction>[^\[\]]*)\]"  # bracket instruction: never spoken
)
_WHITESPACE = re.compile(r"\s+")
_RUN = re.compile(r"\S+")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


class Piece(NamedTuple):
    speaker: int
    instructions: tuple[str, ...]  # normalized (lower case, single spaces), oldest first, since the speaker's tag
    text: str  # cleaned; never empty


def clean_text(text: str) -> str:
    """Collapse whitespace, drop control characters and stray brackets; what is left is meant to be spoken."""
    kept = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text if c not in "[]")
    return _WHITESPACE.sub(" ", kept).strip()


def split_markup(text: str, speaker: int = 0) -> list[Piece]:
    """Split ``text`` into spoken pieces, each with its speaker and the instructions in force before it.

    Instructions accumulate until the next speaker tag (which resets them); pieces with nothing to say are
    dropped, but their instructions carry over to the next piece of the same speaker.
    """
    pieces: list[Piece] = []
    instructions: list[str] = []
    position = 0

    def emit(raw: str) -> None:
        spoken = clean_text(raw)
        if spoken:
            pieces.append(Piece(speaker, tuple(instructions), spoken))

    for match in _TOKEN.finditer(text):
        emit(text[position : match.start()])
        position = match.end()
        if match.group("speaker") is not None:
            speaker = int(match.group("speaker"))
            instructions = []
        elif match.group("instruction") is not None:
            name = _WHITESPACE.sub(" ", match.group("instruction")).strip().lower()
            if name:
                instructions.append(name)
    emit(text[position:])
    return pieces


def plain_text(text: str) -> str:
    """Only what would be spoken, all speakers joined."""
    return " ".join(piece.text for piece in split_markup(text))


class SpokenWord(NamedTuple):
    text: str  # the word as spoken (as in the clean text)
    start: int  # its span in the text as written, markup included
    end: int


def is_word(run: str) -> bool:
    """Does a whitespace-free run of text count as a word (it holds a letter or a digit)?"""
    return _LETTER_OR_DIGIT.search(run) is not None


def word_runs(text: str) -> list[tuple[int, int, bool]]:
    """Each whitespace-separated run of ``text``: its span, and whether it is a word (``is_word``)."""
    return [(run.start(), run.end(), is_word(run.group())) for run in _RUN.finditer(text)]


def words_of(spoken: str) -> list[str]:
    """The words of clean text: the whitespace-separated runs that hold a letter or a digit (punctuation stays
    attached: "there."; a lone dash is no word). Word timing counts these."""
    return [run for run in spoken.split() if is_word(run)]


def spoken_words(text: str) -> list[SpokenWord]:
    """The words of ``text`` as written (markup included): the same words, in the same order, as ``words_of`` of
    each piece of ``split_markup(text)``, each with where it is written, so a cut can keep the markup before it."""
    out: list[SpokenWord] = []
    position = 0
    for match in [*_TOKEN.finditer(text), None]:
        end = len(text) if match is None else match.start()
        region = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text[position:end])  # as clean_text
        for run in _RUN.finditer(region):
            word = run.group().replace("[", "").replace("]", "")
            if is_word(word):
                out.append(SpokenWord(word, position + run.start(), position + run.end()))
        if match is not None:
            position = match.end()
    return out
