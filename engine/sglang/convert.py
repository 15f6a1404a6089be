"""Between Shoal's engine types and SGLang requests: the request going in, the frames coming out.

Going in, one synthesis request becomes one SGLang generate request:

- ``input_ids``: the radix keys of the prompt (``keys``): token ids at text positions, frame keys at audio positions;
- ``sampling_params``: SGLang's own sampler is made a no-op (greedy over the one-hot logits the model returns) and
  the request's real settings travel in ``custom_params`` as a :class:`RequestPlan`, which the model reads on the
  GPU worker: temperature, top-p, top-k, seed, and the codes of the prompt's audio positions (frame keys are hashes;
  the model needs the codes themselves). ``custom_params`` allows only flat JSON values, so the codes go as one
  base64 string of little-endian int16 and the audio positions as flat ``[start, length, ...]`` spans.

Coming out, the model attaches one row per generated token to SGLang's per-token ``customized_info`` under
:data:`FRAME_KEY`: ``[main token, 10 codes, flags]``. :class:`FrameCursor` reads SGLang's streamed output dicts and
returns each frame once, under any interleaving of SGLang's tokenizer loop and the reader (cumulative lists only).
"""

from __future__ import annotations

import base64
import math
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.base import Sampling
from engine.dualar.config import ModelConfig
from engine.sglang.keys import radix_keys

__all__ = [
    "FLAG_FAILED",
    "FLAG_RAS",
    "FRAME_KEY",
    "FrameCursor",
    "RequestPlan",
    "SGLangRequest",
    "TokenIds",
    "Update",
    "build_request",
    "sglang_sampling_params",
]

FRAME_KEY = "shoal_frame"  # customized_info / meta_info key of the per-token frame rows
PLAN_VERSION = 1
FLAG_RAS = 1  # the main token was redrawn by repetition-aware sampling
FLAG_FAILED = 2  # the model lost this request's state (e.g. SGLang retracted it); the frame is a forced end
_MAX_SEED = (1 << 62) - 1


@dataclass(frozen=True)
class TokenIds:
    """The ids and sizes the conversion needs, from the model config."""

    semantic_begin_id: int
    semantic_end_id: int
    im_end_id: int
    vocab_size: int
    num_codebooks: int
    codebook_size: int

    @classmethod
    def of(cls, config: ModelConfig) -> TokenIds:
        return cls(
            semantic_begin_id=config.semantic_begin_id,
            semantic_end_id=config.semantic_end_id,
            im_end_id=config.im_end_id,
            vocab_size=config.slow.vocab_size,
            num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size,
        )

    @property
    def frame_width(self) -> int:
        return 2 + self.num_codebooks  # main token, codes, flags


# ------------------------------------------------------------------------------------------------ request plan


