"""The S2 Pro dual AR as one batched step over SGLang's flattened tokens: slow AR, main-token draw, fast AR.

This module is plain torch; the SGLang model class (``engine.sglang.models.shoal_s2pro``) subclasses
:class:`S2ProCore` and plugs in SGLang's ``RadixAttention`` as each slow-AR layer's attention, so the same code runs
on the CPU in the tests with a stand-in attention.

Shapes: T tokens of R requests flattened; D model dim, H heads, K kv heads, E head dim, V vocabulary, M main-token
candidates (semantic tokens + ``<|im_end|>``), C codebooks (10).

- **Extend** (prefill, possibly on a cached prefix or a chunk of a long prompt): request i contributes
  ``extend_lens[i]`` tokens; only its last token makes a frame, and only when the chunk ends the prompt.
- **Decode**: one token per request, the frame made by the last step; in a CUDA graph R is the captured (padded)
  batch size, so nothing here depends on host values and every per-request value lives in a device buffer.

Per-request state sits in *slots* indexed by SGLang's ``req_pool_index`` (stable for a request's life, slot 0 never
used by a request): the sampling settings and seed, the frame counter (the RNG counter), the RAS window and the last
frame (the next decode step's input). :meth:`S2ProCore.prepare` runs on the host before every forward (SGLang's
``prepare_for_forward``; eager, before a graph replay too): it maps batch rows to slots and, for an extend, turns each
request's plan (``convert.RequestPlan``) into per-token codes and initializes the slots of prompts that finish here.
:meth:`S2ProCore.step` is tensor-only, so a decode step with its 9-step fast-AR loop is one CUDA graph.

Numerics follow ``engine.dualar``: its RMSNorm (float32), interleaved RoPE from a bfloat16-rounded table, qk-norm,
fused ``wqkv``, SwiGLU, the codebook-embedding sum scaled by 1/sqrt(C + 1), and its fast AR module as is.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.dualar.config import ModelConfig, SlowARConfig
from engine.dualar.loader import published_name
from engine.dualar.model import FastAR, FeedForward, RMSNorm, apply_rope, rope_table
from engine.dualar.sampling import RAS_WINDOW, SamplingParams, main_token_ids
from engine.sglang.convert import FLAG_FAILED, FLAG_RAS, RequestPlan
from engine.sglang.sampling import draw_main, draw_residual

__all__ = ["BatchInfo", "S2ProCore", "StepOutput", "without_custom_processor"]

log = logging.getLogger(__name__)

# attend(q (T, H*E), k (T, K*E), v (T, K*E), ctx) -> (T, H*E): SGLang's RadixAttention, or a stand-in in tests
AttentionFactory = Callable[[int], nn.Module]


@dataclass
class BatchInfo:
    """What :meth:`S2ProCore.prepare` needs about a forward pass (built from SGLang's ``ForwardBatch``)."""

    decode: bool
    rows: int
    slots: Tensor  # (rows,) int: req_pool_index of each row, on the model's device
    slots_cpu: Sequence[int] | None = None  # the same on the host, if known (saves a device sync)
    prefix_lens: Sequence[int] = ()  # extend: cached positions before each row's new tokens
    extend_lens: Sequence[int] = ()  # extend: new tokens of each row
    custom: Sequence[Mapping[str, Any] | None] | None = None  # extend: each row's custom_params (its plan)
    rids: Sequence[str] | None = None
    token: object = None  # identity of the pass this was prepared for (the ForwardBatch)


class StepOutput(NamedTuple):
    logits: Tensor  # (R, V) float32: 0 at the chosen main token, -inf elsewhere (SGLang's sampler takes it)
    frames: Tensor  # (R, 2 + C) int32: main token, C codes, flags
    hidden: Tensor  # (R, D) slow final-norm hidden state at each row's last token (the fast AR's seed)


class _ExtendInputs(NamedTuple):
    token: object
    tokens: int
    codes: Tensor  # (T, C) int64, 0 at text positions
    audio: Tensor  # (T,) bool: an audio position of the prompt
    from_slot: Tensor  # (T,) bool: the last frame of a running request (its codes are in its slot)
    slot: Tensor  # (T,) int64: the slot of each token's request
    final: Tensor  # (R,) bool


class SlowAttention(nn.Module):
    def __init__(self, config: SlowARConfig, attend: nn.Module):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_local_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.attend = attend

    def forward(self, x: Tensor, rope: Tensor, ctx: object) -> Tensor:
        # x: (T, D); rope: (T, E/2, 2) -> (T, D)
        t = x.shape[0]
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(1, t, self.n_head, self.head_dim)
        k = k.view(1, t, self.n_local_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope[None]), apply_rope(k, rope[None])
        y = self.attend(q.reshape(t, q_size), k.reshape(t, kv_size), v.reshape(t, kv_size), ctx)
        return self.wo(y.reshape(t, q_size))


class SlowBlock(nn.Module):
    def __init__(self, config: SlowARConfig, attend: nn.Module):
        super().__init__()
        self.attention = SlowAttention(config, attend)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, ctx: object) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class SlowStack(nn.Module):
    """The slow AR with the parameter names of ``engine.dualar.model.SlowAR`` (so the checkpoint maps the same)."""

    rope: Tensor  # (max len, E/2, 2) float32
    codebook_offsets: Tensor  # (C,)

    def __init__(self, config: ModelConfig, attention: AttentionFactory):
        super().__init__()
        slow = config.slow
        self.config = slow
        self.num_codebooks = config.num_codebooks
        self.embeddings = nn.Embedding(slow.vocab_size, slow.dim)
        self.codebook_embeddings = nn.Embedding(config.num_codebooks * config.codebook_size, slow.dim)
        self.layers = nn.ModuleList(SlowBlock(slow, attention(i)) for i in range(slow.n_layer))
        self.norm = RMSNorm(slow.dim, slow.norm_eps)
        self.output = None if slow.tie_word_embeddings else nn.Linear(slow.dim, slow.vocab_size, bias=False)
        self.register_buffer("rope", torch.zeros(0), persistent=False)
        self.register_buffer("codebook_offsets", torch.zeros(0, dtype=torch.long), persistent=False)

    def embed(self, ids: Tensor, codes: Tensor, audio: Tensor) -> Tensor:
        # ids: (T,) token ids; codes: (T, C); audio: (T,) bool -> (T, D)
        x = self.embeddings(ids)
        summed = self.codebook_embeddings(codes + self.codebook_offsets).sum(dim=1)  # (T, D)
        return torch.where(audio[:, None], (x + summed) / math.sqrt(self.num_codebooks + 1), x)

    def head_weight(self) -> Tensor:
        return self.output.weight if self.output is not None else self.embeddings.weight


