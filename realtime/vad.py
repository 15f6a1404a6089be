"""Voice activity on the caller's audio: Silero VAD, streamed 32 ms at a time.

The model is the ONNX file the ``silero-vad`` wheel ships (nothing is downloaded), run by onnxruntime with numpy,
one thread per call. The wheel declares torch as a dependency for its own helpers, which Shoal does not use, so it is
installed without its dependencies (``scripts/setup.sh``): a server that never takes input audio, and its install,
need neither torch nor the model (it is loaded on the first session that turns VAD on).

:class:`VoiceActivity` turns the model's per-window speech probabilities into events with hysteresis, as Silero's
own iterator does: speech starts after ``min_speech_ms`` of windows at or above ``threshold`` (the event carries
the time of the first of them: the onset), and stops after ``min_silence_ms`` below ``threshold - 0.15``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VAD_RATE", "VadConfig", "VadUnavailable", "VoiceActivity", "model_path"]

VAD_RATE = 16000  # the model runs at 16 kHz: 512-sample windows with 64 samples of context
_WINDOW = 512
_CONTEXT = 64


class VadUnavailable(Exception):
    """The Silero model or onnxruntime is not installed."""


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech probability that counts as speech
    min_speech_ms: int = 96  # this much speech (3 windows) before speech_started: a cough or a click is not a turn
    min_silence_ms: int = 500  # this much silence before speech_stopped

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                and math.isfinite(self.threshold) and 0.2 <= self.threshold <= 0.95):
            raise ValueError("input.threshold must be a number within [0.2, 0.95]")
        for name, high in (("min_speech_ms", 2000), ("min_silence_ms", 5000)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 32 <= value <= high):
                raise ValueError(f"input.{name} must be an integer within [32, {high}]")


def model_path() -> Path:
    """The ONNX model inside the installed silero-vad wheel (found without importing the package, which needs
    torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("silero-vad is not installed (scripts/setup.sh installs it: pip install --no-deps silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise VadUnavailable(f"the silero-vad wheel has no {path.name}")
    return path


_lock = threading.Lock()


@functools.cache
def _session() -> Any:
    """One inference session per process (onnxruntime's ``run`` is thread-safe); per-stream state lives outside."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise VadUnavailable("onnxruntime is not installed") from exc
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(model_path()), sess_options=options, providers=["CPUExecutionProvider"])


def load() -> None:
    """Load the model now (raises VadUnavailable): a session asking for VAD learns at once if it cannot have it."""
    with _lock:
        _session()


class VoiceActivity:
    """Speech start / stop events of one input stream (16 kHz float32 in any chunk sizes). Not thread-safe: one
    stream, one caller at a time."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        with _lock:
            self._model = _session()
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._sr = np.array(VAD_RATE, dtype=np.int64)
        self.windows = 0  # windows classified so far; window i covers [i * 32, (i + 1) * 32) ms of the input
        self.speaking = False
        self._run = 0  # consecutive windows on the other side of the hysteresis
        self._run_start = 0
        self.last_probability = 0.0

    def feed(self, pcm: np.ndarray) -> list[tuple[str, float]]:
        """Classify what is complete; returns ``("started" | "stopped", ms)`` events, ``ms`` on the stream's clock."""
        buf = np.concatenate((self._pending, np.asarray(pcm, dtype=np.float32)))
        count = buf.size // _WINDOW
        self._pending = buf[count * _WINDOW :]
        events: list[tuple[str, float]] = []
        window_ms = _WINDOW * 1000.0 / VAD_RATE
        need_speech = max(1, math.ceil(self.config.min_speech_ms / window_ms))
        need_silence = max(1, math.ceil(self.config.min_silence_ms / window_ms))
        low = self.config.threshold - 0.15
        for i in range(count):
            window = buf[i * _WINDOW : (i + 1) * _WINDOW]
            x = np.concatenate((self._context, window))[None, :]
            probability, self._state = self._model.run(None, {"input": x, "state": self._state, "sr": self._sr})
            self._context = window[-_CONTEXT:]
            p = self.last_probability = float(probability[0, 0])
            index = self.windows
            self.windows += 1
            crossing = p < low if self.speaking else p >= self.config.threshold
            if not crossing:
                self._run = 0
                continue
            if self._run == 0:
                self._run_start = index
            self._run += 1
            if self._run >= (need_silence if self.speaking else need_speech):
                self.speaking = not self.speaking
                self._run = 0
                events.append(("started" if self.speaking else "stopped", round(self._run_start * window_ms, 1)))
        return events
