"""Continuous batching of dual-AR generation on one model (nano-vllm's ``Scheduler`` in miniature).

One thread owns the model and calls :meth:`Scheduler.step` (or :meth:`Scheduler.run`, which steps while there is
work); any thread may :meth:`~Scheduler.submit`, :meth:`~Scheduler.take` and :meth:`~Scheduler.cancel`. Requests
join and leave between steps. One step is :meth:`Scheduler.schedule` (bookkeeping: queues, slots, the prefix
cache; it returns a :class:`Batch`), :meth:`ModelRunner.run` (the model alone: tensors in, frame columns out; it
knows no queue, slot policy or cache) and :meth:`Scheduler.postprocess` (bookkeeping again):

- schedule: finish the sequences cancelled since the last step (cancel takes effect at the next step); admit
  waiting sequences while a slot is free. A slot is one row of the slow AR's KV cache, a sequence's for its whole
  life (lowest free slot first, so running slots tend to be contiguous and attention reads a view, not a gather).
  On admission the prefix cache is matched on the prompt without its last position (that position's hidden state
  is needed for the first frame, so at least one position is always prefilled) and the matched KV is copied into
  the slot. Then pick the decode batch — every running sequence past its prompt whose output buffer is not full
  (a sequence whose consumer is not pulling is paused: kept in its slot, not stepped, and nobody waits for it) —
  and up to ``prefill_chunk`` prompt positions to prefill, first come first served (chunked prefill).
- run: the slow AR steps the decode batch together (one position per row, each at its own position in its own
  slot), then prefills each chunk; every row that now has a final hidden state (the decode rows, and prefills
  that reached their prompt's end) gets its frame from :func:`generate.sample_frame` in one batch: main tokens,
  then the fast AR's 9-step loop batched across all of them. Sampling parameters, RAS window and random
  generator are per sequence, so a seeded sequence gets the same frames in any batch.
- postprocess: frames go to their sequence's output buffer; ``<|im_end|>``, ``max_frames`` or a full KV row end a
  sequence. A finished (or cancelled) sequence's KV — prompt plus the frames fed back — goes into the prefix
  cache before its slot is freed, so the next turn of the conversation matches through this turn's audio (cut
  where it stopped).

Frames are the (C,) int64 codes of each frame, on the CPU, taken from the buffer by the consumer; ``on_output`` is
called (on the model thread, outside the lock) whenever a sequence has new frames or has finished.

CUDA graphs. With the model on CUDA (and ``cuda_graphs``, the default) the run phase goes through a
:class:`~engine.dualar.cuda_graphs.GraphedDecoder` over the scheduler's own slots: cache row = slot, each slot's
sampling settings, seed, frame counter, RAS window and last frame in its static buffers, the step captured once per
padded batch size at construction. A step then prefills its chunks eagerly as above, but stops each prompt one
position short: that last position is fed through the graph, in the same replay as the decode batch, so first
frames and later frames come from one captured function (:func:`~engine.dualar.cuda_graphs.decode_frame`). The
replay covers slots ``0..bucket(max decoding slot + 1) - 1``; the other slots in that range (paused, prefilling,
free) are padding rows: inactive, they write at the cache's last position and change nothing (no running sequence
has a key there: a sequence that reaches it finishes in the same step). Sampling in the graph is the counter-based
draw of ``engine.sglang.sampling`` (seed + frame index, no ``torch.Generator``): still per request, a seeded
sequence gets the same frames whatever runs beside it, but from other random numbers than the eager path; its seed
is ``sampling.seed``, else the generator's ``initial_seed()``, else a random one. Greedy settings give the eager
path's codes up to rounding (``top_k=1`` throughout; plain temperature 0 until repetition-aware sampling first
redraws, which is random in both). ``trace`` is not recorded there (the graph does not keep the full logits). If
capture fails, a warning is logged and the step is the eager one. Without CUDA, or with ``cuda_graphs=False``, the
step is the eager one above, unchanged.
"""

from __future__ import annotations

import enum
import heapq
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from engine.base import Sampling
from engine.dualar.cuda_graphs import GraphedDecoder, bucket
from engine.dualar.generate import Frame, sample_frame
from engine.dualar.model import DualAR, Slots
from engine.dualar.prefix_cache import Node, PrefixCache, RadixCache
from engine.dualar.sampling import RAS_WINDOW, Sampler, main_token_ids

