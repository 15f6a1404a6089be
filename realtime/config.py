"""Server configuration: one frozen dataclass, validated once, passed down explicitly (never read from env)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from realtime.auth import KeyRing, OriginPolicy
from realtime.turns import Limits


@dataclass(frozen=True)
class GatewayLimits:
    message_bytes: int = 1 << 20  # any message but voice.create
    voice_message_bytes: int = 8 << 20  # voice.create
    voice_min_s: float = 1.0
    voice_max_s: float = 60.0
    idle_timeout_s: float = 120.0  # no message for this long closes the connection (pings keep it alive)
    send_timeout_s: float = 5.0  # a client that takes no frame for this long is told (limit) and dropped
    audio_queue_packets: int = 256  # outgoing audio buffered per connection (pacing keeps it far lower)
    control_queue_messages: int = 256
    store_drain_s: float = 10.0  # on close, how long turns not yet stored keep being retried (a Redis restart)
    liveness_ping_s: float = 1.0  # WebSocket ping period: a pong proves the client read everything before it
    lease_ms: int = 15_000  # session ownership lease in the store, refreshed every lease/3
    busy_wait_ms: float = 1500.0  # how long session.start waits for a previous connection to let go
    handshake_timeout_s: float = 10.0  # a connection must send its request headers within this (silent / drip-fed)
    # quotas: refused with `error quota` naming the quota. Voices are counted in the store (every gateway of a
    # tenant); connections, sessions and the voice.create rate per gateway process.
    voices_per_tenant: int = 100
    voice_bytes_per_tenant: int = 64 << 20  # stored bytes (codes + compressed reference audio)
    connections_per_tenant: int = 1000
    connections_per_address: int = 100
    sessions_per_tenant: int = 1000  # live sessions
    sessions_per_address: int = 100
    voice_creates_per_minute: float = 30.0  # per tenant; bursts of as many
    voice_creates_at_once: int = 2  # decoded and encoded at the same time, server-wide (bounds peak memory)
    turn: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.message_bytes < 1024 or self.voice_message_bytes < self.message_bytes:
            raise ValueError("message size limits are too small")
        if not 0 < self.voice_min_s <= self.voice_max_s:
            raise ValueError("voice duration limits are inconsistent")
        for name in ("idle_timeout_s", "send_timeout_s", "store_drain_s", "liveness_ping_s", "handshake_timeout_s",
                     "voices_per_tenant", "voice_bytes_per_tenant", "connections_per_tenant",
                     "connections_per_address", "sessions_per_tenant", "sessions_per_address",
                     "voice_creates_per_minute", "voice_creates_at_once"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.lease_ms < 1000:
            raise ValueError("lease_ms must be at least 1000")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None  # None: start the embedded Redis under data_dir
    data_dir: Path | None = None  # None: the per-user data directory
    keys: KeyRing = field(default_factory=KeyRing)  # API keys by tenant; none: auth is off, one default tenant
    origins: OriginPolicy | None = None  # web pages that may open a socket; None: OriginPolicy.default
    engine: str = "espeak"
    session_ttl_s: int = 24 * 3600
    shutdown_timeout_s: float = 3.0
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    processes: int = 1  # gateway processes sharing the port (SO_REUSEPORT), the store and the engine workers
    # set in each of several gateway processes: where they share their metrics (prometheus-client multiprocess)
    metrics_dir: Path | None = None
    # Where a stream's audio is resampled and encoded. False: in the codec thread pool, so one gateway process uses
    # every core. True: on the event loop, 20 % less CPU per Opus stream (no thread hop per engine chunk, no GIL
    # hand-off per packet; measured at 25 sessions, README: load test) but one core per process: for gateways in
    # several processes, where the other cores are the other processes'.
    encode_on_loop: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.processes <= 256:
            raise ValueError(f"processes must be within 1..256, got {self.processes}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        if self.session_ttl_s < 60:
            raise ValueError("session TTL must be at least 60 s")

    @property
    def origin_policy(self) -> OriginPolicy:
        return self.origins if self.origins is not None else OriginPolicy.default(self.keys.enabled)
