"""The dual-AR decode step as CUDA graphs: one slow-AR step plus the fast AR's 10-step codebook loop, batched over the
running streams, replayed at a few padded batch sizes over KV buffers allocated once (gpt-fast's recipe).

Why explicit ``torch.cuda.CUDAGraph`` and not ``torch.compile(mode="reduce-overhead")``: the step is ~40 small
kernels per slow layer plus 10 fast-AR passes, so on a GPU it is bound by launch overhead, which a graph removes
either way; an explicit graph captures in about a second per batch size with the stock torch alone, where Inductor
would first compile (and autotune) the 36-layer model for every size, minutes of a 15-minute GPU window, and adds
recompiles whenever a shape or guard changes. Kernel fusion is what compile would add; that was not measured (no
GPU was lent when this was written), so it stays a follow-up, not a claim.

How. A :class:`GraphedDecoder` owns rows ``0..max_batch-1`` of the model's caches: stream ``i`` lives in cache row
``i``. Every per-stream input of a step lives in a static device buffer (:class:`DecodeState`: the last frame's
column, the position, the sampling settings, the seed and frame counter, the repetition-aware-sampling window), and
:func:`decode_frame` — tensor-only, no host reads — reads them, runs the step, and writes the new frame and the
advanced counters back into the same buffers, so replaying a graph again and again *is* autoregressive decoding
with no host work between frames. The batch is padded up to a captured size (:func:`bucket`); padding rows are
inactive: they write their keys and values at the cache's last position (reserved, never a stream's) and do not
advance. Attention reads the whole cache under the causal mask (one shape per batch size), as gpt-fast does.

Sampling is ``engine.sglang.sampling``'s counter-based draw (a per-stream seed and frame counter instead of a
``torch.Generator``, which a graph cannot hold): tensor-only, and a seeded stream gives the same frames at any
batch size. At temperature 0 it is the greedy argmax, the same codes as ``generate.stream`` until repetition-aware
sampling first redraws (that redraw is random in both, from different random numbers).

Without CUDA (or ``use_graphs=False``) :meth:`GraphedDecoder.step` runs the very same :func:`decode_frame` eagerly,
so the CPU tests check the function that the GPU captures.

The batching scheduler (``scheduler.py``) drives a decoder over its own slots (slot = row): it :meth:`configures
<GraphedDecoder.configure>` a row on admission, prefills chunks itself, and before each :meth:`~GraphedDecoder.step`
sets every row's position and activity from the host and puts a new prompt's last column in its row, so first
frames come out of the same replay as the others. Graphs are dropped and captured again if ``setup_caches``
reallocates the caches they write into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.base import Sampling
from engine.dualar.model import DualAR
from engine.dualar.sampling import RAS_WINDOW, SamplingParams, main_token_ids
from engine.sglang.sampling import draw_main, draw_residual

__all__ = ["BATCH_SIZES", "DecodeState", "GraphedDecoder", "bucket", "decode_frame", "first_frame"]

BATCH_SIZES = (1, 2, 4, 8, 16, 32)  # captured batch sizes; a batch runs in the smallest one that holds it


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest captured batch size that holds ``n`` streams."""
    if n < 1:
        raise ValueError(f"need at least one stream, got {n}")
    fits = [s for s in sorted(sizes) if s >= n]
    if not fits:
        raise ValueError(f"{n} streams exceed the largest captured batch size ({max(sizes)})")
    return fits[0]


@dataclass
class DecodeState:
    """Static per-stream buffers (rows = cache rows), read and written in place by :func:`decode_frame`."""

    column: Tensor  # (N, 1 + C) int64: the last frame (main token, C codes), the next step's input
    pos: Tensor  # (N,) int64: the position that input goes to (the scratch position for inactive rows)
    active: Tensor  # (N,) bool
    temperature: Tensor  # (N,) float32
    top_p: Tensor  # (N,) float32
    top_k: Tensor  # (N,) int64
    seed: Tensor  # (N,) int64
    step: Tensor  # (N,) int64: frames made so far (the counter of the counter-based draws)
    window: Tensor  # (N, RAS_WINDOW) int64: the last main tokens, -1 = none
    allow_end: Tensor  # (N,) bool
    ras: Tensor  # (N,) bool: repetition-aware sampling redrew the last frame's main token

    @classmethod
    def empty(cls, rows: int, columns: int, scratch: int, device: torch.device) -> DecodeState:
        def full(shape: tuple[int, ...], value: float, dtype: torch.dtype) -> Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(
            column=full((rows, columns), 0, torch.long),
            pos=full((rows,), scratch, torch.long),
            active=full((rows,), False, torch.bool),
            temperature=full((rows,), 0.0, torch.float32),
            top_p=full((rows,), 1.0, torch.float32),
            top_k=full((rows,), 0, torch.long),
            seed=full((rows,), 0, torch.long),
            step=full((rows,), 0, torch.long),
            window=full((rows, RAS_WINDOW), -1, torch.long),
            allow_end=full((rows,), True, torch.bool),
            ras=full((rows,), False, torch.bool),
        )


