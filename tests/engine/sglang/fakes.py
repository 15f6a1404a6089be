"""A CPU stand-in for the parts of SGLang the model touches: RadixAttention over a per-request KV cache, and a
tiny runner that feeds :class:`engine.sglang.core.S2ProCore` batches shaped as SGLang's (flattened tokens, extend
and decode passes, prefix reuse, CUDA-graph padding) through the entry points the model class uses.

:class:`FakeSGLangEngine` also reproduces what SGLang 0.5.23 does to the process that starts it (see
``engine.sglang.process``): with ``children`` it runs real child processes watched by a SIGQUIT watchdog (a child
that exits non-zero, a SIGTERM'd one included, makes it SIGQUIT this process), Engine() from the main thread sets a
SIGQUIT handler that kills the process tree, the first request from the main thread puts SIGTERM / SIGQUIT
handlers on the event loop (SIGTERM: kill the children and ``sys.exit`` from the loop), and an exception in the
model kills its scheduler: every request in flight ends, every later one is refused.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.dualar.config import ModelConfig
from engine.sglang.convert import FRAME_KEY, SGLangRequest
from engine.sglang.core import BatchInfo, S2ProCore


@dataclass
class KVPool:
    """Keys and values per (layer, slot), contiguous: what SGLang's paged pool + req_to_token give RadixAttention."""

    k: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    v: dict[tuple[int, int], Tensor] = field(default_factory=dict)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """A radix-cache hit: slot ``dst`` starts with the first ``length`` positions of ``src``."""
        for (layer, slot) in list(self.k):
            if slot == src:
                self.k[layer, dst] = self.k[layer, src][:length].clone()
                self.v[layer, dst] = self.v[layer, src][:length].clone()

    def length(self, slot: int) -> int:
        return next((t.shape[0] for (layer, s), t in self.k.items() if s == slot and layer == 0), 0)


@dataclass
class Pass:
    """The context a forward pass hands each attention layer (SGLang: the ForwardBatch)."""

    pool: KVPool
    slots: Sequence[int]
    starts: Sequence[int]  # first position of each row's new tokens
    lens: Sequence[int]  # new tokens per row (0 for CUDA-graph padding rows)


class FakeRadixAttention(nn.Module):
    def __init__(self, layer_id: int, n_head: int, n_kv: int, head_dim: int):
        super().__init__()
        self.layer_id, self.n_head, self.n_kv, self.head_dim = layer_id, n_head, n_kv, head_dim

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: Pass) -> Tensor:
        out = torch.zeros_like(q)
        offset = 0
        for slot, start, n in zip(ctx.slots, ctx.starts, ctx.lens, strict=True):
            if n == 0:
                offset += 1  # a padding row of a captured decode graph: one token, no cache
                continue
            key = (self.layer_id, slot)
            cached_k = ctx.pool.k.get(key, k.new_zeros(0, self.n_kv, self.head_dim))
            cached_v = ctx.pool.v.get(key, v.new_zeros(0, self.n_kv, self.head_dim))
            assert cached_k.shape[0] == start, f"slot {slot} holds {cached_k.shape[0]} positions, not {start}"
            keys = torch.cat([cached_k, k[offset : offset + n].view(n, self.n_kv, self.head_dim)])
            values = torch.cat([cached_v, v[offset : offset + n].view(n, self.n_kv, self.head_dim)])
            ctx.pool.k[key], ctx.pool.v[key] = keys, values
            queries = q[offset : offset + n].view(n, self.n_head, self.head_dim)
            mask = torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]  # (n, L)
            y = F.scaled_dot_product_attention(
                queries.transpose(0, 1)[None],
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                attn_mask=mask,
                enable_gqa=True,
            )  # (1, H, n, E)
            out[offset : offset + n] = y[0].transpose(0, 1).reshape(n, -1)
            offset += n
        return out


def make_core(config: ModelConfig, *, max_rows: int = 8, max_slots: int = 16) -> S2ProCore:
    slow = config.slow

    def attention(layer_id: int) -> nn.Module:
        return FakeRadixAttention(layer_id, slow.n_head, slow.n_local_heads, slow.head_dim)

    return S2ProCore(config, attention, max_rows=max_rows, max_slots=max_slots)


