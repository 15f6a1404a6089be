"""What the simulated sessions say: deterministic conversation plans from a seed.

A turn is a few sentences from a fixed corpus, cut into LLM-like tokens (a word with its leading space), sent
at ``tokens_per_s``. Turns alternate between speakers 0 and 1; some turns hand over to the other speaker after
their first sentence (an in-turn speaker change). Some turns are interrupted: the plan says after how much
heard audio the listener barges in. Everything is a pure function of (seed, session index, turn index).

With ``contexts`` > 1 a session is a scene of several characters talking at once: context ``c`` has its own
script (a pure function of seed, session, context and turn index), always spoken by its own speaker ``c``
(modulo the 16 speakers a session declares), without in-turn speaker changes; barge-ins apply per context.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from loadtest.config import SwarmConfig, context_id

SPEAKERS = 16  # speakers a session declares at most (realtime.protocol.MAX_SPEAKERS)

CORPUS: tuple[str, ...] = (
    "Welcome back to the harbour, traveller.",
    "The tide comes in twice a day, and the boats go out with it.",
    "Have you seen the lighthouse keeper this morning?",
    "I think the storm will pass before the evening.",
    "Our nets were full yesterday, but today the sea is quiet.",
    "You will find the market at the end of this street.",
    "Bring me three silver fish and I will tell you a secret.",
    "The old map shows a cave behind the waterfall.",
    "Nobody has opened that door in forty years.",
    "Careful on the rocks, they are slippery after the rain.",
    "My grandmother used to sing this song to the gulls.",
    "Do you hear the bell? The ferry is leaving soon.",
    "We could take the long road around the hill.",
    "It is colder up north than most people expect.",
    "The captain wants a word with you before we sail.",
    "Here is your room key, and breakfast is at seven.",
    "I am sorry, the last boat left an hour ago.",
    "That is the strangest thing I have heard all week!",
    "Tell me again how you crossed the frozen lake.",
    "If the wind turns, we will be home by midnight.",
    "The library keeps the ship logs in the cellar.",
    "Yes, I remember you, you bought the blue lantern.",
    "There are two ways into the castle, and both are guarded.",
    "Put the crate down gently, it is full of glass.",
    "Why would anyone build a tower on a sandbank?",
    "The fog is so thick I can barely see my hands.",
    "Thank you for the help, I owe you a dinner.",
    "Listen closely, because I will only say this once.",
    "The soup is hot, the bread is fresh, and the fire is warm.",
    "Someone left a letter for you at the front desk.",
    "Our ship needs a new sail before the next voyage.",
    "Follow the gulls and you will find the fishing grounds.",
)

_TOKEN = re.compile(r"\s*\S+")


def tokenize(text: str) -> list[str]:
    """LLM-like tokens: each word with its leading whitespace. ``"".join(tokenize(t)) == t`` for stripped t."""
    return _TOKEN.findall(text)


@dataclass(frozen=True)
class Piece:
    """Consecutive tokens of one turn spoken by one speaker."""

    speaker: int
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class TurnPlan:
    index: int  # the turn's index in its context (in the session with one context)
    speaker: int  # the turn's speaker
    pieces: tuple[Piece, ...]
    barge_after_ms: float | None  # cancel once this much audio was heard (None: let it finish)
    think_s: float  # pause after the turn was heard
    context: str | None = None  # the wire id of its context (None: the default context)

    @property
    def text(self) -> str:
        """All the text the client sends, without speaker tags."""
        return "".join(t for p in self.pieces for t in p.tokens)

    @property
    def tokens(self) -> list[tuple[int, str]]:
        return [(p.speaker, t) for p in self.pieces for t in p.tokens]


def context_speaker(context: int) -> int:
    """The speaker of a session's context ``context`` (with more than one context)."""
    return context % SPEAKERS


def session_speakers(config: SwarmConfig) -> int:
    """How many speakers (0..n-1) a session declares."""
    return 2 if config.contexts == 1 else min(SPEAKERS, max(2, config.contexts))


def turn_plan(config: SwarmConfig, session: int, index: int, context: int = 0) -> TurnPlan:
    """The plan of turn ``index`` of context ``context`` of session ``session`` (deterministic)."""
    if not 0 <= context < config.contexts:
        raise ValueError(f"context {context} out of range: the sessions have {config.contexts}")
    if config.contexts == 1:  # exactly the plans of before contexts existed
        rng = random.Random(f"{config.seed}:{session}:{index}")
        speaker = (session + index) % 2
        wire_id = None
    else:
        rng = random.Random(f"{config.seed}:{session}:c{context}:{index}")
        speaker = context_speaker(context)
        wire_id = context_id(context)
    lo, hi = config.sentences
    sentences = [rng.choice(CORPUS) for _ in range(rng.randint(lo, hi))]
    change = len(sentences) > 1 and rng.random() < config.speaker_change and wire_id is None
    first = " ".join(sentences[:1])
    rest = "".join(" " + s for s in sentences[1:])
    pieces = [Piece(speaker, tuple(tokenize(first)))]
    if rest:
        pieces.append(Piece(1 - speaker if change else speaker, tuple(tokenize(rest))))
    barge = rng.uniform(300.0, 2000.0) if rng.random() < config.barge_in else None
    think = rng.uniform(*config.think_s)
    return TurnPlan(
        index=index, speaker=speaker, pieces=tuple(pieces), barge_after_ms=barge, think_s=think, context=wire_id
    )