class _Tables:
    """What every frame needs besides the state: main-token ids, their head rows (gathered once), fast positions."""

    def __init__(self, model: DualAR) -> None:
        c = model.config
        device = model.slow.norm.weight.device
        self.main_ids = main_token_ids(c.semantic_begin_id, c.semantic_end_id, c.im_end_id, device)  # (M,)
        head = model.slow.output.weight if model.slow.output is not None else model.slow.embeddings.weight
        self.main_head = head.detach()[self.main_ids].contiguous()  # (M, D)
        self.end_column = int((self.main_ids == c.im_end_id).nonzero()[0, 0])
        self.fast_positions = torch.arange(c.num_codebooks, device=device)


def _frame(model: DualAR, tables: _Tables, hidden: Tensor, state: DecodeState, rows: slice) -> Tensor:
    # hidden: (B, D) slow final-norm state of rows -> (B, 1 + C) new frame columns; the fast AR uses cache rows 0..B-1
    c = model.config
    params = SamplingParams(state.temperature[rows], state.top_p[rows], state.top_k[rows])
    seed, step = state.seed[rows], state.step[rows]
    drawn = draw_main(
        F.linear(hidden, tables.main_head),
        tables.main_ids,
        params,
        state.window[rows],
        seed=seed,
        step=step,
        semantic_range=(c.semantic_begin_id, c.semantic_end_id),
        allow_end=state.allow_end[rows],
        end_column=tables.end_column,
    )
    main = drawn.token
    code = (main - c.semantic_begin_id).clamp(0, c.codebook_size - 1)  # <|im_end|> -> 0, as the reference
    positions = tables.fast_positions
    model.fast(hidden[:, None], positions[:1])  # fast position 0: the seed
    codes = [code]
    for level in range(1, c.num_codebooks):
        logits = model.fast(model.fast.embeddings(code)[:, None], positions[level : level + 1])[:, -1]
        code = draw_residual(logits, params, seed=seed, step=step, level=level)
        codes.append(code)
    column = torch.stack([main, *codes], dim=1)
    active = state.active[rows]
    state.column[rows] = torch.where(active[:, None], column, state.column[rows])
    state.window[rows] = torch.where(active[:, None], drawn.window, state.window[rows])
    state.step[rows] += active.long()
    state.ras[rows] = drawn.ras & active
    return column


def decode_frame(model: DualAR, tables: _Tables, state: DecodeState, batch: int) -> Tensor:
    """One frame for cache rows 0..batch-1 from their last frames: (batch, 1 + C). Tensor-only (captured as is)."""
    rows = slice(0, batch)
    tokens = state.column[rows, :, None]  # (B, 1 + C, 1)
    hidden = model.slow(tokens, state.pos[rows, None], rows)[:, -1]  # (B, D); attention over the whole cache
    state.pos[rows] += state.active[rows].long()
    return _frame(model, tables, hidden, state, rows)


def first_frame(model: DualAR, tables: _Tables, state: DecodeState, row: int, prompt: Tensor) -> Tensor:
    """Prefill ``prompt`` (1 + C, T) into cache row ``row`` (eager) and make its first frame: (1 + C,)."""
    length = prompt.shape[1]
    rows = slice(row, row + 1)
    positions = torch.arange(length, device=prompt.device)
    hidden = model.slow(prompt[None], positions, rows)[:, -1]
    state.pos[row] = length
    return _frame(model, tables, hidden, state, rows)[0]


