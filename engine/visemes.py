"""Phonemes (IPA, as espeak-ng names them) to mouth shapes: the 15 visemes of Oculus / Meta OVR lip sync.

One standard set, so a game engine's existing rig can take Shoal's ``visemes`` messages as they are. Ids and the
phonemes each one covers (README, "Word timing"):

    id  name  phonemes                         id  name  phonemes
    0   sil   silence, pauses                  8   nn    n l ɲ ɾ
    1   PP    p b m                            9   RR    r ɹ ɻ ʁ ʀ ɚ
    2   FF    f v                              10  aa    a ɑ æ ʌ ɐ (aɪ aʊ)
    3   TH    θ ð                              11  E     e ɛ ə ɜ ɘ (eɪ)
    4   DD    t d                              12  ih    i ɪ j y ɨ
    5   kk    k g ɡ ŋ h x ɣ ʔ q                13  oh    o ɔ ɒ ɵ ø œ (oʊ ɔɪ)
    6   CH    tʃ dʒ ʃ ʒ tɕ dʑ ɕ ʑ ç             14  ou    u ʊ w ɯ ʉ
    7   SS    s z ts dz

A diphthong takes the shape of its first vowel; stress (ˈ ˌ), length (ː ˑ) and diacritics are ignored. A phoneme
the table does not know keeps the mouth half open (``E``), never closed, so an unknown sound is not taken for a
pause.
"""

from __future__ import annotations

import unicodedata

__all__ = ["VISEMES", "viseme_of"]

VISEMES: tuple[str, ...] = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")

_PAIRS = {"tʃ": 6, "dʒ": 6, "tɕ": 6, "dʑ": 6, "ts": 7, "dz": 7}
_SINGLE: dict[str, int] = {}
for _id, _chars in (
    (1, "pbm"),
    (2, "fvɱ"),
    (3, "θð"),
    (4, "td"),
    (5, "kgɡŋhxɣʔqχɦ"),
    (6, "ʃʒɕʑç"),
    (7, "sz"),
    (8, "nlɲɾɫʎɭ"),
    (9, "rɹɻʁʀɚ"),
    (10, "aɑæʌɐ"),
    (11, "eɛəɜɘ"),
    (12, "iɪjyɨʏ"),
    (13, "oɔɒɵøœ"),
    (14, "uʊwɯʉ"),
):
    _SINGLE.update(dict.fromkeys(_chars, _id))
_IGNORED = set("ˈˌːˑ'.,-_|‿")


def viseme_of(phoneme: str) -> int:
    """The viseme id (index into ``VISEMES``) of one IPA phoneme; "" (a pause) is ``sil``."""
    sounds = "".join(c for c in unicodedata.normalize("NFD", phoneme)
                     if c not in _IGNORED and not unicodedata.combining(c))
    if not sounds:
        return 0
    pair = _PAIRS.get(sounds[:2])
    if pair is not None:
        return pair
    return _SINGLE.get(sounds[0], 11)