@dataclass
class Running:
    slot: int
    request: SGLangRequest
    position: int  # next position to write (prompt length + frames so far - 1 after the first frame)
    frames: list[np.ndarray] = field(default_factory=list)  # (2 + C,) rows as the model emitted them


class MiniRunner:
    """Drives the core the way SGLang's scheduler does, without SGLang."""

    def __init__(self, core: S2ProCore):
        self.core = core
        self.pool = KVPool()
        self.hidden: list[Tensor] = []  # (R, D) slow hidden state of every pass, in order

    @torch.inference_mode()
    def extend(self, rows: Sequence[tuple[int, SGLangRequest, int, int]]) -> list[np.ndarray]:
        """rows: (slot, request, start, stop) -> the frame of each row (meaningful when stop ends the prompt)."""
        ids, positions, lens, starts, slots, custom, rids = [], [], [], [], [], [], []
        for slot, request, start, stop in rows:
            ids += request.input_ids[start:stop]
            positions += range(start, stop)
            lens.append(stop - start)
            starts.append(start)
            slots.append(slot)
            custom.append(request.sampling_params["custom_params"])
            rids.append(request.rid)
        ctx = Pass(self.pool, slots, starts, lens)
        info = BatchInfo(
            decode=False, rows=len(rows), slots=torch.tensor(slots), slots_cpu=slots, prefix_lens=starts,
            extend_lens=lens, custom=custom, rids=rids, token=ctx,
        )
        self.core.prepare(info)
        out = self.core.guarded_step(torch.tensor(ids), torch.tensor(positions), ctx, decode=False,
                                     extend_lens=torch.tensor(lens), token=ctx)
        self.hidden.append(out.hidden)
        return [row.numpy() for row in out.frames]

    @torch.inference_mode()
    def decode(self, rows: Sequence[tuple[int, int, int]], *, pad_to: int | None = None) -> list[np.ndarray]:
        """rows: (slot, position, last main token) -> each row's next frame; ``pad_to`` pads like a CUDA graph."""
        slots = [slot for slot, _, _ in rows]
        positions = [pos for _, pos, _ in rows]
        ids = [main for _, _, main in rows]
        padding = (pad_to or len(rows)) - len(rows)
        info = BatchInfo(decode=True, rows=len(rows), slots=torch.tensor(slots), slots_cpu=slots)
        self.core.prepare(info)
        ctx = Pass(self.pool, slots + [0] * padding, positions + [0] * padding, [1] * len(rows) + [0] * padding)
        out = self.core.guarded_step(torch.tensor(ids + [0] * padding), torch.tensor(positions + [0] * padding), ctx,
                                     decode=True)
        self.hidden.append(out.hidden[: len(rows)])
        return [row.numpy() for row in out.frames[: len(rows)]]

    def generate(self, request: SGLangRequest, slot: int, frames: int) -> np.ndarray:
        """One request alone, prefilled whole, then decoded: (frames, 2 + C) rows."""
        n = request.prompt_len
        out = [self.extend([(slot, request, 0, n)])[0]]
        for i in range(frames - 1):
            out.append(self.decode([(slot, n + i, int(out[-1][0]))])[0])
        return np.stack(out)


# ------------------------------------------------------------------------------------------------ an engine


@dataclass
class _Request:
    rid: str
    input_ids: list[int]
    sampling_params: dict
    queue: asyncio.Queue
    slot: int = 0
    cached: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    done: bool = False


def _kill_process_tree_with_parent() -> None:
    """SGLang's ``kill_process_tree(os.getpid())``: the parent goes too."""
    os.kill(os.getpid(), signal.SIGKILL)


def _sleep_forever() -> None:  # a stand-in scheduler process
    signal.set_wakeup_fd(-1)  # forked: start with default signal handling, as SGLang's spawned processes do
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    while True:
        time.sleep(3600)


class FakeWatchdog:
    """SGLang's ``SubprocessWatchdog``: SIGQUIT to this process once a watched child exits with a non-zero code."""

    def __init__(self, processes: list, interval: float = 0.1) -> None:
        self.processes, self.interval = processes, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="subprocess-watchdog")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for process in self.processes:
                if not process.is_alive() and process.exitcode != 0:
                    os.kill(os.getpid(), signal.SIGQUIT)
                    return


