"""S2 Pro served by SGLang on a GPU: the shared front end (``engine.dualar.frontend``) over SGLang as its frame source.

``start`` checks the machine (a CUDA GPU and the pinned sglang, else :class:`~engine.sglang.guard.BackendUnavailable`
naming what is missing), writes the shadow checkpoint SGLang loads, and starts ``sglang.Engine`` (its scheduler and
detokenizer processes; the tokenizer manager runs on this process's event loop). The front end trims the history,
builds the prompt, sets the frame budget and decodes the frames in growing chunks, exactly as for the torch backend;
:class:`SGLangFrames`, the frame source, for each request:

1. turns the prompt into its radix keys and plan (``convert``);
2. streams the request through ``Engine.async_generate``; SGLang batches it with every other running request, the
   model makes one frame per step for all of them inside one CUDA graph, and each frame comes back per step;
3. when the consumer stops (closes the stream, or its task is cancelled), aborts the request at once: SGLang drops
   it before its next step;
4. after the turn, re-keys it in the cache (``warm_cache``): a one-token request whose prompt is this turn's prompt
   plus its audio under frame keys, so the next turn of the conversation finds everything through this turn cached
   (see ``keys``). The next request of the same session waits briefly for it.

Generation is not paced by the consumer (SGLang has no per-request pause); a turn is bounded by ``max_frames`` and
by a frames-per-character guard, and a barge-in stops it within one step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.base import EngineError, Sampling
from engine.dualar.frontend import FrontEndConfig, Loaded, S2ProSynthesizer
from engine.sglang.checkpoint import MODEL_PACKAGE, ShadowCheckpoint, write_shadow_checkpoint
from engine.sglang.convert import FrameCursor, SGLangRequest, TokenIds, build_request
from engine.sglang.guard import require_sglang_backend
from engine.sglang.process import ChildMonitor, keep_signals, stop_engine, take_over

__all__ = ["SGLangConfig", "SGLangFrames", "SGLangSynthesizer", "engine_kwargs", "register_model_package"]

log = logging.getLogger(__name__)

_ATTENTION_BACKENDS = ("fa3", "fa4", "flashinfer", "triton", "torch_native")


@dataclass(frozen=True)
class SGLangConfig:
    model: str | None = None  # S2 Pro checkpoint directory or Hugging Face repo id
    codec: str | None = None  # codec.pth; default <model dir>/codec.pth (a preset without one: random codec)
    preset: str | None = None  # random weights of an engine.dualar preset instead of a checkpoint (benchmarks)
    tokenizer: str | None = None  # tokenizer.json; default the checkpoint's (a preset: byte level)
    gpu: int = 0
    dtype: str = "bfloat16"
    attention_backend: str = "fa3"  # FlashAttention, as the model was trained (flashinfer ends turns early)
    max_seq_len: int = 8192  # context: voices + history + the new turn
    max_running_requests: int = 64
    cuda_graph_max_bs: int = 64
    mem_fraction_static: float = 0.80  # of GPU memory for weights + KV cache; the rest: graphs, codec
    chunked_prefill_size: int = 8192
    first_chunk_frames: int = 2  # the first audio chunk (1-4 frames: time to first audio)
    max_chunk_frames: int = 16
    queue_chunks: int = 2  # decoded chunks waiting for the consumer
    context_budget: int | None = None  # history positions kept in a prompt; default max_seq_len // 2
    frames_per_char: float = 6.0  # runaway guard: at most frame_budget_base + frames_per_char * characters
    frame_budget_base: int = 32
    warm_cache: bool = True  # re-key each finished turn in the radix cache for the session's next turn
    warm_wait_s: float = 0.5  # how long a session's next request waits for that
    ignore_end: bool = False  # never draw <|im_end|> (fixed-length benchmarks with random weights)
    codec_threads: int = 4
    work_dir: str | None = None  # where the shadow checkpoint goes (default: a temporary directory)
    log_level: str = "error"  # SGLang's

    def __post_init__(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise ValueError("give exactly one of model (a checkpoint) and preset (random weights)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(_ATTENTION_BACKENDS)}")
        if not 64 <= self.max_seq_len <= 1 << 20:
            raise ValueError("max_seq_len must be within [64, 1048576]")
        if not 1 <= self.max_running_requests <= 4096 or not 1 <= self.cuda_graph_max_bs <= 4096:
            raise ValueError("max_running_requests and cuda_graph_max_bs must be within [1, 4096]")
        if not 0.1 <= self.mem_fraction_static <= 0.95:
            raise ValueError("mem_fraction_static must be within [0.1, 0.95]")
        if not 1 <= self.first_chunk_frames <= 4:
            raise ValueError("first_chunk_frames must be within [1, 4]")
        if self.codec_threads < 1 or self.gpu < 0 or self.warm_wait_s < 0:
            raise ValueError("codec_threads must be >= 1, gpu >= 0, warm_wait_s >= 0")
        if self.context_budget is not None and not 1 <= self.context_budget < self.max_seq_len:
            raise ValueError("context_budget must be within [1, max_seq_len)")
        self.front_end()  # the shared settings are checked there
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < 256:
            raise ValueError("chunked_prefill_size must be -1 (off) or >= 256")

    def front_end(self) -> FrontEndConfig:
        return FrontEndConfig(first_chunk_frames=self.first_chunk_frames, max_chunk_frames=self.max_chunk_frames,
                              queue_chunks=self.queue_chunks, context_budget=self.context_budget,
                              frames_per_char=self.frames_per_char, frame_budget_base=self.frame_budget_base,
                              decode_threads=self.codec_threads)

    @property
    def max_rows(self) -> int:
        return max(self.max_running_requests, self.cuda_graph_max_bs) + 8

    @property
    def max_slots(self) -> int:
        return 4 * self.max_running_requests + 64


def engine_kwargs(config: SGLangConfig, shadow: ShadowCheckpoint) -> dict[str, Any]:
    """The ``sglang.Engine`` arguments (ServerArgs field names of sglang 0.5.23)."""
    return {
        "model_path": str(shadow.path),
        "load_format": shadow.load_format,
        "skip_tokenizer_init": True,  # Shoal sends radix keys as input_ids and reads frames, never text
        "dtype": config.dtype,
        "context_length": shadow.context_length,
        "attention_backend": config.attention_backend,
        "mem_fraction_static": config.mem_fraction_static,
        "max_running_requests": config.max_running_requests,
        "cuda_graph_max_bs_decode": config.cuda_graph_max_bs,
        "disable_prefill_cuda_graph": True,  # an extend reads inputs prepared on the host; decode is graphed
        "chunked_prefill_size": config.chunked_prefill_size,
        "page_size": 1,  # prefixes reused to the position, not rounded down to a page
        "enable_custom_logit_processor": True,  # carries each request's plan to the model (custom_params)
        "incremental_streaming_output": False,  # cumulative meta_info lists: the only kind FrameCursor reads
        "stream_interval": 1,
        "tp_size": 1,  # one engine per GPU; the model's linear layers are not sharded
        "base_gpu_id": config.gpu,
        "random_seed": 0,
        "log_level": config.log_level,
    }


def register_model_package() -> Any:
    """Make Shoal's model class known to SGLang, here and in the processes SGLang spawns; returns the class.

    SGLang imports the package named by ``SGLANG_EXTERNAL_MODEL_PACKAGE`` in each of its processes and skips a
    module that fails to import with a warning (hidden at ``log_level="error"``), so a broken model module used to
    surface as "architecture not supported". Here the package is imported first, and a failure is an EngineError
    that names its cause; the package's ``__init__`` imports the module eagerly, so in SGLang's processes the
    cause is raised too instead of being skipped."""
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = MODEL_PACKAGE
    try:
        module = importlib.import_module(f"{MODEL_PACKAGE}.shoal_s2pro")
    except Exception as exc:
        raise EngineError(
            f"cannot import Shoal's SGLang model package {MODEL_PACKAGE} ({type(exc).__name__}: {exc}); "
            f"SGLang would report it as an unsupported architecture"
        ) from exc
    from sglang.srt.models.registry import ModelRegistry

    from engine.sglang.checkpoint import ARCHITECTURE

    model_class = module.EntryClass
    ModelRegistry.models.setdefault(ARCHITECTURE, model_class)  # this process too, whatever came first
    registered = ModelRegistry.models.get(ARCHITECTURE)
    if registered is not model_class:
        raise EngineError(f"SGLang's registry holds {registered!r} under {ARCHITECTURE}, not Shoal's model class")
    return model_class


Launcher = Callable[[dict[str, Any]], Any]  # engine kwargs -> an object with sglang.Engine's methods used here


class SGLangSynthesizer(S2ProSynthesizer):
    """S2 Pro on SGLang. ``codec``: an ``engine.dualar.codec.Codec`` to use instead of loading one. ``launcher``:
    starts the engine from :func:`engine_kwargs` (default: ``sglang.Engine``, after checking the GPU and sglang); the
    tests give an in-process stand-in that runs the same model code on the CPU."""

    def __init__(self, config: SGLangConfig, *, codec: Any = None, launcher: Launcher | None = None) -> None:
        self.config = config
        self.frames = SGLangFrames(config, codec=codec, launcher=launcher)
        super().__init__(self.frames, config.front_end())

    @property
    def _engine(self) -> Any:
        return self.frames.engine

    @property
    def _ids(self) -> TokenIds | None:
        return self.frames.ids

    @property
    def last_usage(self) -> collections.OrderedDict[str, tuple[int, int]]:
        """Per session (or request id): prompt positions and how many of them came from SGLang's radix cache."""
        return self.frames.last_usage

    async def wait_warm(self) -> None:
        """Until every cache warm-up in flight is done (benchmarks and tests)."""
        await self.frames.wait_warm()