def _spans(mask: np.ndarray) -> list[int]:
    """Boolean (T,) -> flat [start, length, ...] of its runs of True."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, stops = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, stops - starts, strict=True) for v in pair]


def _pack_codes(codes: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(codes, dtype="<i2").tobytes()).decode("ascii")


def _unpack_codes(text: str, num_codebooks: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype="<i2")
    if raw.size % num_codebooks:
        raise ValueError(f"codes hold {raw.size} values, not a multiple of {num_codebooks}")
    return raw.reshape(-1, num_codebooks).astype(np.int64)


@dataclass(frozen=True)
class RequestPlan:
    """Everything the model needs about one request beyond its keys; travels as SGLang ``custom_params``."""

    prompt_len: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    allow_end: bool
    spans: tuple[int, ...]  # flat (start, length) pairs of the prompt's audio positions, ascending
    codes: np.ndarray  # (audio positions, C) int64, in span order

    def __post_init__(self) -> None:
        if not (isinstance(self.prompt_len, int) and self.prompt_len > 0):
            raise ValueError("prompt_len must be a positive int")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be finite and >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be within (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError("top_k must be an int >= 0")
        if not (isinstance(self.seed, int) and 0 <= self.seed <= _MAX_SEED):
            raise ValueError(f"seed must be an int within [0, {_MAX_SEED}]")
        if len(self.spans) % 2:
            raise ValueError("spans must be (start, length) pairs")
        end = 0
        for start, length in zip(self.spans[0::2], self.spans[1::2], strict=True):
            if start < end or length <= 0 or start + length > self.prompt_len:
                raise ValueError("spans must be ascending, non-empty and within the prompt")
            end = start + length
        if self.codes.ndim != 2 or self.codes.shape[0] != sum(self.spans[1::2]):
            raise ValueError(f"codes {self.codes.shape} do not cover the {sum(self.spans[1::2])} audio positions")

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None, num_codebooks: int) -> RequestPlan:
        """Parse ``custom_params``; ValueError if they are missing or not a plan of this version."""
        if not isinstance(custom, Mapping) or custom.get("shoal") != PLAN_VERSION:
            raise ValueError("request carries no Shoal plan (custom_params)")
        try:
            return cls(
                prompt_len=int(custom["n"]),
                temperature=float(custom["t"]),
                top_p=float(custom["p"]),
                top_k=int(custom["k"]),
                seed=int(custom["seed"]),
                allow_end=bool(custom["end"]),
                spans=tuple(int(v) for v in custom["spans"]),
                codes=_unpack_codes(str(custom["codes"]), num_codebooks),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed Shoal plan: {exc}") from None

    def to_custom(self) -> dict[str, Any]:
        return {
            "shoal": PLAN_VERSION,
            "n": self.prompt_len,
            "t": float(self.temperature),
            "p": float(self.top_p),
            "k": int(self.top_k),
            "seed": int(self.seed),
            "end": bool(self.allow_end),
            "spans": list(self.spans),
            "codes": _pack_codes(self.codes),
        }

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Prompt positions [start, stop) (stop <= prompt_len) -> their codes (n, C) int64 (0 at text positions)
        and the audio mask (n,) bool."""
        if not 0 <= start <= stop <= self.prompt_len:
            raise ValueError(f"window [{start}, {stop}) is not within the prompt of {self.prompt_len}")
        n, c = stop - start, self.codes.shape[1]
        codes, audio = np.zeros((n, c), dtype=np.int64), np.zeros(n, dtype=bool)
        offset = 0  # row of self.codes where the current span starts
        for span_start, length in zip(self.spans[0::2], self.spans[1::2], strict=True):
            lo, hi = max(span_start, start), min(span_start + length, stop)
            if lo < hi:
                codes[lo - start : hi - start] = self.codes[offset + lo - span_start : offset + hi - span_start]
                audio[lo - start : hi - start] = True
            offset += length
        return codes, audio


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class SGLangRequest:
    """One request as SGLang's ``Engine.async_generate`` takes it (``custom_logit_processor`` is added there)."""

    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    plan: RequestPlan

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)


def sglang_sampling_params(plan: RequestPlan, *, max_frames: int, im_end_id: int) -> dict[str, Any]:
    """SGLang's sampling params for a plan: greedy over the model's one-hot logits, stop at ``<|im_end|>``."""
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    return {
        "max_new_tokens": max_frames,  # one token per frame; a final <|im_end|> is not a frame
        "temperature": 0.0,  # the real draw happens in the model; SGLang takes the one token it left
        "stop_token_ids": [im_end_id],
        "stream_interval": 1,  # every frame as soon as it exists
        "no_stop_trim": True,
        "custom_params": plan.to_custom(),
    }


def build_request(
    prompt: torch.Tensor | np.ndarray,
    sampling: Sampling,
    ids: TokenIds,
    *,
    max_frames: int | None = None,
    rid: str | None = None,
    allow_end: bool = True,
) -> SGLangRequest:
    """A prompt matrix (1 + C, T) and the request's sampling settings -> the SGLang request.

    ``max_frames`` (default ``sampling.max_frames``) caps the frames; without a seed a random one is drawn, so
    every request is reproducible from its plan.
    """
    array = prompt.detach().cpu().numpy() if isinstance(prompt, torch.Tensor) else np.asarray(prompt)
    if array.ndim != 2 or array.shape[0] != 1 + ids.num_codebooks or array.shape[1] == 0:
        raise ValueError(f"prompt must have shape ({1 + ids.num_codebooks}, T > 0), got {array.shape}")
    keys = radix_keys(array, ids.semantic_begin_id, ids.semantic_end_id)
    row0 = array[0]
    audio = (row0 >= ids.semantic_begin_id) & (row0 <= ids.semantic_end_id)
    plan = RequestPlan(
        prompt_len=len(keys),
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=int(sampling.top_k),
        seed=sampling.seed % (_MAX_SEED + 1) if sampling.seed is not None else secrets.randbits(62),
        allow_end=allow_end,
        spans=tuple(_spans(audio)),
        codes=array[1:, audio].T.astype(np.int64),
    )
    frames = sampling.max_frames if max_frames is None else max_frames
    return SGLangRequest(
        rid=rid or f"shoal-{uuid.uuid4().hex}",
        input_ids=keys,
        sampling_params=sglang_sampling_params(plan, max_frames=frames, im_end_id=ids.im_end_id),
        plan=plan,
    )