__all__ = ["Batch", "FinishReason", "ModelRunner", "Ran", "Scheduler", "SchedulerConfig", "Sequence", "StepResult",
           "Taken"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8  # slots: sequences running at once (KV cache rows)
    prefill_chunk: int = 256  # prompt positions prefilled per step, over all prefilling sequences
    output_frames: int = 16  # frames a sequence may hold untaken; beyond that it is paused
    prefix_cache: bool = True
    prefix_cache_bytes: int = 1 << 30
    cuda_graphs: bool = True  # decode through CUDA graphs when the model is on CUDA (ignored elsewhere)
    allow_end: bool = True  # False: <|im_end|> is never drawn (fixed-length measurements with random weights)

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError("max_batch_size must be within [1, 1024]")
        if not 1 <= self.prefill_chunk <= 1 << 20:
            raise ValueError("prefill_chunk must be within [1, 1048576]")
        if self.output_frames < 1:
            raise ValueError("output_frames must be at least 1")
        if self.prefix_cache_bytes < 0:
            raise ValueError("prefix_cache_bytes must be >= 0")


class FinishReason(enum.StrEnum):
    STOP = "stop"  # <|im_end|>
    LENGTH = "length"  # max_frames, or the KV cache row is full
    CANCELLED = "cancelled"
    ERROR = "error"


class FrameTrace(NamedTuple):
    logits: Tensor  # (V,) slow AR logits the main token was drawn from
    hidden: Tensor  # (D,) slow AR final-norm hidden state


@dataclass(eq=False)
class Sequence:
    """One request: its prompt and settings, the model thread's state, and the buffer shared with its consumer."""

    prompt: Tensor  # (1 + C, T) int64 on the CPU
    sampling: Sampling
    generator: torch.Generator | None = None
    on_output: Callable[[], None] | None = None
    trace: bool = False  # keep each frame's logits and hidden state (tests, debugging)
    # model thread
    slot: int = -1
    computed: int = 0  # positions whose KV is in the slot: the prompt, then the frames fed back
    reused: int = 0  # prompt positions matched in the prefix cache
    columns: list[Tensor] = field(default_factory=list)  # (1 + C,) of every frame, the last not yet fed back
    window: Tensor | None = None  # (RAS_WINDOW,) last main tokens
    node: Node | None = None  # locked prefix-cache node
    traces: list[FrameTrace] = field(default_factory=list)
    # shared, under the scheduler's lock
    output: deque[Tensor] = field(default_factory=deque)
    cancelled: bool = False
    finish: FinishReason | None = None
    error: str | None = None
    submitted_at: float = 0.0  # time.perf_counter()
    first_frame_at: float | None = None  # when its first frame was made (an <|im_end|> one included)

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[1]

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prompt_len and bool(self.columns)


class Taken(NamedTuple):
    frames: list[Tensor]  # (C,) codes, oldest first
    finish: FinishReason | None  # set once the sequence is finished and its buffer is empty
    error: str | None


class Batch(NamedTuple):
    """What one step runs, as :meth:`Scheduler.schedule` picked it."""

    decode: list[Sequence]  # sequences past their prompt stepping one position (their last frame fed back)
    prefill: list[tuple[Sequence, int, int]]  # (sequence, start, end): prompt positions prefilled this step
    finished: int  # sequences finished while scheduling (cancelled)

    @property
    def first(self) -> list[Sequence]:
        """Sequences whose prompt is complete after this step: they make their first frame in it."""
        return [seq for seq, _, end in self.prefill if end == seq.prompt_len]


class Ran(NamedTuple):
    """What :meth:`ModelRunner.run` made: a frame for each of ``rows`` (the decode batch and the first frames)."""

    rows: list[Sequence]
    columns: Tensor  # (len(rows), 1 + C) on the CPU
    windows: Tensor | None = None  # (len(rows), RAS_WINDOW) the eager step's RAS windows (the graphs keep theirs)
    frame: Frame | None = None  # the eager step's logits and hidden states (traces)


class StepResult(NamedTuple):
    prefilled: int  # prompt positions prefilled
    decoded: int  # sequences in the decode batch
    frames: int  # frames made (an <|im_end|> included)
    finished: int  # sequences finished


class Scheduler:
    """``decoder``: the static step to run (tests; default: a captured one on CUDA when ``cuda_graphs``, else none,
    the eager step). A :class:`GraphedDecoder` with ``use_graphs=False`` runs the graphed path's function eagerly."""

    def __init__(
        self,
        model: DualAR,
        config: SchedulerConfig | None = None,
        *,
        cache: PrefixCache | None = None,
        decoder: GraphedDecoder | None = None,
    ):
        self.model, self.config = model, config or SchedulerConfig()
        cfg = self.config
        if model.max_batch_size < cfg.max_batch_size or model.slow.cache_len == 0:
            model.setup_caches(cfg.max_batch_size, model.slow.cache_len or None)
        self.cache_len = model.slow.cache_len
        if cache is None and cfg.prefix_cache:
            cache = RadixCache(cfg.prefix_cache_bytes)
        self.cache = cache if cfg.prefix_cache else None
        self.device = model.slow.norm.weight.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free = list(range(cfg.max_batch_size))
        self._cond = threading.Condition()
        self.frames_total = self.steps_total = self.prefilled_total = 0
        if decoder is None and cfg.cuda_graphs and self.device.type == "cuda":
            decoder = _captured_decoder(model, cfg.max_batch_size, self.cache_len)
        if decoder is not None and (decoder.model is not model or decoder.max_batch < cfg.max_batch_size
                                    or decoder.cache_len < self.cache_len):
            raise ValueError("the decoder must be built on this model with max_batch >= max_batch_size and its cache")
        self.runner = ModelRunner(model, decoder, allow_end=cfg.allow_end)

    @property
    def decoder(self) -> GraphedDecoder | None:
        return self.runner.decoder

    @property
    def graphed(self) -> bool:
        """Whether the decode step replays CUDA graphs."""
        return self.decoder is not None and self.decoder.use_graphs

    # ---- any thread

    def submit(
        self,
        prompt: Tensor,
        sampling: Sampling,
        *,
        generator: torch.Generator | None = None,
        on_output: Callable[[], None] | None = None,
        trace: bool = False,
    ) -> Sequence:
        """Queue a prompt (1 + C, T); it joins the batch at the next step with a free slot."""
        c = self.model.config
        if prompt.dim() != 2 or prompt.shape[0] != 1 + c.num_codebooks:
            raise ValueError(f"prompt must have shape ({1 + c.num_codebooks}, T), got {tuple(prompt.shape)}")
        if not 0 < prompt.shape[1] < self.cache_len:
            raise ValueError(f"prompt length {prompt.shape[1]} must be within [1, {self.cache_len - 1}] (the KV cache)")
        seq = Sequence(prompt.to("cpu", torch.long), sampling, generator, on_output, trace)
        with self._cond:
            seq.submitted_at = time.perf_counter()
            self.waiting.append(seq)
            self._cond.notify_all()
        return seq

    def take(self, seq: Sequence, max_frames: int) -> Taken:
        """Up to ``max_frames`` buffered frames; ``finish`` once the sequence is done and nothing is left."""
        with self._cond:
            frames = [seq.output.popleft() for _ in range(min(max_frames, len(seq.output)))]
            if frames:
                self._cond.notify_all()  # it may have been paused
            return Taken(frames, seq.finish if not seq.output else None, seq.error)

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next step (idempotent). Its KV so far still goes into the prefix cache."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {
            "batch_running": len(self.running),
            "batch_waiting": len(self.waiting),
            "frames_total": self.frames_total,
            "steps_total": self.steps_total,
            "prefill_positions_total": self.prefilled_total,
        }
        if self.cache is not None:
            s = self.cache.stats()
            out |= {
                "prefix_cache_hits_total": s.hits,
                "prefix_cache_misses_total": s.misses,
                "prefix_cache_tokens_reused_total": s.tokens_reused,
                "prefix_cache_tokens": s.tokens_held,
                "prefix_cache_bytes": s.bytes_held,
                "prefix_cache_evicted_bytes_total": s.evicted_bytes,
            }
        return out

    # ---- the model thread

    def has_work(self) -> bool:
        with self._cond:
            return self._has_work()

    def run(self, stop: threading.Event, idle_wait: float = 0.1) -> None:
        """Step while there is work, sleep when there is none (or every sequence is paused), until ``stop``."""
        while not stop.is_set():
            with self._cond:
                if not self._has_work():
                    self._cond.wait(idle_wait)
                    continue
            try:
                self.step()
            except Exception as exc:  # the batch is lost; its consumers get the error, the loop goes on
                log.exception("scheduler step failed")
                self.abort(f"{type(exc).__name__}: {exc}")
        self.abort("engine closed")

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def abort(self, error: str) -> None:
        """End every sequence with an error (model thread; nothing goes into the prefix cache)."""
        with self._cond:
            doomed = [*self.running, *self.waiting]
            self.waiting.clear()
        for seq in doomed:
            self._finish(seq, FinishReason.ERROR, error, store=False)

    @torch.inference_mode()
    def step(self) -> StepResult:
        """One step: schedule, run, postprocess."""
        batch = self.schedule()
        return self.postprocess(batch, self.runner.run(batch))

    def schedule(self) -> Batch:
        """Finish the cancelled, admit the waiting while a slot is free, pick the decode batch and the prefill."""
        with self._cond:
            cancelled = [s for s in self.running if s.cancelled]
            admitted: list[Sequence] = []
            while self.waiting and len(self._free) > len(admitted):
                admitted.append(self.waiting.popleft())
        finished = 0
        for seq in cancelled:
            self._finish(seq, FinishReason.CANCELLED)
            finished += 1
        for seq in admitted:
            if seq.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                finished += 1
            else:
                self._admit(seq)
        with self._cond:
            decode = sorted(
                (s for s in self.running if s.decoding and len(s.output) < self.config.output_frames),
                key=lambda s: s.slot,
            )
        prefill: list[tuple[Sequence, int, int]] = []
        budget = self.config.prefill_chunk
        for seq in self.running:
            if budget > 0 and seq.computed < seq.prompt_len:
                end = min(seq.prompt_len, seq.computed + budget)
                prefill.append((seq, seq.computed, end))
                budget -= end - seq.computed
        return Batch(decode, prefill, finished)

    def postprocess(self, batch: Batch, ran: Ran) -> StepResult:
        """Advance what ran, hand out the new frames, end the sequences that are done."""
        for seq in batch.decode:
            seq.computed += 1
        for seq, start, end in batch.prefill:
            seq.computed = end
            self.prefilled_total += end - start
        finished = batch.finished
        if ran.rows:
            finished += self._postprocess(ran.rows, ran.columns, ran.windows, ran.frame)
        self.steps_total += 1
        return StepResult(sum(e - s for _, s, e in batch.prefill), len(batch.decode), len(ran.rows), finished)

    # ---- helpers (model thread)

    def _has_work(self) -> bool:
        if self.waiting:
            return True
        return any(
            s.cancelled or not s.decoding or len(s.output) < self.config.output_frames for s in self.running
        )

    def _admit(self, seq: Sequence) -> None:
        seq.slot = heapq.heappop(self._free)
        if self.cache is not None:
            match = self.cache.match_prefix(seq.prompt[:, :-1])
            self.cache.lock(match.node)
            seq.node = match.node
            self.runner.load_prefix(seq.slot, match.values)
            seq.computed = seq.reused = match.length
        self.runner.admit(seq)
        self.running.append(seq)

    def _postprocess(
        self, rows: list[Sequence], columns: Tensor, windows: Tensor | None = None, frame: Frame | None = None
    ) -> int:
        # columns: (B, 1 + C) on the CPU; windows and frame from the eager step (the graphed one keeps them on its side)
        im_end, finished = self.model.config.im_end_id, 0
        ended: list[tuple[Sequence, FinishReason]] = []
        notify: list[Sequence] = []
        now = time.perf_counter()
        with self._cond:
            for i, seq in enumerate(rows):
                if windows is not None:
                    seq.window = windows[i]
                if seq.trace and frame is not None:
                    seq.traces.append(FrameTrace(frame.logits[i].cpu(), frame.hidden[i].cpu()))
                column = columns[i]
                if seq.first_frame_at is None:
                    seq.first_frame_at = now
                if int(column[0]) == im_end:
                    ended.append((seq, FinishReason.STOP))
                    continue
                seq.columns.append(column)
                seq.output.append(column[1:])
                notify.append(seq)
                if len(seq.columns) >= seq.sampling.max_frames or seq.computed >= self.cache_len:
                    ended.append((seq, FinishReason.LENGTH))
        self.frames_total += len(rows)
        for seq, reason in ended:
            self._finish(seq, reason)
            finished += 1
        for seq in notify:
            if seq.finish is None:
                _notify(seq)
        return finished

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None, *, store: bool = True) -> None:
        if seq.slot >= 0:
            if self.cache is not None:
                if store and seq.computed > 0:
                    self.cache.insert_prefix(self._computed_key(seq), self.runner.kv_reader(seq.slot))
                if seq.node is not None:
                    self.cache.unlock(seq.node)
                    seq.node = None
            heapq.heappush(self._free, seq.slot)
            seq.slot = -1
        if seq in self.running:
            self.running.remove(seq)
        with self._cond:
            seq.finish, seq.error = reason, error
        _notify(seq)

    @staticmethod
    def _computed_key(seq: Sequence) -> Tensor:
        """The columns whose KV is in the slot: the prompt (or its prefilled part), then the frames fed back."""
        fed = seq.computed - seq.prompt_len
        if fed <= 0:
            return seq.prompt[:, : seq.computed]
        return torch.cat([seq.prompt, torch.stack(seq.columns[:fed], dim=1)], dim=1)