class SGLangFrames:
    """The frame source on SGLang: one ``sglang.Engine`` (its own processes), a request per stream."""

    label = "s2pro (sglang)"

    def __init__(self, config: SGLangConfig, *, codec: Any = None, launcher: Launcher | None = None) -> None:
        self.config = config
        self._launcher = launcher
        self._codec = codec  # engine.dualar.codec.Codec; given, or loaded at start
        self.engine: Any = None
        self.ids: TokenIds | None = None
        self._error: str | None = None  # "closed", or SGLang died
        self._monitor: ChildMonitor | None = None
        self._prompts: Any = None  # engine.dualar.prompt.PromptBuilder
        self._processor: str | None = None
        self._shadow_dir: Path | None = None
        self._owns_shadow_dir = False
        self._closed = asyncio.Event()  # set by aclose or SGLang's death: ends every stream in flight
        self._inflight: set[str] = set()
        self._warm: dict[str, asyncio.Task[None]] = {}
        self._counters: collections.Counter[str] = collections.Counter()
        self.last_usage: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()

    # ---------------------------------------------------------------------------------------- lifecycle

    def bind_loop(self) -> None:
        """On the serving loop's thread: SGLang's loop set-up with Shoal's signal handlers kept, and Shoal's monitor
        of SGLang's processes instead of SGLang's SIGQUIT watchdog (``process``)."""
        if self.engine is None or self._monitor is not None:
            return
        loop = asyncio.get_running_loop()

        def died(message: str) -> None:  # on the monitor's thread
            loop.call_soon_threadsafe(self._engine_died, message)

        self._monitor = take_over(self.engine, died)

    def _engine_died(self, message: str) -> None:
        if self._error is not None:
            return
        log.error("the SGLang engine died (%s); its requests fail, the engine reports unhealthy", message)
        self._error = f"SGLang engine died: {message}"
        self._closed.set()

    def load(self) -> Loaded:
        """Blocking: shadow checkpoint, tokenizer, codec, then the SGLang engine (minutes: weights, CUDA graphs).

        Raises :class:`BackendUnavailable` / EngineError.
        """
        if self._launcher is None:
            require_sglang_backend()
        from engine.dualar.prompt import PromptBuilder, load_tokenizer

        cfg = self.config
        raw, source, model_dir = self._raw_config()
        self._shadow_dir = Path(cfg.work_dir) / "sglang-checkpoint" if cfg.work_dir else Path(
            tempfile.mkdtemp(prefix="shoal-sglang-")
        )
        self._owns_shadow_dir = cfg.work_dir is None
        shadow = write_shadow_checkpoint(
            self._shadow_dir,
            raw,
            source=source,
            context_length=cfg.max_seq_len,
            max_rows=cfg.max_rows,
            max_slots=cfg.max_slots,
        )
        model_config = shadow.config
        self.ids = TokenIds.of(model_config)
        if cfg.tokenizer or model_dir is not None:
            tokenizer = load_tokenizer(cfg.tokenizer or model_dir)  # type: ignore[arg-type]
        else:
            from engine.sglang.presets import byte_level_tokenizer

            tokenizer = byte_level_tokenizer(model_config.num_semantic_tokens)
        self._prompts = PromptBuilder(
            tokenizer,
            semantic_begin_id=model_config.semantic_begin_id,
            num_codebooks=model_config.num_codebooks,
            codebook_size=model_config.codebook_size,
        )
        if self._codec is None:
            self._codec = self._load_codec(model_dir, f"cuda:{cfg.gpu}")
        self.engine = (self._launcher or self._launch_sglang)(engine_kwargs(cfg, shadow))
        return Loaded(self._prompts, self._codec, shadow.context_length)
    def _launch_sglang(self, kwargs: dict[str, Any]) -> Any:
        import sglang

        model_class = register_model_package()
        self._processor = model_class.passthrough.to_str()
        with keep_signals():  # from the main thread, Engine() would take SIGQUIT over for the whole process
            return sglang.Engine(**kwargs)

    def _raw_config(self) -> tuple[dict[str, Any], Path | None, Path | None]:
        """The S2 Pro config.json document, the weights' directory and the checkpoint directory (None: preset)."""
        cfg = self.config
        if cfg.preset is not None:
            from engine.sglang.presets import preset_raw_config

            try:
                return preset_raw_config(cfg.preset), None, None
            except ValueError as exc:
                raise EngineError(str(exc)) from None
        from engine.dualar.loader import ModelLoadError, resolve_model_path

        try:
            path = resolve_model_path(cfg.model)  # type: ignore[arg-type]
        except ModelLoadError as exc:
            raise EngineError(str(exc)) from None
        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot read {path / 'config.json'}: {exc}") from None
        return raw, path, path

    def _load_codec(self, model_dir: Path | None, device: str) -> Any:
        from engine.dualar.codec import load_codec

        if self.config.codec:
            path = Path(self.config.codec)
        elif model_dir is not None:
            path = model_dir / "codec.pth"
        else:
            from engine.sglang.presets import random_codec

            return random_codec(device)
        if not path.is_file():
            raise EngineError(f"codec checkpoint {path} not found (give --codec PATH)")
        return load_codec(path, device=device, dtype=torch.float32)

    async def aclose(self) -> None:
        if self._error == "closed":
            return
        self._error = "closed"
        self._closed.set()
        for task in list(self._warm.values()):
            task.cancel()
        engine, self.engine = self.engine, None
        monitor, self._monitor = self._monitor, None
        if engine is not None:
            for rid in list(self._inflight):
                self._abort(engine, rid)
            await asyncio.get_running_loop().run_in_executor(None, stop_engine, engine, monitor)
        if self._owns_shadow_dir and self._shadow_dir is not None:
            shutil.rmtree(self._shadow_dir, ignore_errors=True)

    def health(self) -> str | None:
        return self._error

    def stats(self) -> dict[str, float]:
        out = {f"sglang_{name}": float(value) for name, value in self._counters.items()}
        out["sglang_requests_running"] = float(len(self._inflight))
        return out

    # ---------------------------------------------------------------------------------------- synthesis

    async def open(self, prompt: torch.Tensor, sampling: Sampling, *, session: str | None) -> _SGLangStream:
        if self._error is not None or self.engine is None or self.ids is None:
            raise EngineError(f"s2pro (sglang) engine unavailable: {self._error or 'not started'}")
        await self._await_warm(session)
        sreq = build_request(prompt, sampling, self.ids, allow_end=not self.config.ignore_end)
        self._counters["requests_total"] += 1
        self._inflight.add(sreq.rid)
        return _SGLangStream(self, sreq, prompt, session or sreq.rid)

    async def _outputs(self, sreq: SGLangRequest) -> AsyncIterator[Mapping[str, Any]]:
        """SGLang's output dicts for one request, until it ends or the engine is closed."""
        stream = await self.engine.async_generate(
            input_ids=sreq.input_ids,
            sampling_params=sreq.sampling_params,
            stream=True,
            rid=sreq.rid,
            custom_logit_processor=self._processor,
        )
        closed = asyncio.ensure_future(self._closed.wait())
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait({step, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return
                try:
                    out = step.result()
                except StopAsyncIteration:
                    return
                yield out
        finally:
            closed.cancel()
            if step is not None and not step.done():
                step.cancel()  # stops waiting on SGLang's stream (the request itself is aborted by the caller)
            else:
                with contextlib.suppress(Exception):  # SGLang's stream of a finished or aborted request
                    await stream.aclose()

    def _abort(self, engine: Any, rid: str) -> None:
        try:
            engine.tokenizer_manager.abort_request(rid)
            self._counters["aborts_total"] += 1
        except Exception:  # the engine is going away; nothing left to stop
            log.debug("abort of %s failed", rid, exc_info=True)

    def _record_usage(self, key: str, prompt_tokens: int | None, cached_tokens: int | None) -> None:
        if prompt_tokens is None:
            return
        cached = int(cached_tokens or 0)
        self._counters["prompt_tokens_total"] += int(prompt_tokens)
        self._counters["cached_tokens_total"] += cached
        self.last_usage[key] = (int(prompt_tokens), cached)
        self.last_usage.move_to_end(key)
        while len(self.last_usage) > 1024:
            self.last_usage.popitem(last=False)

    # ---------------------------------------------------------------------------------------- cache warming

    def _schedule_warm(self, key: str, prompt: torch.Tensor, codes: np.ndarray) -> None:
        """Prefill prompt + this turn's audio + ``<|im_end|>\\n`` under frame keys, so the next turn hits it."""
        if not self.config.warm_cache or self.engine is None or self.ids is None:
            return
        from engine.dualar.prompt import IM_END

        warm = torch.cat([prompt, self._prompts.audio(codes), self._prompts.text(f"{IM_END}\n")], dim=1)
        if warm.shape[1] + 1 >= self.config.max_seq_len:
            return
        sreq = build_request(warm, Sampling(temperature=0.0, seed=0, max_frames=1), self.ids, max_frames=1)
        task = asyncio.ensure_future(self._warm_one(sreq))
        self._warm[key] = task
        task.add_done_callback(lambda t: self._warm.pop(key, None) if self._warm.get(key) is t else None)

    async def _warm_one(self, sreq: SGLangRequest) -> None:
        started = time.perf_counter()
        try:
            await self.engine.async_generate(
                input_ids=sreq.input_ids,
                sampling_params=sreq.sampling_params,
                rid=sreq.rid,
                custom_logit_processor=self._processor,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("cache warm-up failed", exc_info=True)
            return
        self._counters["warmups_total"] += 1
        log.debug("warmed %d positions in %.1f ms", sreq.prompt_len, 1000 * (time.perf_counter() - started))

    async def _await_warm(self, key: str | None) -> None:
        task = self._warm.get(key) if key else None
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=self.config.warm_wait_s)

    async def wait_warm(self) -> None:
        """Until every cache warm-up in flight is done (benchmarks and tests)."""
        tasks = list(self._warm.values())
        if tasks:
            await asyncio.wait(tasks)



class _SGLangStream:
    """One SGLang request's frames, read from its stream of output dicts; closing it aborts the request (if still
    running) and warms the cache with the turn."""

    def __init__(self, source: SGLangFrames, sreq: SGLangRequest, prompt: torch.Tensor, key: str) -> None:
        assert source.ids is not None
        self.source, self.sreq, self.prompt, self.key = source, sreq, prompt, key
        self.cursor = FrameCursor(source.ids)
        self.outputs = source._outputs(sreq)
        self.buffer: list[np.ndarray] = []  # frames received, not read yet: (C,) each
        self.made: list[np.ndarray] = []  # every frame of the turn, for the cache warm-up
        self.over = False  # no more outputs will be read
        self.finished = False  # SGLang ended the request itself (not aborted)
        self.closed = False

    async def read(self, n: int) -> np.ndarray | None:
        while not self.buffer and not self.over:
            await self._receive()
        if not self.buffer:
            return None
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return np.stack(taken, axis=1)

    async def _receive(self) -> None:
        source = self.source
        out = await anext(self.outputs, None)
        if out is None or source._error is not None:  # the stream ended, or closed while this output was on its way
            self.over = True
            if not self.finished and source._error not in (None, "closed"):  # the engine died under this stream
                raise EngineError(f"s2pro (sglang) synthesis failed: {source._error}")
            return
        update = self.cursor.feed(out)
        if update.codes.shape[1]:
            self.made.append(update.codes)
            self.buffer += list(update.codes.T)
            source._counters["frames_total"] += update.codes.shape[1]
            source._counters["ras_frames_total"] += update.ras
        if update.done:
            self.over = True
            # a model-side failure ends the request on our side; SGLang may not know (a replayed graph)
            self.finished = update.reason != "error"
            source._record_usage(self.key, update.prompt_tokens, update.cached_tokens)
            if update.reason == "error" or (update.reason == "cancelled" and source._error is None):
                raise EngineError(f"s2pro (sglang) synthesis failed: {update.error or update.reason}")

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        source = self.source
        source._inflight.discard(self.sreq.rid)
        if not self.finished and source.engine is not None:
            source._abort(source.engine, self.sreq.rid)
        await self.outputs.aclose()
        if self.made and source._error is None:
            source._schedule_warm(self.key, self.prompt, np.concatenate(self.made, axis=1))
