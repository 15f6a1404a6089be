"""Splitting request text into spoken pieces: speaker tags, bracket instructions, control tokens."""

from __future__ import annotations

from engine.markup import Piece, clean_text, plain_text, split_markup


def test_plain_text_is_one_piece_of_the_request_speaker() -> None:
    assert split_markup("  Hello,\n  world! ", speaker=3) == [Piece(3, (), "Hello, world!")]


def test_speaker_tags_switch_speakers_and_reset_instructions() -> None:
    pieces = split_markup("[sad] one <|speaker:1|>two<|speaker:0|> three", speaker=2)
    assert pieces == [Piece(2, ("sad",), "one"), Piece(1, (), "two"), Piece(0, (), "three")]


def test_instructions_are_never_text_and_carry_over_empty_pieces() -> None:
    pieces = split_markup("[Whisper]   [ very  Softly ] quiet [laughs]! loud")
    assert pieces == [Piece(0, ("whisper", "very softly"), "quiet"), Piece(0, ("whisper", "very softly", "laughs"), "! loud")]
    assert plain_text("a [b] c [[d]] e] [f") == "a c e f"


def test_other_control_tokens_and_control_characters_are_dropped() -> None:
    assert plain_text("a<|im_end|>b <|speaker:x|>c\x00d\u200be") == "a b c d e"  # a token separates words
    assert clean_text("tab\there\r\nnew line") == "tab here new line"


def test_nothing_to_say() -> None:
    assert split_markup("") == []
    assert split_markup("  [whisper] <|speaker:4|> [] \n") == []