class ModelRunner:
    """The model side of a step (nano-vllm's ``ModelRunner``): runs a :class:`Batch` and returns frame columns.

    It reads each sequence's prompt, position, slot and sampling state but advances none of them (the scheduler's
    postprocess does); it owns what is in the KV cache rows (prefix copies in and out) and, on CUDA, the captured
    decode step. ``decoder``: the static step (a :class:`GraphedDecoder`), or None for the eager one."""

    def __init__(self, model: DualAR, decoder: GraphedDecoder | None = None, *, allow_end: bool = True) -> None:
        self.model, self.decoder, self.allow_end = model, decoder, allow_end
        c = model.config
        self.device = model.slow.norm.weight.device
        self.main_ids = main_token_ids(c.semantic_begin_id, c.semantic_end_id, c.im_end_id, self.device)
        if not allow_end:
            self.main_ids = self.main_ids[self.main_ids != c.im_end_id]

    # ---- slots

    def admit(self, seq: Sequence) -> None:
        """A sequence took its slot: a fresh RAS window, and its settings in the graphed step's row."""
        seq.window = torch.full((RAS_WINDOW,), -1, dtype=torch.long, device=self.device)
        if self.decoder is not None:
            self.decoder.configure(seq.slot, seq.sampling, seed=_seed(seq), allow_end=self.allow_end)

    def load_prefix(self, slot: int, values: list[Tensor]) -> None:
        """Copy a prefix-cache match (its KV, oldest first) into the start of ``slot``."""
        position = 0
        for kv in values:
            self.model.slow.write_kv(slot, position, kv)
            position += kv.shape[3]

    def kv_reader(self, slot: int) -> Callable[[int, int], Tensor]:
        """Positions [a, b) of ``slot``'s KV, for the prefix cache to copy out."""
        return lambda a, b: self.model.slow.read_kv(slot, a, b)

    # ---- run

    @torch.inference_mode()
    def run(self, batch: Batch) -> Ran:
        if self.decoder is not None:
            return self._run_static(self.decoder, batch)
        decode, rows, hidden = batch.decode, list(batch.decode), []
        if decode:
            columns = torch.stack([s.columns[-1] for s in decode])[:, :, None].to(self.device)  # (B, 1 + C, 1)
            positions = torch.tensor([[s.computed] for s in decode], device=self.device)  # (B, 1)
            kv_len = max(s.computed for s in decode) + 1
            hidden.append(self.model.slow(columns, positions, self._slots(decode), kv_len)[:, -1])
        for seq, start, end in batch.prefill:
            chunk = seq.prompt[None, :, start:end].to(self.device)  # (1, 1 + C, n)
            positions = torch.arange(start, end, device=self.device)[None]
            h = self.model.slow(chunk, positions, slice(seq.slot, seq.slot + 1), end)[:, -1]
            if end == seq.prompt_len:
                rows.append(seq)
                hidden.append(h)
        if not rows:
            return Ran([], _NO_COLUMNS)
        sampler = self._sampler(rows)
        frame = sample_frame(self.model, torch.cat(hidden), sampler)
        return Ran(rows, frame.column.cpu(), sampler.window, frame)

    def _run_static(self, decoder: GraphedDecoder, batch: Batch) -> Ran:
        """Chunks prefilled eagerly up to each prompt's last position, then one replay for every row that makes a
        frame (the decode batch, and prompts now complete: their last position goes through the graph)."""
        for seq, start, end in batch.prefill:
            stop = min(end, seq.prompt_len - 1)
            if stop > start:
                chunk = seq.prompt[None, :, start:stop].to(self.device)  # (1, 1 + C, n)
                positions = torch.arange(start, stop, device=self.device)[None]
                self.model.slow(chunk, positions, slice(seq.slot, seq.slot + 1), stop)
        first = batch.first
        rows = sorted(batch.decode + first, key=lambda s: s.slot)
        if not rows:
            return Ran([], _NO_COLUMNS)
        starting = {id(s) for s in first}
        positions = [s.prompt_len - 1 if id(s) in starting else s.computed for s in rows]
        return Ran(rows, _static_step(decoder, rows, positions, first))

    def _slots(self, rows: list[Sequence]) -> Slots:
        slots = [s.slot for s in rows]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.device)

    def _sampler(self, rows: list[Sequence]) -> Sampler:
        generators = [s.generator for s in rows]
        windows = [s.window for s in rows if s.window is not None]
        assert len(windows) == len(rows), "admitted sequences have a RAS window"
        c = self.model.config
        return Sampler(
            [s.sampling for s in rows],
            main_ids=self.main_ids,
            semantic_range=(c.semantic_begin_id, c.semantic_end_id),
            generator=None if all(g is None for g in generators) else generators,
            window=torch.stack(windows),
        )


