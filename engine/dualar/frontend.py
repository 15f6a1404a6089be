"""The S2 Pro front end, shared by both backends: text in, audio out, frames made by a :class:`FrameSource`.

The torch scheduler (``engine.dualar.synthesizer.TorchFrames``) and SGLang (``engine.sglang.synthesizer``) only make
codec frames for a prompt. Everything around that lives here, once:

1. nothing to say (only markup) -> no audio;
2. the history is trimmed to the context budget (``context.trim_history``), the prompt built (``prompt``);
3. the frame budget: ``max_frames``, the room left in the context, and a frames-per-character guard;
4. the frames are pulled from the source in growing chunks (``first_chunk_frames``, doubling to
   ``max_chunk_frames``) and decoded with the stream's own streaming codec state on a decode pool (never on the
   event loop, never on the model's thread); at most ``queue_chunks`` decoded chunks wait for the consumer, so a
   consumer that stops pulling stops the pulling of frames, and a source that can pause (torch) pauses;
5. closing the stream (or cancelling its task) closes the frame stream: generation stops at the source's next step;
6. ``encode_voice``: reference audio -> codes with the same codec.

After ``aclose`` the streams in flight end quietly (no error) and new ones are refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from engine.base import AudioChunk, EngineError, EngineInfo, Sampling, SynthesisRequest
from engine.markup import plain_text

if TYPE_CHECKING:
    import torch

    from engine.dualar.prompt import PromptBuilder

__all__ = ["FrameSource", "FrameStream", "FrontEndConfig", "Loaded", "S2ProSynthesizer", "frame_budget"]

_DONE = object()
FRAME_SAMPLES, SAMPLE_RATE = 2048, 44100  # the S2 Pro codec's, until a codec is loaded


@dataclass(frozen=True)
class FrontEndConfig:
    first_chunk_frames: int = 1  # the first audio chunk: time to first audio
    max_chunk_frames: int = 8
    queue_chunks: int = 2  # decoded chunks waiting for the consumer
    context_budget: int | None = None  # history positions kept in a prompt; default: half the context
    frames_per_char: float = 6.0  # runaway guard: at most frame_budget_base + frames_per_char * characters
    frame_budget_base: int = 32
    decode_threads: int = 2  # codec decode pool, shared by all streams

    def __post_init__(self) -> None:
        if not 1 <= self.first_chunk_frames <= self.max_chunk_frames <= 256:
            raise ValueError("need 1 <= first_chunk_frames <= max_chunk_frames <= 256")
        if self.queue_chunks < 1:
            raise ValueError("queue_chunks must be at least 1")
        if self.context_budget is not None and self.context_budget < 1:
            raise ValueError("context_budget must be at least 1")
        if not (math.isfinite(self.frames_per_char) and self.frames_per_char > 0) or self.frame_budget_base < 1:
            raise ValueError("frames_per_char must be > 0 and frame_budget_base >= 1")
        if self.decode_threads < 1:
            raise ValueError("decode_threads must be at least 1")


def frame_budget(text: str, *, per_char: float, base: int) -> int:
    """A ceiling on the frames of one turn from its spoken length: a guard against runaway generation.

    Speech runs at about 1.5 frames per character; the default guard (6 per character plus 32) never cuts real
    speech short and stops a model that has lost the end token within seconds instead of minutes.
    """
    return base + math.ceil(per_char * len(plain_text(text)))


class Loaded(NamedTuple):
    """What a frame source hands the front end once loaded."""

    prompts: PromptBuilder
    codec: Any  # engine.dualar.codec.Codec: stream(), encode(), sample_rate, frame_samples
    context_len: int  # positions a prompt and its frames may take together


class FrameStream(Protocol):
    """One request's frames, pulled by the front end."""

    async def read(self, n: int) -> np.ndarray | None:
        """Up to ``n`` (>= 1) new frames as (C, k) int16 codes, 1 <= k <= n, waiting for the first; None once the
        request is over. Raises EngineError when generation fails."""

    async def aclose(self) -> None:
        """Stop generating (idempotent); the source may keep what was made for the conversation's next turn."""


class FrameSource(Protocol):
    """A backend that makes S2 Pro codec frames for prompt matrices: the torch scheduler, or SGLang."""

    label: str  # in messages: "s2pro", "s2pro (sglang)"

    def load(self) -> Loaded:
        """Blocking: weights, tokenizer, codec, processes. Raises EngineError (or ModelLoadError)."""

    def bind_loop(self) -> None:
        """Called on the serving event loop after ``load`` (every ``start``; must be idempotent)."""

    async def open(self, prompt: torch.Tensor, sampling: Sampling, *, session: str | None) -> FrameStream:
        """Start generating for ``prompt`` (1 + C, T), at most ``sampling.max_frames`` frames."""

    def health(self) -> str | None:
        """None while frames can be made, else why not (after ``load``)."""

    def stats(self) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