class GraphedDecoder:
    """Batched decoding of up to ``max_batch`` streams with the step captured as CUDA graphs (eager without CUDA).

    ``start(row, prompt, sampling)`` prefills a stream into its cache row and returns its first frame; ``step(n)``
    makes the next frame of rows 0..n-1 (n active or padding rows; rows past ``n`` are not touched) and returns the
    (n, 1 + C) columns; ``stop(row)`` frees a row.
    """

    def __init__(self, model: DualAR, *, max_batch: int, max_seq_len: int | None = None,
                 sizes: Sequence[int] = BATCH_SIZES, use_graphs: bool | None = None) -> None:
        device = model.slow.norm.weight.device
        self.sizes = tuple(sorted({s for s in sizes if s <= max_batch} | {max_batch}))
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.device, self.max_batch = model, device, max_batch
        model.setup_caches(max_batch, max_seq_len)
        self.cache_len = model.slow.cache_len
        self.scratch = self.cache_len - 1  # inactive rows write here; no stream ever reaches it
        c = model.config
        self.tables = _Tables(model)
        self.state = DecodeState.empty(model.max_batch_size, 1 + c.num_codebooks, self.scratch, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        self._pool: tuple[int, int] | None = None
        self._captured_for = _cache_ids(model)

    # ---- streams

    @torch.inference_mode()
    def start(self, row: int, prompt: Tensor, sampling: Sampling, *, allow_end: bool = True) -> Tensor:
        if not 0 <= row < self.max_batch:
            raise ValueError(f"row {row} outside [0, {self.max_batch})")
        c = self.model.config
        if prompt.dim() != 2 or prompt.shape[0] != 1 + c.num_codebooks:
            raise ValueError(f"prompt must have shape ({1 + c.num_codebooks}, T), got {tuple(prompt.shape)}")
        if not 0 < prompt.shape[1] < self.scratch:
            raise ValueError(f"prompt length {prompt.shape[1]} must be within [1, {self.scratch - 1}]")
        self.configure(row, sampling, seed=sampling.seed or 0, allow_end=allow_end)
        self.state.active[row] = True
        return first_frame(self.model, self.tables, self.state, row, prompt.to(self.device)).clone()

    def configure(self, row: int, sampling: Sampling, *, seed: int, allow_end: bool = True) -> None:
        """A new stream's settings in row ``row``: sampling, seed, frame counter 0, empty RAS window (not active)."""
        s = self.state
        s.temperature[row], s.top_p[row], s.top_k[row] = sampling.temperature, sampling.top_p, sampling.top_k
        s.seed[row] = seed % (1 << 62)
        s.step[row], s.allow_end[row] = 0, allow_end
        s.window[row] = -1

    def stop(self, row: int) -> None:
        self.state.active[row] = False
        self.state.pos[row] = self.scratch

    def room(self, row: int) -> int:
        """Frames row ``row`` can still decode before its cache row is full."""
        return self.scratch - int(self.state.pos[row])

    @torch.inference_mode()
    def step(self, n: int) -> Tensor:
        size = bucket(n, self.sizes)
        if self.use_graphs:
            self._drop_stale()
            if size not in self.graphs:
                self.capture([size])
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return decode_frame(self.model, self.tables, self.state, size)[:n]

    # ---- capture

    @torch.inference_mode()
    def capture(self, sizes: Sequence[int] | None = None) -> None:
        """Capture the step at ``sizes`` (default: all), largest first, sharing one memory pool. The state is left
        as it was (warm-up runs write only at the scratch position of inactive rows, and advance nothing)."""
        if not self.use_graphs:
            return
        self._drop_stale()
        saved = {name: getattr(self.state, name).clone() for name in vars(self.state)}
        active, pos = self.state.active.clone(), self.state.pos.clone()
        self.state.active.zero_()
        self.state.pos.fill_(self.scratch)
        pool = self._pool or torch.cuda.graph_pool_handle()
        self._pool = pool
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in sorted(sizes or self.sizes, reverse=True):
                for _ in range(2):  # warm-up outside the graph (allocator, kernel selection)
                    decode_frame(self.model, self.tables, self.state, size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[size] = decode_frame(self.model, self.tables, self.state, size)
                self.graphs[size] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for name, value in saved.items():
            getattr(self.state, name).copy_(value)
        self.state.active.copy_(active)
        self.state.pos.copy_(pos)

    def _drop_stale(self) -> None:
        """Forget the graphs if the model's caches were reallocated since (a bigger ``setup_caches``): a graph replays
        into the very buffers it was captured over."""
        if _cache_ids(self.model) != self._captured_for:
            self.graphs.clear()
            self.outputs.clear()
            self._pool = None
            self._captured_for = _cache_ids(self.model)


def _cache_ids(model: DualAR) -> tuple[int, ...]:
    # where the slow and fast KV caches live (their first layer's keys)
    caches = [layer.attention.kv_cache for stack in (model.slow, model.fast) for layer in stack._blocks()[:1]]
    return tuple(c.k_cache.data_ptr() if c is not None else 0 for c in caches)