_NO_COLUMNS = torch.zeros(0, 0, dtype=torch.long)


def _captured_decoder(model: DualAR, slots: int, cache_len: int) -> GraphedDecoder | None:
    """A decoder over ``slots`` cache rows with the step captured at every padded size; None (eager, with a
    warning) if capture fails, so a GPU the graphs do not work on still serves."""
    try:
        decoder = GraphedDecoder(model, max_batch=slots, max_seq_len=cache_len)
        decoder.capture()
    except Exception:
        log.warning("CUDA graph capture of the decode step failed; the scheduler decodes eagerly", exc_info=True)
        return None
    return decoder


def _static_step(decoder: GraphedDecoder, rows: list[Sequence], positions: list[int], first: list[Sequence]) -> Tensor:
    """One replay for ``rows`` (their slots, any order): (len(rows), 1 + C) new frame columns on the CPU. Each row
    feeds its slot's last column at its position; ``first`` rows (no frame yet) feed their prompt's last column,
    put in their slot first. Slots up to the padded size that are not in ``rows`` are inactive."""
    state, device = decoder.state, decoder.device
    slots = [s.slot for s in rows]
    n = max(slots) + 1
    size = bucket(n, decoder.sizes)
    pos = torch.full((size,), decoder.scratch, dtype=torch.long)  # (size,): inactive rows write at the scratch position
    active = torch.zeros(size, dtype=torch.bool)  # (size,)
    pos[slots], active[slots] = torch.tensor(positions), True
    state.pos[:size].copy_(pos)
    state.active[:size].copy_(active)
    if first:
        index = torch.tensor([s.slot for s in first], device=device)
        state.column[index] = torch.stack([s.prompt[:, -1] for s in first]).to(device)
    return decoder.step(n).cpu()[slots]


def _seed(seq: Sequence) -> int:
    """The counter-based draw's seed: the request's, else its generator's, else a random one."""
    if seq.sampling.seed is not None:
        return seq.sampling.seed
    if seq.generator is not None:
        return seq.generator.initial_seed()
    return secrets.randbits(62)


def _notify(seq: Sequence) -> None:
    """Call the consumer back; a consumer that is gone (its event loop closed) must not break the batch."""
    if seq.on_output is None:
        return
    try:
        seq.on_output()
    except Exception:
        log.warning("on_output callback failed; the consumer is gone", exc_info=True)