class S2ProSynthesizer:
    """The S2 Pro engine (``engine.base.Synthesizer``) over a frame source; see the module docstring."""

    def __init__(self, source: FrameSource, config: FrontEndConfig) -> None:
        self.source, self.front = source, config
        self.info = EngineInfo(name="s2pro", sample_rate=SAMPLE_RATE, cloning=True,
                               frame_ms=1000.0 * FRAME_SAMPLES / SAMPLE_RATE)
        self._prompts: PromptBuilder | None = None
        self._codec: Any = None
        self._context_len = 0
        self._error: str | None = "not started"
        self._voices_encoded = 0
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="s2pro-load")
        self._decoders = concurrent.futures.ThreadPoolExecutor(config.decode_threads, thread_name_prefix="s2pro-decode")

    # ---- lifecycle

    async def start(self) -> None:
        if self._error == "closed":
            raise EngineError(f"{self.source.label} engine is closed")
        if self._prompts is None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._loader, self.load)
            except EngineError as exc:
                self._error = str(exc)
                raise
            except Exception as exc:  # the backend's own start-up failures
                self._error = f"{type(exc).__name__}: {exc}"
                raise EngineError(f"{self.source.label} failed to start: {self._error}") from exc
        self.source.bind_loop()

    def load(self) -> None:
        """Load the backend (blocking; also callable before serving, as the CLI does)."""
        if self._prompts is not None:
            return
        loaded = self.source.load()
        self._prompts, self._codec, self._context_len = loaded
        codec = loaded.codec
        self.info = EngineInfo(name="s2pro", sample_rate=codec.sample_rate, cloning=True,
                               frame_ms=1000.0 * codec.frame_samples / codec.sample_rate)
        self._error = None

    async def aclose(self) -> None:
        if self._error == "closed":
            return
        self._error = "closed"
        await self.source.aclose()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._decoders.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str | None:
        return self._error or self.source.health()

    def stats(self) -> dict[str, float]:
        """The source's counters and the voices encoded, for /metrics (``shoal_engine_*``)."""
        return {**self.source.stats(), "voices_encoded_total": float(self._voices_encoded)}

    # ---- synthesis

    def prompt(self, request: SynthesisRequest) -> torch.Tensor:
        """The request's prompt: system + voices + the history the context budget keeps + the new text."""
        from engine.dualar.context import trim_history

        assert self._prompts is not None
        budget = self.front.context_budget or self._context_len // 2
        history = trim_history(self._prompts, request.history, budget)
        prompt = self._prompts.build(request.text, speaker=request.speaker, voices=request.voices, history=history)
        if prompt.shape[1] + 1 >= self._context_len:
            raise EngineError(f"prompt of {prompt.shape[1]} positions does not fit the context ({self._context_len})")
        return prompt

    def frames_for(self, request: SynthesisRequest, prompt: torch.Tensor) -> int:
        """The frame budget of a turn: ``max_frames``, the room left in the context, the per-character guard."""
        room = self._context_len - prompt.shape[1] - 1
        guard = frame_budget(request.text, per_char=self.front.frames_per_char, base=self.front.frame_budget_base)
        return max(1, min(request.sampling.max_frames, room, guard))

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if (error := self.health()) is not None:
            raise EngineError(f"{self.source.label} engine unavailable: {error}")
        if not plain_text(request.text):
            return
        prompt = self.prompt(request)
        sampling = dataclasses.replace(request.sampling, max_frames=self.frames_for(request, prompt))
        try:
            frames = await self.source.open(prompt, sampling, session=request.session)
        except EngineError:
            raise
        except Exception as exc:  # the backend refusing the request
            raise EngineError(f"{self.source.label} synthesis failed: {type(exc).__name__}: {exc}") from exc
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.front.queue_chunks)
        pump = asyncio.create_task(self._pump(frames, queue))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    if self._error == "closed":  # the engine was closed under this stream: it ends quietly
                        return
                    if isinstance(item, EngineError):
                        raise item
                    raise EngineError(f"{self.source.label} synthesis failed: {type(item).__name__}: {item}") from item
                assert isinstance(item, AudioChunk)
                yield item
        finally:
            pump.cancel()
            await asyncio.wait([pump])
            await frames.aclose()

    async def _pump(self, frames: FrameStream, queue: asyncio.Queue[object]) -> None:
        """Frames -> decoded chunks of growing size -> ``queue``; decoding runs on the decode pool."""
        loop, decoder = asyncio.get_running_loop(), self._codec.stream()
        size, pending, have = self.front.first_chunk_frames, list[np.ndarray](), 0
        try:
            while True:
                part = await frames.read(size - have)
                if part is None:
                    break
                pending.append(part)
                have += part.shape[1]
                if have >= size:
                    await queue.put(await loop.run_in_executor(self._decoders, self._decode, decoder, pending))
                    pending, have, size = [], 0, min(size * 2, self.front.max_chunk_frames)
            if pending and self._error != "closed":
                await queue.put(await loop.run_in_executor(self._decoders, self._decode, decoder, pending))
            await queue.put(_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, raised there as EngineError
            await queue.put(exc)

    @staticmethod
    def _decode(decoder: Any, parts: list[np.ndarray]) -> AudioChunk:
        codes = np.concatenate(parts, axis=1).astype(np.int16)  # (10, k)
        pcm = decoder.decode(codes)
        return AudioChunk(pcm=np.asarray(pcm, dtype=np.float32), codes=codes)

    # ---- voices

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        if self._codec is None:
            raise EngineError(f"{self.source.label} engine is not loaded")
        codec = self._codec

        def encode() -> np.ndarray:
            return np.asarray(codec.encode(pcm, sample_rate), dtype=np.int16)

        codes = await asyncio.get_running_loop().run_in_executor(self._decoders, encode)
        self._voices_encoded += 1
        return codes
