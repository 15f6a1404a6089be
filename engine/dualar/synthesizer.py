"""S2 Pro behind the engine interface: many concurrent streams share one model through the batching scheduler.

Threads. The model belongs to one thread running :meth:`Scheduler.run` (continuous batching, prefix cache; see
``scheduler.py``); the event loop never waits on it. Each ``synthesize()`` builds its prompt (history trimmed to
``context_budget``, see ``context.py``), submits it, and pumps its frames: the scheduler calls back when frames are
ready, the pump takes them in growing chunks (1, 2, 4, then ``max_chunk_frames``, so the first audio leaves after
a single frame) and decodes each chunk with the stream's own streaming codec state on a separate decode pool —
never on the scheduler thread, so decoding does not stall the batch.

Backpressure. At most ``queue_chunks`` decoded chunks wait for the consumer; when it stops pulling (pacing), the
pump stops taking frames, the sequence's frame buffer fills and the scheduler pauses that sequence (it stops
costing compute; the others go on). Closing the stream cancels the sequence at the next scheduler step; what was
generated so far goes into the prefix cache, so the next turn's prompt, holding this turn cut where the listener
stopped hearing it, still matches up to that point.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.base import AudioChunk, EngineError, EngineInfo, SynthesisRequest

if TYPE_CHECKING:
    from engine.dualar.codec import Codec
    from engine.dualar.model import DualAR
    from engine.dualar.prompt import PromptBuilder
    from engine.dualar.scheduler import Scheduler, Sequence

__all__ = ["DualARConfig", "DualARSynthesizer"]

_DONE = object()


@dataclass(frozen=True)
class DualARConfig:
    model: str  # checkpoint directory or Hugging Face repo id
    codec: str | None = None  # codec.pth; default: <model dir>/codec.pth
    device: str = "cpu"
    dtype: str = "float32"
    max_seq_len: int = 4096  # KV cache length: prompt (voices + history) plus generated frames
    first_chunk_frames: int = 1
    max_chunk_frames: int = 8
    queue_chunks: int = 2  # decoded chunks waiting for the consumer
    progress: bool = True
    max_batch_size: int = 8  # sequences generating at once (KV cache rows)
    prefill_chunk: int = 256  # prompt positions prefilled per scheduler step
    prefix_cache: bool = True  # reuse the KV of earlier prompts (conversation history, voices)
    prefix_cache_mb: int = 1024  # memory bound of the prefix cache
    context_budget: int | None = None  # history positions kept in a prompt; default max_seq_len // 2
    decode_threads: int = 2  # codec decode pool, shared by all streams
    cuda_graphs: bool = True  # on CUDA: the scheduler's decode step as captured CUDA graphs (scheduler.py)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 1 <= self.first_chunk_frames <= self.max_chunk_frames <= 256:
            raise ValueError("need 1 <= first_chunk_frames <= max_chunk_frames <= 256")
        if not 64 <= self.max_seq_len <= 1 << 20:
            raise ValueError("max_seq_len must be within [64, 1048576]")
        if self.queue_chunks < 1:
            raise ValueError("queue_chunks must be at least 1")
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError("max_batch_size must be within [1, 1024]")
        if not 1 <= self.prefill_chunk <= 1 << 20:
            raise ValueError("prefill_chunk must be within [1, 1048576]")
        if self.prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb must be >= 0")
        if self.context_budget is not None and not 1 <= self.context_budget < self.max_seq_len:
            raise ValueError("context_budget must be within [1, max_seq_len)")
        if self.decode_threads < 1:
            raise ValueError("decode_threads must be at least 1")

    @property
    def history_budget(self) -> int:
        return self.context_budget if self.context_budget is not None else self.max_seq_len // 2


class DualARSynthesizer:
    def __init__(self, config: DualARConfig) -> None:
        self.config = config
        self.info = EngineInfo(name="s2pro", sample_rate=44100, cloning=True, frame_ms=1000.0 * 2048 / 44100)
        self._model: DualAR | None = None
        self._codec: Codec | None = None
        self._prompts: PromptBuilder | None = None
        self._scheduler: Scheduler | None = None
        self._error: str | None = "not started"
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="s2pro-load")
        self._decoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.decode_threads, thread_name_prefix="s2pro-decode"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    async def start(self) -> None:
        if self._model is not None:
            return
        await asyncio.get_running_loop().run_in_executor(self._loader, self.load)

    def load(self) -> None:
        """Load weights and codec and start the scheduler thread (blocking; also callable before serving).
        Raises ModelLoadError / EngineError."""
        if self._model is not None:
            return
        from engine.dualar.codec import load_codec
        from engine.dualar.loader import load_model, resolve_model_path
        from engine.dualar.prompt import PromptBuilder
        from engine.dualar.scheduler import Scheduler, SchedulerConfig

        cfg = self.config
        dtype = getattr(torch, cfg.dtype)
        if cfg.model.startswith("preset:"):  # random weights of a size preset: for speed measurements only
            from engine.dualar.presets import byte_level_tokenizer, random_codec, random_model

            name = cfg.model.partition(":")[2]
            print(f"shoal: WARNING: --model {cfg.model} has RANDOM WEIGHTS: real shapes and speed, the audio is noise",
                  file=sys.stderr, flush=True)
            model = random_model(name, device=cfg.device, dtype=dtype)
            codec = random_codec(name, device=cfg.device)
            c = model.config
            self._prompts = PromptBuilder(byte_level_tokenizer(c.num_semantic_tokens), semantic_begin_id=c.semantic_begin_id,
                                          num_codebooks=c.num_codebooks, codebook_size=c.codebook_size)
        else:
            path = resolve_model_path(cfg.model)
            codec_path = Path(cfg.codec) if cfg.codec else path / "codec.pth"
            if not codec_path.is_file():
                raise EngineError(f"codec checkpoint {codec_path} not found (give --codec PATH)")
            model = load_model(path, device=cfg.device, dtype=dtype, progress=cfg.progress)
            codec = load_codec(codec_path, device=cfg.device, dtype=torch.float32)
            self._prompts = PromptBuilder.from_pretrained(path, model.config)
        model.setup_caches(cfg.max_batch_size, cfg.max_seq_len)
        self._scheduler = Scheduler(
            model,
            SchedulerConfig(
                max_batch_size=cfg.max_batch_size,
                prefill_chunk=cfg.prefill_chunk,
                output_frames=cfg.max_chunk_frames * cfg.queue_chunks,
                prefix_cache=cfg.prefix_cache,
                prefix_cache_bytes=cfg.prefix_cache_mb << 20,
                cuda_graphs=cfg.cuda_graphs,
            ),
        )
        self._model, self._codec = model, codec
        self.info = EngineInfo(
            name="s2pro", sample_rate=codec.sample_rate, cloning=True, frame_ms=1000.0 * codec.frame_samples / codec.sample_rate
        )
        self._thread = threading.Thread(
            target=self._scheduler.run, args=(self._stop,), name="s2pro-scheduler", daemon=True
        )
        self._thread.start()
        self._error = None

    async def aclose(self) -> None:
        self._error = "closed"
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.wake()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._decoders.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str | None:
        return self._error

    def stats(self) -> dict[str, float]:
        """Scheduler and prefix cache counters for /metrics (``shoal_engine_*``)."""
        return self._scheduler.stats() if self._scheduler is not None else {}

    # ---- synthesis

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if self._error is not None:
            raise EngineError(f"s2pro engine unavailable: {self._error}")
        assert self._scheduler is not None and self._codec is not None
        scheduler, loop = self._scheduler, asyncio.get_running_loop()
        prompt = self.prompt(request)
        generator = None
        if request.sampling.seed is not None:
            generator = torch.Generator(device=self.config.device).manual_seed(request.sampling.seed)
        ready = asyncio.Event()

        def notify() -> None:  # on the scheduler thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(ready.set)

        seq = scheduler.submit(prompt, request.sampling, generator=generator, on_output=notify)
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.config.queue_chunks)
        pump = asyncio.create_task(self._pump(seq, ready, queue))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise EngineError(f"s2pro synthesis failed: {item}") from item
                assert isinstance(item, AudioChunk)
                yield item
        finally:
            scheduler.cancel(seq)
            pump.cancel()
            await asyncio.wait([pump])

    def prompt(self, request: SynthesisRequest) -> torch.Tensor:
        """The request's prompt: system + voices + the history the context budget keeps + the new text."""
        from engine.dualar.context import trim_history

        assert self._prompts is not None
        history = trim_history(self._prompts, request.history, self.config.history_budget)
        prompt = self._prompts.build(request.text, speaker=request.speaker, voices=request.voices, history=history)
        if prompt.shape[1] >= self.config.max_seq_len:
            raise EngineError(
                f"prompt of {prompt.shape[1]} positions does not fit the context ({self.config.max_seq_len})"
            )
        return prompt

    async def _pump(self, seq: Sequence, ready: asyncio.Event, queue: asyncio.Queue[object]) -> None:
        """Frames of ``seq`` -> decoded chunks of growing size -> ``queue``; decoding runs on the decode pool."""
        from engine.dualar.scheduler import FinishReason

        assert self._scheduler is not None and self._codec is not None
        loop, decoder = asyncio.get_running_loop(), self._codec.stream()
        size, pending = self.config.first_chunk_frames, list[torch.Tensor]()
        try:
            while True:
                ready.clear()
                taken = self._scheduler.take(seq, size - len(pending))
                pending += taken.frames
                if len(pending) >= size or (taken.finish is not None and pending):
                    chunk = await loop.run_in_executor(self._decoders, self._decode, decoder, pending)
                    await queue.put(chunk)
                    pending, size = [], min(size * 2, self.config.max_chunk_frames)
                    continue
                if taken.finish is FinishReason.ERROR:
                    raise EngineError(taken.error or "generation failed")
                if taken.finish is not None:
                    await queue.put(_DONE)
                    return
                await ready.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, raised there as EngineError
            await queue.put(exc)

    @staticmethod
    def _decode(decoder: object, frames: list[torch.Tensor]) -> AudioChunk:
        codes = torch.stack(frames, dim=1).cpu().numpy().astype(np.int16)  # (10, k)
        pcm = decoder.decode(codes)  # type: ignore[attr-defined]
        return AudioChunk(pcm=np.asarray(pcm, dtype=np.float32), codes=codes)

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        if self._codec is None:
            raise EngineError("s2pro engine is not loaded")
        codec = self._codec

        def encode() -> np.ndarray:
            return np.asarray(codec.encode(pcm, sample_rate), dtype=np.int16)

        return await asyncio.get_running_loop().run_in_executor(self._decoders, encode)
