"""The S2 Pro chat prompt as the (1 + C, T) int64 matrix the slow AR reads.

Row 0 holds token ids; rows 1..C hold the codec codes at audio positions (0 elsewhere), whose row 0 is
``<|semantic:code0|>``. Messages are ``<|im_start|>{role}\\n{content}<|im_end|>\\n``:

- system: ``convert the provided text to speech``, or with reference voices the reference header, their
  transcripts (each tagged ``<|speaker:i|>`` unless it already has a speaker tag) joined by newlines,
  ``\\n\\nSpeech:\\n`` and one audio span with all their codes in order;
- user: the text, tagged with its speaker unless it starts with a speaker tag; ``[bracket]`` instructions and inline
  tags stay plain text;
- assistant: ``<|voice|>`` and the audio span of the turn;
- the generation header ``<|im_start|>assistant\\n<|voice|>`` last.

Each piece is tokenized on its own, as the reference does, so a prompt is a concatenation of segments and the
prompt of turn n + 1 (history + [turn n]) starts with the prompt of turn n token for token: the system, voices and
history form a stable prefix. :meth:`PromptBuilder.extend` builds the next prompt from the last one directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from tokenizers import Tokenizer

from engine.base import PastTurn, SynthesisRequest, VoiceRef
from engine.dualar.config import ModelConfig

__all__ = ["PromptBuilder", "TurnLike", "VoiceLike", "load_tokenizer"]

VoiceLike = VoiceRef | tuple[str, ArrayLike]  # a reference voice: transcript and (C, frames) codes
TurnLike = PastTurn | tuple[int, str, ArrayLike]  # an earlier turn: speaker, text, (C, frames) codes

SYSTEM = "convert the provided text to speech"
SYSTEM_WITH_VOICES = "convert the provided text to speech reference to the following:\n\nText:\n"
SPEECH = "\n\nSpeech:\n"
IM_START, IM_END, VOICE = "<|im_start|>", "<|im_end|>", "<|voice|>"
_SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")
_LEADING_TAG = re.compile(r"\s*<\|speaker:\d+\|>")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory (its ``tokenizer.json``), or of that file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:
        raise ValueError(f"cannot load tokenizer {file}: {exc}") from exc


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, *, semantic_begin_id: int, num_codebooks: int, codebook_size: int):
        self.tokenizer = tokenizer
        self.semantic_begin_id, self.num_codebooks, self.codebook_size = semantic_begin_id, num_codebooks, codebook_size
        for token in (IM_START, IM_END, VOICE):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no {token} token")
        first = tokenizer.token_to_id("<|semantic:0|>")
        if first is not None and first != semantic_begin_id:
            raise ValueError(f"tokenizer has <|semantic:0|> = {first}, config says {semantic_begin_id}")

    @classmethod
    def from_pretrained(cls, path: str | Path, config: ModelConfig) -> PromptBuilder:
        return cls(
            load_tokenizer(path),
            semantic_begin_id=config.semantic_begin_id,
            num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size,
        )

    # Segments: each (1 + C, n) int64.

    def text(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        out = torch.zeros(1 + self.num_codebooks, len(ids), dtype=torch.long)
        out[0] = torch.tensor(ids, dtype=torch.long)
        return out

    def audio(self, codes: ArrayLike | torch.Tensor) -> torch.Tensor:
        """(1 + C, frames): ``<|semantic:code0|>`` in row 0, the codes below."""
        c = self._codes(codes)
        return torch.cat([c[:1] + self.semantic_begin_id, c])

    def system(self, voices: Mapping[int, VoiceLike] | Sequence[VoiceLike] = ()) -> torch.Tensor:
        """The system message; voices without codes are left out (a transcript alone cannot clone)."""
        refs = [(speaker, text, codes) for speaker, (text, codes) in self._voices(voices) if codes is not None]
        if not refs:
            return self._cat(self.text(f"{IM_START}system\n"), self.text(SYSTEM), self.text(f"{IM_END}\n"))
        transcripts = "\n".join(t if _SPEAKER_TAG.search(t) else f"<|speaker:{s}|>{t}" for s, t, _ in refs)
        return self._cat(
            self.text(f"{IM_START}system\n"),
            self.text(SYSTEM_WITH_VOICES),
            self.text(transcripts),
            self.text(SPEECH),
            self.audio(np.concatenate([self._codes(c).numpy() for _, _, c in refs], axis=1)),
            self.text(f"{IM_END}\n"),
        )

    def user(self, text: str, speaker: int = 0) -> torch.Tensor:
        tagged = text if _LEADING_TAG.match(text) else f"<|speaker:{speaker}|>{text}"
        return self._cat(self.text(f"{IM_START}user\n"), self.text(tagged), self.text(f"{IM_END}\n"))

    def header(self) -> torch.Tensor:
        """Where generation starts: ``<|im_start|>assistant\\n<|voice|>``."""
        return self.text(f"{IM_START}assistant\n{VOICE}")

    def assistant(self, codes: ArrayLike | torch.Tensor) -> torch.Tensor:
        """A finished assistant turn: the generation header, its audio span, ``<|im_end|>\\n``."""
        return self._cat(self.header(), self.audio(codes), self.text(f"{IM_END}\n"))

    # Whole prompts.

    def build(
        self,
        text: str,
        *,
        speaker: int = 0,
        voices: Mapping[int, VoiceLike] | Sequence[VoiceLike] = (),
        history: Sequence[TurnLike] = (),
    ) -> torch.Tensor:
        """system + history (user + assistant audio per turn, oldest first) + user + generation header.

        A past turn without codes is left out (there is no audio to show), which breaks the stable prefix there.
        """
        parts = [self.system(voices)]
        for turn in history:
            turn_speaker, turn_text, codes = (
                (turn.speaker, turn.text, turn.codes) if isinstance(turn, PastTurn) else turn
            )
            if codes is not None:
                parts += [self.user(turn_text, turn_speaker), self.assistant(codes)]
        return self._cat(*parts, self.user(text, speaker), self.header())

    def build_request(self, request: SynthesisRequest) -> torch.Tensor:
        return self.build(request.text, speaker=request.speaker, voices=request.voices, history=request.history)

    def extend(
        self, prompt: torch.Tensor, codes: ArrayLike | torch.Tensor, text: str, *, speaker: int = 0
    ) -> torch.Tensor:
        """The next turn's prompt: ``prompt`` (which ends with the generation header) + its generated ``codes`` +
        ``<|im_end|>\\n`` + the new user message + a new header. Equals :meth:`build` with the turn in the history."""
        return self._cat(prompt, self.audio(codes), self.text(f"{IM_END}\n"), self.user(text, speaker), self.header())

    def render(self, prompt: torch.Tensor) -> str:
        """The prompt as text (audio positions as their ``<|semantic:i|>`` tokens), for logs and tests."""
        return self.tokenizer.decode(prompt[0].tolist(), skip_special_tokens=False)

    # Helpers.

    def _codes(self, codes: ArrayLike | torch.Tensor) -> torch.Tensor:
        array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if array.ndim != 2 or array.shape[0] != self.num_codebooks:
            raise ValueError(f"codes must have shape ({self.num_codebooks}, frames), got {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"codes must be integers, got {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= self.codebook_size):
            raise ValueError(f"codes must be within [0, {self.codebook_size})")
        return torch.from_numpy(array.astype(np.int64))

    @staticmethod
    def _voices(
        voices: Mapping[int, VoiceLike] | Sequence[VoiceLike],
    ) -> list[tuple[int, tuple[str, ArrayLike | None]]]:
        items = sorted(voices.items()) if isinstance(voices, Mapping) else list(enumerate(voices))
        out: list[tuple[int, tuple[str, ArrayLike | None]]] = []
        for speaker, voice in items:
            out.append((speaker, (voice.text, voice.codes) if isinstance(voice, VoiceRef) else (voice[0], voice[1])))
        return out

    def _cat(self, *parts: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts, dim=1) if parts else torch.zeros(1 + self.num_codebooks, 0, dtype=torch.long)