class FakeTokenizerManager:
    """The tokenizer manager's process-level behaviour: abort, the watchdog it holds, its loop and signal set-up."""

    def __init__(self, engine: FakeSGLangEngine) -> None:
        self.engine = engine
        self._subprocess_watchdog: FakeWatchdog | None = None
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.gracefully_exit = False

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.engine.abort(rid, abort_all)

    def auto_create_handle_loop(self) -> None:
        if self.event_loop is not None:
            return
        self.event_loop = loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGTERM, self._sigterm)
            loop.add_signal_handler(signal.SIGQUIT, _kill_process_tree_with_parent)

    def _sigterm(self) -> None:
        # SGLang drains, then kills every child of the process and exits from inside the loop
        self.gracefully_exit = True
        for process in multiprocessing.active_children():
            process.kill()
        sys.exit(0)


class FakeSGLangEngine:
    """``sglang.Engine`` as the synthesizer uses it (``async_generate``, ``tokenizer_manager.abort_request``,
    ``get_all_child_pids``, ``shutdown``), in process on the CPU: continuous batching of :class:`S2ProCore` steps, a
    prefix cache over key sequences (a finished request leaves prompt + outputs but its last, like SGLang's radix
    cache), streamed outputs with the model's frames as per-token ``meta_info`` lists, abort. Built by the
    synthesizer's launcher. ``children`` > 0 adds SGLang's process and signal behaviour (see the module)."""

    def __init__(self, core: S2ProCore, *, cache_entries: int = 64, children: int = 0):
        self.core, self.runner = core, MiniRunner(core)
        self.tokenizer_manager = FakeTokenizerManager(self)
        self.crashed: str | None = None  # the scheduler died of a model exception
        self.children: list = []
        if children:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGQUIT, lambda *_: _kill_process_tree_with_parent())
            context = multiprocessing.get_context("fork")
            self.children = [context.Process(target=_sleep_forever, daemon=True) for _ in range(children)]
            for process in self.children:
                process.start()
            self.tokenizer_manager._subprocess_watchdog = FakeWatchdog(self.children)
        atexit.register(self.shutdown)
        self.waiting: list[_Request] = []
        self.running: dict[str, _Request] = {}
        self.free_slots = list(range(1, core.max_slots))
        self.cache: list[tuple[list[int], int]] = []  # (keys, slot holding their KV), oldest first
        self.cache_entries = cache_entries
        self.kwargs: dict = {}
        self.steps = 0
        self._loop: asyncio.Task | None = None

    # the Engine API
    async def async_generate(self, input_ids, sampling_params, stream=False, rid=None, custom_logit_processor=None):
        self.tokenizer_manager.auto_create_handle_loop()
        if self.crashed is not None:
            raise RuntimeError(f"the scheduler is dead: {self.crashed}")
        request = _Request(rid or f"fake-{len(self.running)}", list(input_ids), dict(sampling_params), asyncio.Queue())
        self.waiting.append(request)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.ensure_future(self._run())
        if stream:
            return self._stream(request)
        last = None
        async for out in self._stream(request):
            last = out
        return last

    def abort(self, rid: str = "", abort_all: bool = False) -> None:
        for request in [*self.waiting, *self.running.values()]:
            if request.rid == rid or abort_all:
                self._finish(request, {"type": "abort", "message": "aborted"}, keep=False)

    def get_all_child_pids(self) -> list[int]:
        return [p.pid for p in self.children]

    def shutdown(self) -> None:
        """SGLang's: stop the watchdog, then kill the children (SGLang kills every child of the process)."""
        if self._loop is not None:
            self._loop.cancel()
        if self.tokenizer_manager._subprocess_watchdog is not None:
            self.tokenizer_manager._subprocess_watchdog.stop()
        for process in self.children:
            if process.is_alive():
                process.kill()

    # the scheduler
    async def _stream(self, request: _Request):
        while True:
            out = await request.queue.get()
            yield out
            if out["meta_info"]["finish_reason"] is not None:
                return

    async def _run(self) -> None:
        try:
            await self._schedule()
        except Exception as exc:  # SGLang's scheduler process dies of it: nothing in flight survives
            self.crashed = f"{type(exc).__name__}: {exc}"
            for request in [*self.waiting, *self.running.values()]:
                self._finish(request, {"type": "abort", "message": f"scheduler died: {self.crashed}"}, keep=False)

    async def _schedule(self) -> None:
        while self.waiting or self.running:
            if self.waiting:
                batch, self.waiting = self.waiting, []
                rows = []
                for request in batch:
                    request.slot = self.free_slots.pop(0)
                    request.cached = self._match(request)
                    rows.append((request.slot, request, request.cached, len(request.input_ids)))
                    self.running[request.rid] = request
                for request, frame in zip(batch, self.runner.extend(rows), strict=True):
                    self._emit(request, frame)
            else:
                live = list(self.running.values())
                frames = self.runner.decode(
                    [(r.slot, len(r.input_ids) + len(r.rows) - 1, int(r.rows[-1][0])) for r in live]
                )
                for request, frame in zip(live, frames, strict=True):
                    self._emit(request, frame)
            self.steps += 1
            await asyncio.sleep(0)

    def _match(self, request: _Request) -> int:
        """Longest cached prefix (at most all but the last prompt position), copied into the request's slot."""
        best, source = 0, None
        for keys, slot in self.cache:
            n = 0
            limit = min(len(keys), len(request.input_ids) - 1)
            while n < limit and keys[n] == request.input_ids[n]:
                n += 1
            if n > best:
                best, source = n, slot
        if source is not None:
            self.runner.pool.copy_prefix(source, request.slot, best)
        return best

    def _emit(self, request: _Request, frame: np.ndarray) -> None:
        if request.done:
            return
        request.rows.append(frame)
        params = request.sampling_params
        finish = None
        if int(frame[0]) in params.get("stop_token_ids", []):
            finish = {"type": "stop", "matched": int(frame[0])}
        elif len(request.rows) >= params["max_new_tokens"]:
            finish = {"type": "length", "length": params["max_new_tokens"]}
        if finish is not None:
            self._finish(request, finish, keep=True)
        else:
            request.queue.put_nowait(self._output(request, None))

    def _finish(self, request: _Request, finish: dict, keep: bool) -> None:
        if request.done:
            return
        request.done = True
        self.running.pop(request.rid, None)
        if request in self.waiting:
            self.waiting.remove(request)
        elif keep:  # like SGLang: the prompt and every output token but the last, keyed as the tokens were
            self.cache.append((request.input_ids + [int(r[0]) for r in request.rows[:-1]], request.slot))
            while len(self.cache) > self.cache_entries:
                _, slot = self.cache.pop(0)
                self._free(slot)
        else:
            self._free(request.slot)
        request.queue.put_nowait(self._output(request, finish))

    def _free(self, slot: int) -> None:
        if slot:
            for key in [k for k in self.runner.pool.k if k[1] == slot]:
                del self.runner.pool.k[key], self.runner.pool.v[key]
            self.free_slots.append(slot)

    def _output(self, request: _Request, finish: dict | None) -> dict:
        return {
            "output_ids": [int(r[0]) for r in request.rows],
            "meta_info": {
                "id": request.rid,
                "finish_reason": finish,
                "prompt_tokens": len(request.input_ids),
                "cached_tokens": request.cached,
                "completion_tokens": len(request.rows),
                FRAME_KEY: list(request.rows),
            },
        }


def shadow_launcher(children: int = 0):  # -> a Launcher for SGLangSynthesizer
    """Starts the stand-in from the arguments SGLang would get: the shadow checkpoint's config and linked weights."""
    import json
    from pathlib import Path

    from engine.dualar.loader import load_state_dict

    def launch(kwargs: dict) -> FakeSGLangEngine:
        shadow = Path(kwargs["model_path"])
        raw = json.loads((shadow / "config.json").read_text())
        core = make_core(ModelConfig.from_dict(raw["shoal_s2pro"]), max_rows=raw["shoal_runtime"]["max_rows"],
                         max_slots=512)
        core.load_published(load_state_dict(shadow, progress=False).items())
        engine = FakeSGLangEngine(core.eval(), children=children)
        engine.kwargs = kwargs
        return engine

    return launch
