"""The prefix cache: the radix tree's contract on toy values, then cached == uncached on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.base import PastTurn, Sampling, VoiceRef
from engine.dualar.loader import load_model
from engine.dualar.model import DualAR
from engine.dualar.prefix_cache import RadixCache
from engine.dualar.prompt import PromptBuilder
from engine.dualar.scheduler import FinishReason, Scheduler, SchedulerConfig, Sequence
from tests.engine.dualar import MODEL_DIR

W = 11  # key width: token id + 10 codes
BYTES_PER_POSITION = 4 * 4  # toy values: (4, n) float32


def key(*tokens: int) -> torch.Tensor:
    """A (W, T) prompt-shaped key; a token t >= 100 is an audio position with every code = t."""
    out = torch.zeros(W, len(tokens), dtype=torch.long)
    out[0] = torch.tensor(tokens)
    for i, t in enumerate(tokens):
        if t >= 100:
            out[1:, i] = t
    return out


class Reader:
    """Values of position p = p + 1000 * tag; records which positions the cache asked for."""

    def __init__(self, tag: int = 0) -> None:
        self.tag, self.calls = tag, []

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.calls.append((start, end))
        return (torch.arange(start, end, dtype=torch.float32) + 1000 * self.tag).expand(4, -1).clone()


def joined(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values, dim=1)[0] if values else torch.zeros(0)


def cache(capacity: int = 1 << 20) -> RadixCache:
    return RadixCache(capacity, position_dim=1)


def test_match_finds_the_longest_stored_prefix_and_its_values() -> None:
    c = cache()
    assert c.match_prefix(key(1, 2, 3)).length == 0
    reader = Reader()
    assert c.insert_prefix(key(1, 2, 3, 4, 5), reader) == (5, 5)
    assert reader.calls == [(0, 5)]
    m = c.match_prefix(key(1, 2, 3, 9))
    assert m.length == 3 and joined(m.values).tolist() == [0, 1, 2]
    m = c.match_prefix(key(1, 2, 3, 4, 5, 6, 7))
    assert m.length == 5 and joined(m.values).tolist() == [0, 1, 2, 3, 4]
    assert c.match_prefix(key(2, 2)).length == 0


def test_insert_reads_only_new_positions_and_splits_where_keys_diverge() -> None:
    c = cache()
    c.insert_prefix(key(1, 2, 3, 4), Reader(0))
    other = Reader(1)
    assert c.insert_prefix(key(1, 2, 7, 8, 9), other) == (5, 3)
    assert other.calls == [(2, 5)]  # positions 0, 1 were stored already
    assert joined(c.match_prefix(key(1, 2, 3, 4)).values).tolist() == [0, 1, 2, 3]
    assert joined(c.match_prefix(key(1, 2, 7, 8, 9)).values).tolist() == [0, 1, 1002, 1003, 1004]
    again = Reader(2)
    assert c.insert_prefix(key(1, 2, 3), again) == (3, 0) and again.calls == []
    s = c.stats()
    assert s.tokens_held == 7 and s.bytes_held == 7 * BYTES_PER_POSITION and s.nodes == 3


def test_an_audio_position_matches_only_when_all_ten_codes_agree() -> None:
    c = cache()
    stored = key(1, 2, 150, 151, 152, 3)
    c.insert_prefix(stored, Reader())
    changed = stored.clone()
    changed[7, 3] = 5  # one residual code (level 6) of the frame at position 3
    assert changed[0].tolist() == stored[0].tolist()  # same token ids: same semantic tokens
    assert c.match_prefix(changed).length == 3
    changed = stored.clone()
    changed[1, 4] += 1  # the semantic code alone, token id left as is
    assert c.match_prefix(changed).length == 4
    assert c.match_prefix(stored).length == 6


def test_stats_count_hits_misses_and_positions_reused() -> None:
    c = cache()
    c.match_prefix(key(1, 2))  # miss
    c.insert_prefix(key(1, 2, 3), Reader())
    c.match_prefix(key(1, 2, 3, 4))  # hit, 3
    c.match_prefix(key(1, 5))  # hit, 1
    c.match_prefix(key(9))  # miss
    s = c.stats()
    assert (s.hits, s.misses, s.tokens_reused) == (2, 2, 4)
    assert (s.tokens_held, s.bytes_held, s.evicted_bytes) == (3, 3 * BYTES_PER_POSITION, 0)


def test_eviction_under_a_small_bound_drops_the_least_recently_used_first() -> None:
    c = cache(capacity=10 * BYTES_PER_POSITION)
    c.insert_prefix(key(1, 1, 1, 1), Reader())  # A
    c.insert_prefix(key(2, 2, 2, 2), Reader())  # B
    c.match_prefix(key(1, 1))  # A is now more recent than B
    assert c.insert_prefix(key(3, 3, 3, 3), Reader()) == (4, 4)  # C needs room: B goes
    assert c.match_prefix(key(2, 2, 2, 2)).length == 0
    assert c.match_prefix(key(1, 1, 1, 1)).length == 4 and c.match_prefix(key(3, 3, 3, 3)).length == 4
    s = c.stats()
    assert s.bytes_held == 8 * BYTES_PER_POSITION <= c.capacity_bytes
    assert s.evicted_bytes == 4 * BYTES_PER_POSITION


def test_eviction_drops_leaves_then_parents_left_childless() -> None:
    c = cache()
    c.insert_prefix(key(1, 2, 3), Reader())
    c.insert_prefix(key(1, 2, 4), Reader())  # root - [1 2] - {[3], [4]}
    assert c.evict(1) == BYTES_PER_POSITION  # one leaf is enough
    assert c.evict(1 << 20) == 3 * BYTES_PER_POSITION
    assert c.stats() == (0, 0, 0, 0, 0, 4 * BYTES_PER_POSITION, 0)


def test_locked_entries_are_never_evicted_and_inserts_shrink_to_fit() -> None:
    c = cache(capacity=6 * BYTES_PER_POSITION)
    c.insert_prefix(key(1, 1, 1, 1), Reader())
    m = c.match_prefix(key(1, 1, 1, 1))
    c.lock(m.node)
    assert c.evict(1 << 20) == 0
    assert c.insert_prefix(key(2, 2, 2, 2), Reader()) == (2, 2)  # only 2 positions fit beside the locked 4
    assert c.match_prefix(key(1, 1, 1, 1)).length == 4
    c.unlock(m.node)
    assert c.insert_prefix(key(3, 3, 3, 3), Reader()) == (4, 4)
    assert c.stats().bytes_held <= c.capacity_bytes
    with pytest.raises(RuntimeError):
        c.unlock(m.node)


def test_a_lock_holds_its_whole_path_after_the_node_is_split() -> None:
    c = cache()
    c.insert_prefix(key(1, 2, 3, 4), Reader())
    handle = c.match_prefix(key(1, 2, 3, 4)).node
    c.lock(handle)
    c.insert_prefix(key(1, 2, 9), Reader(1))  # splits the locked run after 2 positions
    c.evict(1 << 20)  # only the new [9] leaf can go
    m = c.match_prefix(key(1, 2, 3, 4))
    assert m.length == 4 and joined(m.values).tolist() == [0, 1, 2, 3]
    assert c.match_prefix(key(1, 2, 9)).length == 2
    c.unlock(handle)
    c.evict(1 << 20)
    assert c.stats().tokens_held == 0


def test_nothing_is_stored_when_nothing_fits() -> None:
    c = cache(capacity=0)
    assert c.insert_prefix(key(1, 2), Reader()) == (0, 0)
    assert c.stats().bytes_held == 0


# ---- cached == uncached on the tiny model

ATOL = 1e-5
FRAMES = 8


@pytest.fixture(scope="module")
def model() -> DualAR:
    model = load_model(MODEL_DIR, dtype="float32", progress=False)
    model.setup_caches(2, 1024)
    return model


@pytest.fixture(scope="module")
def prompts(model: DualAR) -> PromptBuilder:
    return PromptBuilder.from_pretrained(MODEL_DIR, model.config)


def run(scheduler: Scheduler, prompt: torch.Tensor, *, seed: int, cancel_after: int | None = None) -> Sequence:
    seq = scheduler.submit(
        prompt, Sampling(temperature=0.0, max_frames=FRAMES), generator=torch.Generator().manual_seed(seed), trace=True
    )
    while seq.finish is None:
        scheduler.step()
        if cancel_after is not None and len(seq.output) >= cancel_after:
            scheduler.cancel(seq)
    return seq


def codes_of(seq: Sequence, frames: int | None = None) -> np.ndarray:
    return torch.stack(list(seq.output)[:frames], dim=1).numpy().astype(np.int16)


def assert_same_run(cached: Sequence, uncached: Sequence) -> None:
    assert len(cached.traces) == len(uncached.traces) > 0
    for a, b in zip(cached.traces, uncached.traces, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.hidden, b.hidden, atol=ATOL, rtol=0)
    assert codes_of(cached).tolist() == codes_of(uncached).tolist()


def test_multi_turn_cached_equals_uncached_through_a_cancelled_turn_and_a_history_drop(
    model: DualAR, prompts: PromptBuilder
) -> None:
    from engine.dualar.context import trim_history

    on = Scheduler(model, SchedulerConfig(max_batch_size=1, prefill_chunk=64))
    off = Scheduler(model, SchedulerConfig(max_batch_size=1, prefill_chunk=64, prefix_cache=False))
    rng = np.random.default_rng(0)
    voices = {0: VoiceRef("a", "Hello there.", rng.integers(0, 32, (10, 12)).astype(np.int16)),
              1: VoiceRef("b", "Good morning.", rng.integers(0, 32, (10, 9)).astype(np.int16))}
    lines = ["First line.", "Second, a reply.", "Third: cut short.", "Fourth one here.", "Fifth.", "Sixth!"]
    budget = 120  # history positions (turns take 54-59): outgrown at turns 4 and 6, the oldest go in one step
    history: list[PastTurn] = []
    system = prompts.system(voices).shape[1]
    previous: tuple[torch.Tensor, int] | None = None  # last prompt, positions of it + frames fed back
    dropped, drops = 0, []
    for i, text in enumerate(lines):
        kept = trim_history(prompts, history, budget)
        prompt = prompts.build(text, speaker=i % 2, voices=voices, history=kept)
        cancel_after = 3 if i == 2 else None
        cached = run(on, prompt, seed=i, cancel_after=cancel_after)
        uncached = run(off, prompt, seed=i, cancel_after=cancel_after)
        assert_same_run(cached, uncached)
        if i == 0:
            assert cached.reused == 0
        elif len(history) - len(kept) > dropped:  # a drop: the match ends inside the first kept user message
            dropped = len(history) - len(kept)
            drops.append(i)
            assert system <= cached.reused < system + prompts.user(kept[0].text, kept[0].speaker).shape[1]
        else:  # through the whole last prompt and the frames it fed back (cut where it was cancelled)
            last_prompt, last_computed = previous  # type: ignore[misc]
            assert torch.equal(prompt[:, : last_prompt.shape[1]], last_prompt)
            assert cached.reused == last_computed
        if i == 2:
            assert cached.finish is FinishReason.CANCELLED and len(cached.output) >= 3
            heard = 2  # the listener heard 2 of the frames: the turn is stored cut there
            history.append(PastTurn(i % 2, text, codes_of(cached, heard)))
            previous = (prompt, prompt.shape[1] + heard)
        else:
            history.append(PastTurn(i % 2, text, codes_of(cached)))
            previous = (prompt, cached.computed)
    assert drops == [3, 5]  # two large steps: turn 4 (index 3) keeps 1 of 3 turns, turn 6 keeps 1 of 5
    s = on.cache.stats()  # type: ignore[union-attr]
    assert (s.hits, s.misses) == (len(lines) - 1, 1)


def test_a_prompt_differing_in_one_residual_code_does_not_match_past_that_frame(
    model: DualAR, prompts: PromptBuilder
) -> None:
    on = Scheduler(model, SchedulerConfig(max_batch_size=1))
    off = Scheduler(model, SchedulerConfig(max_batch_size=1, prefix_cache=False))
    first = prompts.build("One.")
    codes = codes_of(run(on, first, seed=0))
    prompt = prompts.build("Two.", history=[PastTurn(0, "One.", codes)])
    assert run(on, prompt, seed=1).reused == len(first[0]) + FRAMES - 1  # all but the last frame was fed back
    frame = 4
    altered = codes.copy()
    altered[5, frame] = (altered[5, frame] + 1) % 32  # residual level 5 of frame 4; semantic code unchanged
    changed = prompts.build("Two.", history=[PastTurn(0, "One.", altered)])
    start = len(first[0])  # turn 1's audio starts where its prompt (ending with the generation header) ended
    assert torch.equal(changed[0], prompt[0])  # identical token ids
    cached, uncached = run(on, changed, seed=1), run(off, changed, seed=1)
    assert cached.reused == start + frame
    assert_same_run(cached, uncached)