# ------------------------------------------------------------------------------------------------ responses


@dataclass(frozen=True)
class Update:
    """What one streamed SGLang output adds for a request."""

    codes: np.ndarray  # (C, k) int16: the audio frames made since the last update (k may be 0)
    done: bool  # the request is over (no more updates will come)
    reason: str | None  # when done: complete | length | cancelled | error
    error: str | None = None  # why, for cancelled (by the server) and error
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt positions served from the radix cache
    ras: int = 0  # frames in this update whose main token repetition-aware sampling redrew


class FrameCursor:
    """Reads one request's stream of SGLang output dicts and returns each new frame exactly once."""

    def __init__(self, ids: TokenIds, key: str = FRAME_KEY) -> None:
        self.ids, self.key = ids, key
        self.seen = 0  # tokens already taken
        self.ended = False  # <|im_end|> was generated

    def feed(self, out: Mapping[str, Any]) -> Update:
        meta = out.get("meta_info") or {}
        rows = self._new_rows(meta)
        frames: list[np.ndarray] = []
        ras, error = 0, None
        for row in rows:
            if self.ended:
                break
            if row.shape != (self.ids.frame_width,):
                raise ValueError(f"frame row of shape {row.shape}, expected ({self.ids.frame_width},)")
            flags = int(row[-1])
            if flags & FLAG_FAILED:
                error = "the GPU worker lost this request's state (SGLang retracted it under KV-cache pressure)"
                self.ended = True
                break
            if int(row[0]) == self.ids.im_end_id:
                self.ended = True
                break
            ras += bool(flags & FLAG_RAS)
            frames.append(row[1:-1])
        codes = (
            np.stack(frames, axis=1).astype(np.int16)
            if frames
            else np.zeros((self.ids.num_codebooks, 0), dtype=np.int16)
        )
        finish = meta.get("finish_reason")
        done = finish is not None or error is not None
        reason, message = _reason(finish, error, self.ended)
        return Update(
            codes=codes,
            done=done,
            reason=reason if done else None,
            error=message,
            prompt_tokens=meta.get("prompt_tokens"),
            cached_tokens=meta.get("cached_tokens"),
            ras=ras,
        )

    def _new_rows(self, meta: Mapping[str, Any]) -> list[np.ndarray]:
        """The rows not taken yet. SGLang (``incremental_streaming_output=False``) hands the request's one growing
        list in every output, and it may have grown past this output's ``completion_tokens`` by the time the output
        is read (the tokenizer loop runs ahead of the consumer): so read it as cumulative only, from ``seen`` to its
        length now, and never trust a count. A list shorter than what was taken is not SGLang's cumulative stream."""
        values: Sequence[Any] = meta.get(self.key) or ()
        total = len(values)  # once: the list may be the live one
        if total < self.seen:
            raise ValueError(
                f"{self.key} holds {total} rows after {self.seen} were taken: expected SGLang's cumulative lists "
                "(incremental_streaming_output=False)"
            )
        fresh = [values[i] for i in range(self.seen, total)]
        self.seen = total
        return [np.asarray(v, dtype=np.int64).reshape(-1) for v in fresh if v is not None]


def _reason(finish: Any, error: str | None, ended: bool) -> tuple[str, str | None]:
    if error is not None:
        return "error", error
    kind = finish.get("type") if isinstance(finish, Mapping) else finish
    if kind == "abort":
        message = finish.get("message") if isinstance(finish, Mapping) else None
        return "cancelled", str(message) if message else None
    if kind == "length" and not ended:
        return "length", None
    if kind in ("stop", "length") or ended:
        return "complete", None
    return "error", f"unexpected finish reason {finish!r}"