class S2ProCore(nn.Module):
    """Slow AR + fast AR + per-request sampling state, stepping a flattened batch of requests."""

    def __init__(self, config: ModelConfig, attention: AttentionFactory, *, max_rows: int, max_slots: int):
        super().__init__()
        if max_rows < 1 or max_slots < 2:
            raise ValueError("need max_rows >= 1 and max_slots >= 2 (slot 0 is the padding slot)")
        self.config = config
        self.max_rows, self.max_slots = max_rows, max_slots
        self.slow = SlowStack(config, attention)
        self.fast = FastAR(config.fast)
        c = config
        main_ids = main_token_ids(c.semantic_begin_id, c.semantic_end_id, c.im_end_id)
        self.end_column = int((main_ids == c.im_end_id).nonzero()[0, 0])
        self.register_buffer("main_ids", main_ids, persistent=False)  # (M,)
        self.register_buffer("fast_positions", torch.arange(c.num_codebooks), persistent=False)
        cb = c.num_codebooks

        def state(name: str, shape: tuple[int, ...], dtype: torch.dtype, fill: float = 0) -> None:
            self.register_buffer(name, torch.full(shape, fill, dtype=dtype), persistent=False)

        state("slot_main", (max_slots,), torch.long, c.semantic_begin_id)
        state("slot_codes", (max_slots, cb), torch.long)
        state("slot_window", (max_slots, RAS_WINDOW), torch.long, -1)
        state("slot_seed", (max_slots,), torch.long)
        state("slot_step", (max_slots,), torch.long)
        state("slot_temperature", (max_slots,), torch.float32, 1.0)
        state("slot_top_p", (max_slots,), torch.float32, 1.0)
        state("slot_top_k", (max_slots,), torch.long)
        state("slot_allow_end", (max_slots,), torch.bool, True)
        state("slot_fail", (max_slots,), torch.bool)
        state("row_slot", (max_rows,), torch.long)
        state("row_final", (max_rows,), torch.bool)
        state("out_frames", (max_rows, 2 + cb), torch.int32)
        self.register_buffer("main_head", torch.zeros(0), persistent=False)  # (M, D) head rows of main_ids
        self._extend: _ExtendInputs | None = None
        self._owner: dict[int, str | None] = {}  # slot -> rid of the request whose prompt initialized it
        self.failed_pass: str | None = None  # why the last prepared pass cannot run (every row fails), or None
        self.init_buffers()

    # ------------------------------------------------------------------------------------------ setup

    def init_buffers(self) -> None:
        """(Re)compute the derived buffers (RoPE tables on the CPU, bf16-rounded as trained) and allocate the fast
        AR cache. Buffers that exist are updated in place: a CUDA graph captured before keeps valid addresses."""
        device, dtype = self.slow.norm.weight.device, self.slow.norm.weight.dtype
        if device.type == "meta":
            return
        with torch.device("cpu"):
            tables = [rope_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
                      for cfg in (self.config.slow, self.config.fast)]
            offsets = torch.arange(self.config.num_codebooks) * self.config.codebook_size
        with torch.inference_mode(False), torch.no_grad():
            for stack, table in zip((self.slow, self.fast), tables, strict=True):
                _set_buffer(stack, "rope", table, device)
            _set_buffer(self.slow, "codebook_offsets", offsets, device)
            # the main-token rows of the output head, gathered once per weight load instead of every step
            _set_buffer(self, "main_head", self.slow.head_weight().detach()[self.main_ids].contiguous(), device)
            cache = self.fast.layers[0].attention.kv_cache if len(self.fast.layers) else None
            if cache is None or cache.k_cache.shape[0] < self.max_rows or cache.k_cache.dtype != dtype:
                self.fast.setup_caches(self.max_rows, self.config.num_codebooks, dtype)

    def load_published(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy checkpoint tensors (published names: ``text_model.model.*``, ``audio_decoder.*``) into the model.

        Every parameter must be given exactly with its shape; unknown names are skipped with a warning.
        """
        params = dict(self.named_parameters())
        by_published = {published_name(name): name for name in params}
        loaded: set[str] = set()
        unexpected, mismatched = [], []
        with torch.no_grad():
            for key, tensor in weights:
                name = by_published.get(key)
                if name is None:
                    unexpected.append(key)
                    continue
                param = params[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    mismatched.append(f"{key} {list(tensor.shape)} != {list(param.shape)}")
                    continue
                param.copy_(tensor.to(dtype=param.dtype))
                loaded.add(name)
        missing = sorted(published_name(n) for n in params.keys() - loaded)
        if unexpected:
            log.warning("ignoring %d unexpected checkpoint tensor(s): %s", len(unexpected), ", ".join(unexpected[:8]))
        if missing or mismatched:
            raise ValueError(
                "checkpoint does not fit the S2 Pro config: "
                + "; ".join(
                    f"{kind} ({len(items)}): {', '.join(items[:8])}"
                    for kind, items in (("missing", missing), ("shape mismatches", mismatched))
                    if items
                )
            )
        self.init_buffers()

    # ------------------------------------------------------------------------------------------ host side

    def prepare(self, batch: BatchInfo) -> None:
        """Before a forward pass (host side, eager): rows -> slots, and for an extend the per-token inputs.

        Never raises: SGLang's scheduler dies on any exception from the model, and takes Shoal with it. A request
        whose state cannot be set up (no plan, a slot outside ``max_slots``) gets a failed slot, so it alone ends
        with an error frame; a pass that cannot run at all (too many rows, anything unexpected) is recorded in
        :attr:`failed_pass` and :meth:`guarded_step` answers it with an error frame for every row.
        """
        self.failed_pass = None
        self._extend = None
        try:
            self._prepare(batch)
        except Exception as exc:  # noqa: BLE001 - contained: this pass's requests fail, the server lives
            log.exception("preparing a forward pass failed; its %d request(s) will end with an error", batch.rows)
            self.failed_pass = f"{type(exc).__name__}: {exc}"
            self._extend = None
            self.row_slot.zero_()  # every row on the failed padding slot: a replayed decode graph ends them too
            self.row_final.zero_()
            self.slot_fail[0] = True

    def _prepare(self, batch: BatchInfo) -> None:
        rows = batch.rows
        if rows > self.max_rows:
            raise RuntimeError(f"batch of {rows} requests exceeds the model's max_rows ({self.max_rows})")
        self.row_slot.zero_()
        self.row_final.zero_()
        if rows == 0:
            return
        slots = batch.slots.to(torch.long)
        outside = (slots < 1) | (slots >= self.max_slots)
        if bool(outside.any()):  # those rows read and write the padding slot 0, which is marked failed
            log.error("req_pool_index outside the model's %d slots (raise max_slots); ending those requests",
                      self.max_slots)
            slots = torch.where(outside, torch.zeros_like(slots), slots)
            self.slot_fail[0] = True
        self.row_slot[:rows].copy_(slots)
        if batch.decode:
            self.row_final[:rows] = True
            return
        self._extend = self._prepare_extend(batch)
        self.row_final[:rows].copy_(self._extend.final)

    def _prepare_extend(self, batch: BatchInfo) -> _ExtendInputs:
        c, device = self.config, self.row_slot.device
        slots = list(batch.slots_cpu) if batch.slots_cpu is not None else batch.slots.tolist()
        custom = batch.custom or [None] * batch.rows
        rids = batch.rids or [None] * batch.rows
        codes, audio, from_slot, token_slot, final = [], [], [], [], []
        inits: list[tuple[int, RequestPlan | None]] = []  # slots to (re)initialize, None = failed request
        for i in range(batch.rows):
            start, length, slot = int(batch.prefix_lens[i]), int(batch.extend_lens[i]), int(slots[i])
            slot = slot if 1 <= slot < self.max_slots else 0  # outside: the failed padding slot (see prepare)
            stop = start + length
            row_codes = np.zeros((length, c.num_codebooks), dtype=np.int64)
            row_audio, row_from_slot = np.zeros(length, dtype=bool), np.zeros(length, dtype=bool)
            try:
                plan = RequestPlan.from_custom(custom[i], c.num_codebooks)
            except ValueError as exc:
                log.error("request %s: %s", rids[i], exc)
                plan = None
            if slot == 0:
                plan = None
            if plan is not None and stop <= plan.prompt_len:  # (a chunk of) the prompt
                row_codes, row_audio = plan.window(start, stop)
                is_final = stop == plan.prompt_len
                if is_final:
                    inits.append((slot, plan))
                    self._owner[slot] = rids[i]
            elif plan is not None and length == 1 and start >= plan.prompt_len and self._owner.get(slot) == rids[i]:
                row_from_slot[:] = True  # a running request's next frame, scheduled inside an extend batch
                is_final = True
            else:  # a resumed (retracted) request or no plan: its generated frames are not known here
                log.error("request %s: cannot rebuild its state (extend %d..%d); ending it", rids[i], start, stop)
                inits.append((slot, None))
                self._owner[slot] = rids[i]
                is_final = True
            codes.append(row_codes)
            audio.append(row_audio)
            from_slot.append(row_from_slot)
            token_slot.append(np.full(length, slot, dtype=np.int64))
            final.append(is_final)
        inits = [(slot, plan) for slot, plan in inits if slot != 0]
        if inits:
            self._init_slots(inits)

        def dev(parts: list[np.ndarray]) -> Tensor:
            return torch.from_numpy(np.concatenate(parts)).to(device, non_blocking=True)

        return _ExtendInputs(
            token=batch.token,
            tokens=sum(int(n) for n in batch.extend_lens),
            codes=dev(codes),
            audio=dev(audio),
            from_slot=dev(from_slot),
            slot=dev(token_slot),
            final=torch.tensor(final, dtype=torch.bool).to(device),
        )

    def _init_slots(self, inits: list[tuple[int, RequestPlan | None]]) -> None:
        device = self.row_slot.device
        slots = [slot for slot, _ in inits]
        if min(slots) < 1 or max(slots) >= self.max_slots:
            raise RuntimeError(f"req_pool_index outside the model's {self.max_slots} slots; raise max_slots")
        index = torch.tensor(slots, dtype=torch.long).to(device)
        ok = [p for _, p in inits if p is not None]
        default = ok[0] if ok else None

        def column(values: list[Any], dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        plans = [p or default for _, p in inits]
        n = len(inits)
        self.slot_temperature.index_copy_(0, index, column([p.temperature if p else 1.0 for p in plans], torch.float32))
        self.slot_top_p.index_copy_(0, index, column([p.top_p if p else 1.0 for p in plans], torch.float32))
        self.slot_top_k.index_copy_(0, index, column([p.top_k if p else 0 for p in plans], torch.long))
        self.slot_seed.index_copy_(0, index, column([p.seed if p else 0 for p in plans], torch.long))
        self.slot_allow_end.index_copy_(0, index, column([p.allow_end if p else True for p in plans], torch.bool))
        self.slot_fail.index_copy_(0, index, column([p is None for _, p in inits], torch.bool))
        self.slot_step.index_fill_(0, index, 0)
        self.slot_window.index_copy_(0, index, torch.full((n, RAS_WINDOW), -1, dtype=torch.long, device=device))

    # ------------------------------------------------------------------------------------------ device side

    def guarded_step(self, input_ids: Tensor, positions: Tensor, ctx: object, *, decode: bool,
                     extend_lens: Tensor | None = None, token: object = None) -> StepOutput:
        """:meth:`step`, except that a failure (recorded by :meth:`prepare`, or raised here) ends every request of
        this pass with an error frame instead of reaching SGLang's scheduler (whose death would take Shoal's
        process with it). The next pass starts clean."""
        rows = input_ids.shape[0] if decode else (extend_lens.shape[0] if extend_lens is not None else 0)
        if self.failed_pass is None:
            try:
                return self.step(input_ids, positions, ctx, decode=decode, extend_lens=extend_lens, token=token)
            except Exception as exc:  # noqa: BLE001 - contained, see above
                if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise  # during SGLang's graph capture: a captured error output would fail that size forever
                log.exception("the model failed on a pass of %d request(s); they end with an error", rows)
                self.failed_pass = f"{type(exc).__name__}: {exc}"
        return self.failed_output(rows, input_ids.device)

    def failed_output(self, rows: int, device: torch.device) -> StepOutput:
        """Every row a forced ``<|im_end|>`` flagged FLAG_FAILED (SGLang stops the request; the cursor reports it)."""
        c = self.config
        frames = torch.zeros((rows, 2 + c.num_codebooks), dtype=torch.int32, device=device)
        frames[:, 0] = c.im_end_id
        frames[:, -1] = FLAG_FAILED
        kept = min(rows, self.max_rows)
        self.out_frames[:kept].copy_(frames[:kept])
        logits = torch.full((rows, c.slow.vocab_size), float("-inf"), device=device, dtype=torch.float32)
        logits[:, c.im_end_id] = 0.0
        return StepOutput(logits, frames, torch.zeros((rows, c.slow.dim), device=device))

    def step(
        self,
        input_ids: Tensor,
        positions: Tensor,
        ctx: object,
        *,
        decode: bool,
        extend_lens: Tensor | None = None,
        token: object = None,
    ) -> StepOutput:
        """One forward pass over T flattened tokens -> a frame per request row (tensor-only for ``decode``).

        ``extend_lens`` (R,) are the rows' new token counts of an extend pass; ``token`` identifies the pass that
        :meth:`prepare` was called for. An extend nobody prepared (SGLang's warm-up runs) reads every token as text
        and changes no request state.
        """
        c = self.config
        if decode:
            rows = input_ids.shape[0]
            slots = self.row_slot[:rows]
            codes, ids = self.slot_codes[slots], self.slot_main[slots]
            audio = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
            final = self.row_final[:rows]
        else:
            assert extend_lens is not None, "an extend pass needs extend_lens"
            rows = extend_lens.shape[0]
            ext = self._extend
            if ext is not None and ext.token is token and ext.tokens == input_ids.shape[0]:
                codes = torch.where(ext.from_slot[:, None], self.slot_codes[ext.slot], ext.codes)
                audio = ext.audio | ext.from_slot
                final = self.row_final[:rows]
            else:
                codes = torch.zeros(input_ids.shape[0], c.num_codebooks, dtype=torch.long, device=input_ids.device)
                audio = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                final = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
            ids = torch.where(audio, c.semantic_begin_id + codes[:, 0], input_ids.clamp(0, c.slow.vocab_size - 1))
            slots = self.row_slot[:rows]
        x = self.slow.embed(ids, codes, audio)
        rope = self.slow.rope[positions]
        for layer in self.slow.layers:
            x = layer(x, rope, ctx)
        hidden = self.slow.norm(x)
        if not decode:
            hidden = hidden[torch.cumsum(extend_lens, dim=0) - 1]  # each row's last token
        return self._frame(hidden, slots, final)

    def _frame(self, hidden: Tensor, slots: Tensor, final: Tensor) -> StepOutput:
        # hidden: (R, D); slots: (R,) slot of each row; final: (R,) bool rows whose frame counts (state advances)
        c = self.config
        rows = hidden.shape[0]
        allowed = F.linear(hidden, self.main_head)  # (R, M), head rows gathered once (init_buffers)
        params = SamplingParams(self.slot_temperature[slots], self.slot_top_p[slots], self.slot_top_k[slots])
        seed, step = self.slot_seed[slots], self.slot_step[slots]
        drawn = draw_main(
            allowed,
            self.main_ids,
            params,
            self.slot_window[slots],
            seed=seed,
            step=step,
            semantic_range=(c.semantic_begin_id, c.semantic_end_id),
            allow_end=self.slot_allow_end[slots],
            end_column=self.end_column,
        )
        fail = self.slot_fail[slots]
        main = torch.where(fail, torch.full_like(drawn.token, c.im_end_id), drawn.token)
        code = (main - c.semantic_begin_id).clamp(0, c.codebook_size - 1)  # <|im_end|> -> 0, as the reference
        positions = self.fast_positions
        self.fast(hidden[:, None], positions[:1])  # fast position 0: the seed (its logits are not used)
        codes = [code]
        for level in range(1, c.num_codebooks):
            logits = self.fast(self.fast.embeddings(code)[:, None], positions[level : level + 1])[:, -1]
            code = draw_residual(logits, params, seed=seed, step=step, level=level)
            codes.append(code)
        frame_codes = torch.stack(codes, dim=1)  # (R, C)
        flags = drawn.ras.long() * FLAG_RAS | fail.long() * FLAG_FAILED

        def keep(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(final.view(-1, *([1] * (new.dim() - 1))), new, old)

        self.slot_main.index_copy_(0, slots, keep(main, self.slot_main[slots]))
        self.slot_codes.index_copy_(0, slots, keep(frame_codes, self.slot_codes[slots]))
        self.slot_window.index_copy_(0, slots, keep(drawn.window, self.slot_window[slots]))
        self.slot_step.index_copy_(0, slots, keep(step + 1, step))
        frames = torch.cat([main[:, None], frame_codes, flags[:, None]], dim=1).to(torch.int32)
        self.out_frames[:rows].copy_(frames)
        logits = torch.full((rows, c.slow.vocab_size), float("-inf"), device=hidden.device, dtype=torch.float32)
        logits.scatter_(1, main[:, None], 0.0)
        return StepOutput(logits, frames, hidden)


def without_custom_processor(sampling_info: Any) -> Any:
    """A shallow copy of SGLang's ``SamplingBatchInfo`` with the custom logit processor switched off.

    Shoal's processor (``ShoalPassthrough``) exists only to carry each request's plan to the model's extend pass;
    on every later step SGLang would still ``index_select`` and ``index_copy_`` the full (R, V) logits around it.
    A decode pass gets this copy instead (the running batch keeps its own object, so a request joining later
    still brings its plan)."""
    if sampling_info is None or not getattr(sampling_info, "has_custom_logit_processor", False):
        return sampling_info
    clone = copy.copy(sampling_info)
    clone.has_custom_logit_processor = False
    clone.custom_logit_processor = None
    return clone


def _set_buffer(module: nn.Module, name: str, value: Tensor, device: torch.device) -> None:
    current = getattr(module, name)
    if current.shape == value.shape and current.device == device and current.dtype == value.dtype:
        current.copy_(value)
    else:
        setattr(module, name, value.to(device))
