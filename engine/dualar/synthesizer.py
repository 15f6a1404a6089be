"""S2 Pro in PyTorch behind the engine interface: the shared front end (``frontend.py``) over the torch scheduler.

Threads. The model belongs to one thread running :meth:`Scheduler.run` (continuous batching, prefix cache; see
``scheduler.py``); the event loop never waits on it. :class:`TorchFrames` is the frame source: it submits each
prompt to the scheduler and hands its frames to the front end as they are made (the scheduler calls back when a
sequence has new frames); trimming, the prompt, the frame budget, the growing chunks and the codec are the front
end's, the same as for SGLang.

Backpressure. When the consumer stops pulling (pacing), the front end stops reading frames, the sequence's frame
buffer fills and the scheduler pauses that sequence (it stops costing compute; the others go on). Closing the
stream cancels the sequence at the next scheduler step; what was generated so far goes into the prefix cache, so
the next turn's prompt, holding this turn cut where the listener stopped hearing it, still matches up to that point.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.base import EngineError, Sampling
from engine.dualar.frontend import FrontEndConfig, Loaded, S2ProSynthesizer

if TYPE_CHECKING:
    from engine.dualar.codec import Codec
    from engine.dualar.model import DualAR
    from engine.dualar.scheduler import Scheduler, Sequence

__all__ = ["DualARConfig", "DualARSynthesizer", "TorchFrames"]


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
    frames_per_char: float = 6.0  # runaway guard: at most frame_budget_base + frames_per_char * characters
    frame_budget_base: int = 32
    ignore_end: bool = False  # never draw <|im_end|> (fixed-length measurements and tests with random weights)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 64 <= self.max_seq_len <= 1 << 20:
            raise ValueError("max_seq_len must be within [64, 1048576]")
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError("max_batch_size must be within [1, 1024]")
        if not 1 <= self.prefill_chunk <= 1 << 20:
            raise ValueError("prefill_chunk must be within [1, 1048576]")
        if self.prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb must be >= 0")
        if self.context_budget is not None and not 1 <= self.context_budget < self.max_seq_len:
            raise ValueError("context_budget must be within [1, max_seq_len)")
        self.front_end()  # the shared settings are checked there

    def front_end(self) -> FrontEndConfig:
        return FrontEndConfig(first_chunk_frames=self.first_chunk_frames, max_chunk_frames=self.max_chunk_frames,
                              queue_chunks=self.queue_chunks, context_budget=self.context_budget,
                              frames_per_char=self.frames_per_char, frame_budget_base=self.frame_budget_base,
                              decode_threads=self.decode_threads)


class DualARSynthesizer(S2ProSynthesizer):
    """S2 Pro on the torch scheduler (CPU or GPU)."""

    def __init__(self, config: DualARConfig) -> None:
        self.config = config
        self.frames = TorchFrames(config)
        super().__init__(self.frames, config.front_end())

    @property
    def _model(self) -> DualAR | None:
        return self.frames.model

    @property
    def _scheduler(self) -> Scheduler | None:
        return self.frames.scheduler


class TorchFrames:
    """The frame source on the torch scheduler: one scheduler thread batches every stream on one model."""

    label = "s2pro"

    def __init__(self, config: DualARConfig) -> None:
        self.config = config
        self.model: DualAR | None = None
        self.scheduler: Scheduler | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> Loaded:
        """Load weights and codec and start the scheduler thread. Raises ModelLoadError / EngineError."""
        from engine.dualar.codec import load_codec
        from engine.dualar.loader import load_model, resolve_model_path
        from engine.dualar.prompt import PromptBuilder
        from engine.dualar.scheduler import Scheduler, SchedulerConfig

        cfg = self.config
        dtype = getattr(torch, cfg.dtype)
        codec: Codec
        if cfg.model.startswith("preset:"):  # random weights of a size preset: for speed measurements only
            from engine.dualar.presets import byte_level_tokenizer, random_codec, random_model

            name = cfg.model.partition(":")[2]
            print(f"shoal: WARNING: --model {cfg.model} has RANDOM WEIGHTS: real shapes and speed, the audio is noise",
                  file=sys.stderr, flush=True)
            model = random_model(name, device=cfg.device, dtype=dtype)
            codec = random_codec(name, device=cfg.device)
            c = model.config
            prompts = PromptBuilder(byte_level_tokenizer(c.num_semantic_tokens), semantic_begin_id=c.semantic_begin_id,
                                    num_codebooks=c.num_codebooks, codebook_size=c.codebook_size)
        else:
            path = resolve_model_path(cfg.model)
            codec_path = Path(cfg.codec) if cfg.codec else path / "codec.pth"
            if not codec_path.is_file():
                raise EngineError(f"codec checkpoint {codec_path} not found (give --codec PATH)")
            model = load_model(path, device=cfg.device, dtype=dtype, progress=cfg.progress)
            codec = load_codec(codec_path, device=cfg.device, dtype=torch.float32)
            prompts = PromptBuilder.from_pretrained(path, model.config)
        model.setup_caches(cfg.max_batch_size, cfg.max_seq_len)
        self.scheduler = Scheduler(
            model,
            SchedulerConfig(
                max_batch_size=cfg.max_batch_size,
                prefill_chunk=cfg.prefill_chunk,
                output_frames=cfg.max_chunk_frames * cfg.queue_chunks,
                prefix_cache=cfg.prefix_cache,
                prefix_cache_bytes=cfg.prefix_cache_mb << 20,
                cuda_graphs=cfg.cuda_graphs,
                allow_end=not cfg.ignore_end,
            ),
        )
        self.model = model
        self._thread = threading.Thread(target=self.scheduler.run, args=(self._stop,), name="s2pro-scheduler",
                                        daemon=True)
        self._thread.start()
        return Loaded(prompts, codec, cfg.max_seq_len)

    def bind_loop(self) -> None:
        pass

    async def open(self, prompt: torch.Tensor, sampling: Sampling, *, session: str | None) -> _TorchStream:
        assert self.scheduler is not None
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.config.device).manual_seed(sampling.seed)
        return _TorchStream(self.scheduler, prompt, sampling, generator)

    def health(self) -> str | None:
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the scheduler thread stopped"
        return None

    def stats(self) -> dict[str, float]:
        """Scheduler and prefix cache counters."""
        return self.scheduler.stats() if self.scheduler is not None else {}

    async def aclose(self) -> None:
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.wake()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)


class _TorchStream:
    """One sequence's frames: taken from its scheduler buffer when the scheduler says there are some."""

    def __init__(self, scheduler: Scheduler, prompt: torch.Tensor, sampling: Sampling,
                 generator: torch.Generator | None) -> None:
        loop, self._ready = asyncio.get_running_loop(), asyncio.Event()

        def notify() -> None:  # on the scheduler thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._ready.set)

        self._scheduler = scheduler
        self._seq: Sequence = scheduler.submit(prompt, sampling, generator=generator, on_output=notify)

    async def read(self, n: int) -> np.ndarray | None:
        from engine.dualar.scheduler import FinishReason

        while True:
            self._ready.clear()
            taken = self._scheduler.take(self._seq, n)
            if taken.frames:
                return torch.stack(taken.frames, dim=1).numpy().astype(np.int16)  # (C, k)
            if taken.finish is FinishReason.ERROR:
                raise EngineError(f"s2pro synthesis failed: {taken.error or 'generation failed'}")
            if taken.finish is not None:
                return None
            await self._ready.wait()

    async def aclose(self) -> None:
        self._scheduler.cancel(self._seq)
