"""S2 Pro behind the engine interface: the dual-AR model streams frames, the codec decodes them as they come.

Generation runs on one dedicated thread (torch releases the GIL; the event loop never waits on it). Frames are
decoded by the streaming codec in growing chunks (1, 2, 4, then ``max_chunk_frames``) so the first audio leaves
after a single frame. A small bounded queue between the thread and the consumer is the backpressure: when the
consumer stops pulling (pacing), the thread blocks, and generation stops costing compute; closing the stream
sets a cancel flag that generation checks between frames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.base import AudioChunk, EngineError, EngineInfo, SynthesisRequest

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

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 1 <= self.first_chunk_frames <= self.max_chunk_frames <= 256:
            raise ValueError("need 1 <= first_chunk_frames <= max_chunk_frames <= 256")
        if not 64 <= self.max_seq_len <= 1 << 20:
            raise ValueError("max_seq_len must be within [64, 1048576]")
        if self.queue_chunks < 1:
            raise ValueError("queue_chunks must be at least 1")


class DualARSynthesizer:
    def __init__(self, config: DualARConfig) -> None:
        self.config = config
        self.info = EngineInfo(name="s2pro", sample_rate=44100, cloning=True, frame_ms=1000.0 * 2048 / 44100)
        self._model = None
        self._codec = None
        self._prompts = None
        self._error: str | None = "not started"
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="s2pro")
        self._lock = threading.Lock()  # one generation at a time on this model (batching comes with the scheduler)

    # ---- lifecycle

    async def start(self) -> None:
        if self._model is not None:
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    def load(self) -> None:
        """Load weights and codec (blocking; also callable before serving). Raises ModelLoadError / EngineError."""
        if self._model is not None:
            return
        from engine.dualar.codec import load_codec
        from engine.dualar.loader import load_model, resolve_model_path
        from engine.dualar.prompt import PromptBuilder

        cfg = self.config
        path = resolve_model_path(cfg.model)
        codec_path = Path(cfg.codec) if cfg.codec else path / "codec.pth"
        if not codec_path.is_file():
            raise EngineError(f"codec checkpoint {codec_path} not found (give --codec PATH)")
        dtype = getattr(torch, cfg.dtype)
        model = load_model(path, device=cfg.device, dtype=dtype, progress=cfg.progress)
        model.setup_caches(1, cfg.max_seq_len)
        codec = load_codec(codec_path, device=cfg.device, dtype=torch.float32)
        self._prompts = PromptBuilder.from_pretrained(path, model.config)
        self._model, self._codec = model, codec
        self.info = EngineInfo(
            name="s2pro", sample_rate=codec.sample_rate, cloning=True, frame_ms=1000.0 * codec.frame_samples / codec.sample_rate
        )
        self._error = None

    async def aclose(self) -> None:
        self._error = "closed"
        self._executor.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str | None:
        return self._error

    # ---- synthesis

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if self._error is not None:
            raise EngineError(f"s2pro engine unavailable: {self._error}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.config.queue_chunks)
        cancel = threading.Event()

        def put(item: object) -> None:
            """From the generation thread: block while the queue is full, give up when cancelled."""
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            while not cancel.is_set():
                try:
                    future.result(timeout=0.05)
                    return
                except concurrent.futures.TimeoutError:
                    continue
            future.cancel()

        def work() -> None:
            try:
                for chunk in self._chunks(request, cancel):
                    put(chunk)
                    if cancel.is_set():
                        return
                put(_DONE)
            except Exception as exc:  # handed to the consumer, raised there as EngineError
                put(exc)

        job = loop.run_in_executor(self._executor, work)
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
            cancel.set()
            while not queue.empty():
                queue.get_nowait()
            await asyncio.wait([job])

    def _chunks(self, request: SynthesisRequest, cancel: threading.Event) -> Iterator[AudioChunk]:
        """Runs on the generation thread: prompt -> frames -> decoded chunks of growing size."""
        from engine.dualar.generate import stream

        assert self._model is not None and self._codec is not None and self._prompts is not None
        with self._lock:
            prompt = self._prompts.build_request(request)
            if prompt.shape[1] >= self.config.max_seq_len:
                raise EngineError(
                    f"prompt of {prompt.shape[1]} positions does not fit the context ({self.config.max_seq_len})"
                )
            generator = None
            if request.sampling.seed is not None:
                generator = torch.Generator(device=self.config.device).manual_seed(request.sampling.seed)
            decoder = self._codec.stream()
            size = self.config.first_chunk_frames
            pending: list[torch.Tensor] = []
            for codes in stream(self._model, prompt, request.sampling, cancel=cancel, generator=generator):
                pending.append(codes)
                if len(pending) >= size:
                    yield self._decode(decoder, pending)
                    pending = []
                    size = min(size * 2, self.config.max_chunk_frames)
            if pending and not cancel.is_set():
                yield self._decode(decoder, pending)

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
            with self._lock:
                return np.asarray(codec.encode(pcm, sample_rate), dtype=np.int16)

        return await asyncio.get_running_loop().run_in_executor(self._executor, encode)
