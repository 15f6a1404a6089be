"""The context budget: which earlier turns a prompt keeps, dropped oldest first in large steps.

A prompt is system + voices + history + new text, stable parts first, so each turn's prompt extends the last one
and the prefix cache reuses it. When the history outgrows ``budget`` positions, the oldest turns go — not one per
turn (that would change the prompt right after the system message every turn and nothing would match), but in
one large step: down to at most half the budget. Until the history outgrows the budget again, every turn keeps the
same first turn, so prompts keep extending each other and the cache keeps matching through all of them.

The rule is a pure function of the history, so any worker given the same history (failover, a rebuilt session)
drops the same turns: scan the turns oldest first, keeping a window [start, i]; whenever turn i makes the window
longer than ``budget``, move ``start`` forward until the window is at most ``budget // 2``. The turns before
``start`` are dropped. Since the scan of history + [turn] begins with the scan of history, consecutive turns agree
on ``start`` except at a drop.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.base import PastTurn
from engine.dualar.prompt import PromptBuilder

__all__ = ["history_start", "trim_history", "turn_positions"]


def history_start(lengths: Sequence[int], budget: int) -> int:
    """Index of the first turn kept, given each turn's prompt positions (oldest first) and the budget."""
    if budget < 1:
        raise ValueError("budget must be at least 1 position")
    start, window = 0, 0
    for i, length in enumerate(lengths):
        window += length
        if window > budget:
            while start <= i and window > budget // 2:
                window -= lengths[start]
                start += 1
    return start


def turn_positions(prompts: PromptBuilder, turn: PastTurn) -> int:
    """Positions a past turn takes in a prompt: its user message and its assistant audio (0 without codes)."""
    if turn.codes is None:
        return 0
    return prompts.user(turn.text, turn.speaker).shape[1] + prompts.assistant(turn.codes).shape[1]


def trim_history(prompts: PromptBuilder, history: Sequence[PastTurn], budget: int) -> Sequence[PastTurn]:
    """``history`` without the turns the budget drops (see the module docstring)."""
    return history[history_start([turn_positions(prompts, t) for t in history], budget) :]
