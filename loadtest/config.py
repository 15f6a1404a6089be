"""Load-test settings: one frozen dataclass, validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

MAX_SESSIONS = 5000
MAX_DURATION_S = 3600.0
MAX_TURNS = 10_000  # per session
MAX_CONTEXTS = 64  # per session (the server allows 8 by default; more shows its `limit` error)
TIMESTAMPS = ("none", "words", "visemes")  # output.timestamps (visemes includes words)
TELEPHONY_OUTPUT = {"codec": "mulaw", "sample_rate": 8000, "frame_ms": 20}  # what a Twilio Media Stream plays
MAX_CLIENT_PROCESSES = 64
MAX_VAD_BENCH_S = 55.0  # the benchmark cuts its upsampled audio out of the input stream's 60 s ring


def check_loopback(url: str) -> str:
    """Load goes only to this machine: a ws:// URL on a loopback address. Returns the URL."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"the load test speaks ws:// only, got {url!r}")
    host = parts.hostname or ""
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ValueError(f"the load test sends load to loopback only (127.0.0.1, ::1, localhost), got host {host!r}")
    if parts.port is None:
        raise ValueError(f"the URL needs an explicit port, got {url!r}")
    return url


def _finite(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be within [{lo:g}, {hi:g}], got {value:g}")


def twilio_url(url: str) -> str:
    """The Twilio Media Streams endpoint of the server whose protocol v1 endpoint is ``url``."""
    parts = urlsplit(url)
    return parts._replace(path="/v1/twilio", query="").geturl()


def context_id(c: int) -> str:
    """The wire id of a session's context ``c`` (with more than one): "c0", "c1", ..."""
    return f"c{c}"


@dataclass(frozen=True)
class SwarmConfig:
    """One load-test run. Times in seconds unless the name says ms."""

    url: str
    sessions: int = 10
    duration_s: float = 30.0  # no new turn starts after this (since the run's start)
    turns: int = 0  # turns per session; 0: as many as fit in duration_s
    ramp_s: float = 5.0  # sessions connect evenly over this time
    warmup_s: float = 2.0  # after the ramp, turns starting this early are excluded from statistics
    seed: int = 1
    tokens_per_s: float = 30.0  # text arrival rate per session, like an LLM streaming its reply
    sentences: tuple[int, int] = (1, 3)  # sentences per turn (inclusive range)
    think_s: tuple[float, float] = (0.3, 1.0)  # pause after the listener heard a turn, before the next one
    barge_in: float = 0.0  # probability that a turn is interrupted (cancel + playback)
    speaker_change: float = 0.2  # probability that a turn changes speaker after its first sentence (one context only)
    contexts: int = 1  # concurrent contexts per session, each with its own speaker and turns (1: no `context` on the wire)
    codec: str = "opus"
    sample_rate: int = 48000
    frame_ms: int = 20
    lead_ms: int | None = None  # None: the server's default
    timestamps: str = "none"  # output.timestamps: ask for `words` (and `visemes`) messages
    prebuffer_ms: float = 40.0  # jitter buffer: playback starts once this much is buffered (0: at the first packet)
    compression: bool = False  # offer permessage-deflate (browsers do; Opus does not compress)
    floor_probes: int = 8  # connections measuring the bare WebSocket round trip during the run (0: none)
    floor_interval_s: float = 0.1  # per probe
    ping_per_turn: bool = True  # one protocol ping through the gateway before each turn
    cpu_interval_s: float = 0.5
    turn_timeout_s: float = 60.0  # a turn with no turn.done by then is abandoned (counted as an error)
    drain_s: float = 30.0  # after duration_s, how long running turns may take to finish
    connect_timeout_s: float = 10.0
    # telephony: each session is a simulated phone call (loadtest/call.py): the application drives it with text, a
    # Twilio Media Stream joins it, plays its mu-law audio and speaks over a share (barge_in) of its turns
    telephony: bool = False
    vad_bench_s: float = 30.0  # telephony: seconds of line audio through the server's input path, timed in-process
    # load-generator processes the sessions are split over (1: all in this process); never more than sessions
    client_processes: int = 1

    def __post_init__(self) -> None:
        check_loopback(self.url)
        if isinstance(self.sessions, bool) or not isinstance(self.sessions, int) or not 1 <= self.sessions <= MAX_SESSIONS:
            raise ValueError(f"sessions must be within [1, {MAX_SESSIONS}]")
        if isinstance(self.contexts, bool) or not isinstance(self.contexts, int) or not 1 <= self.contexts <= MAX_CONTEXTS:
            raise ValueError(f"contexts must be within [1, {MAX_CONTEXTS}]")
        if (isinstance(self.client_processes, bool) or not isinstance(self.client_processes, int)
                or not 1 <= self.client_processes <= MAX_CLIENT_PROCESSES):
            raise ValueError(f"client_processes must be within [1, {MAX_CLIENT_PROCESSES}]")
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or not 0 <= self.turns <= MAX_TURNS:
            raise ValueError(f"turns must be within [0, {MAX_TURNS}]")
        _finite("duration_s", self.duration_s, 0.1, MAX_DURATION_S)
        _finite("ramp_s", self.ramp_s, 0.0, MAX_DURATION_S)
        _finite("warmup_s", self.warmup_s, 0.0, MAX_DURATION_S)
        _finite("tokens_per_s", self.tokens_per_s, 0.1, 10_000.0)
        _finite("barge_in", self.barge_in, 0.0, 1.0)
        _finite("speaker_change", self.speaker_change, 0.0, 1.0)
        _finite("prebuffer_ms", self.prebuffer_ms, 0.0, 10_000.0)
        _finite("floor_interval_s", self.floor_interval_s, 0.005, 10.0)
        _finite("cpu_interval_s", self.cpu_interval_s, 0.05, 60.0)
        _finite("turn_timeout_s", self.turn_timeout_s, 1.0, 3600.0)
        _finite("drain_s", self.drain_s, 0.0, 3600.0)
        _finite("connect_timeout_s", self.connect_timeout_s, 0.1, 600.0)
        lo, hi = self.sentences
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 20):
            raise ValueError("sentences must be a range within [1, 20]")
        tlo, thi = self.think_s
        _finite("think_s", tlo, 0.0, 60.0)
        _finite("think_s", thi, tlo, 60.0)
        if self.codec not in ("opus", "pcm16", "mulaw"):
            raise ValueError(f"codec must be opus, pcm16 or mulaw, got {self.codec!r}")
        if self.timestamps not in TIMESTAMPS:
            raise ValueError(f"timestamps must be one of {', '.join(TIMESTAMPS)}, got {self.timestamps!r}")
        if not 0 <= self.floor_probes <= 256:
            raise ValueError("floor_probes must be within [0, 256]")
        if self.telephony:
            if self.contexts != 1:
                raise ValueError("telephony: a phone call is one listener, one context (contexts must be 1)")
            if (self.codec, self.sample_rate, self.frame_ms) != tuple(TELEPHONY_OUTPUT.values()):
                raise ValueError("telephony: the call plays mu-law 8 kHz in 20 ms frames (codec mulaw, "
                                 "sample_rate 8000, frame_ms 20)")
            _finite("vad_bench_s", self.vad_bench_s, 0.0, MAX_VAD_BENCH_S)
        if self.ramp_s >= self.duration_s and self.sessions > 1:
            raise ValueError("ramp_s must be shorter than duration_s")

    @property
    def measure_from_s(self) -> float:
        """Turns that start earlier than this (seconds since the run's start) are warm-up."""
        return self.ramp_s + self.warmup_s

    @property
    def context_ids(self) -> tuple[str | None, ...]:
        """The wire ids of a session's contexts: ``(None,)`` (the default context, no ``context`` field) for one."""
        return (None,) if self.contexts == 1 else tuple(context_id(c) for c in range(self.contexts))

    def output(self) -> dict[str, Any]:
        out: dict[str, Any] = {"codec": self.codec, "sample_rate": self.sample_rate, "frame_ms": self.frame_ms}
        if self.lead_ms is not None:
            out["lead_ms"] = self.lead_ms
        if self.timestamps != "none":  # left out otherwise: the session.start of before word timing
            out["timestamps"] = self.timestamps
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sentences"] = list(self.sentences)
        d["think_s"] = list(self.think_s)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SwarmConfig:
        """The inverse of :meth:`to_json` (how a load-generator process gets its settings)."""
        return cls(**{**d, "sentences": tuple(d["sentences"]), "think_s": tuple(d["think_s"])})
