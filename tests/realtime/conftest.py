"""End-to-end fixtures: a real `shoal serve` process (uvicorn on a free port, embedded Redis) and a client."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import websockets

from realtime.protocol import decode_server

_LISTEN = re.compile(r"listening on http://([\d.]+):(\d+)/")


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._kill_its_redis()
                raise AssertionError("shoal serve did not exit after SIGTERM") from None
        return self.proc.returncode

    def _kill_its_redis(self) -> None:
        """A server killed before it could stop its embedded Redis leaves it running: end it (no leaks)."""
        try:
            os.kill(int((self.data_dir / "redis.pid").read_text().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # none, or already gone


def start_server(data_dir: Path, *args: str, timeout: float = 30.0, fd_limit: int | None = None) -> Server:
    """Start `shoal serve --port 0` and wait for the line that names the port it got. ``fd_limit``: run it with
    that RLIMIT_NOFILE."""
    cmd = [sys.executable, "-m", "realtime", "serve", "--port", "0", "--data-dir", str(data_dir), *args]

    def limit_fds() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=limit_fds if fd_limit is not None else None)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = _LISTEN.search(line)
        if m:
            os.set_blocking(proc.stdout.fileno(), False)
            return Server(proc, int(m.group(2)), data_dir, lines)
    proc.kill()
    raise AssertionError("shoal serve did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data")
    yield srv
    srv.stop()


class Client:
    """A protocol v1 client that speaks only what DESIGN.md says (msgpack or JSON)."""

    def __init__(self, ws: Any, use_json: bool = False) -> None:
        self.ws = ws
        self.use_json = use_json

    @classmethod
    async def connect(cls, url: str, use_json: bool = False, **kw: Any) -> Client:
        return cls(await websockets.connect(url, max_size=None, **kw), use_json)

    async def send(self, **msg: Any) -> None:
        if self.use_json:
            import base64
            import json

            if isinstance(msg.get("audio"), bytes):
                msg["audio"] = base64.b64encode(msg["audio"]).decode()
            await self.ws.send(json.dumps(msg))
        else:
            await self.ws.send(msgpack.packb(msg, use_bin_type=True))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(frame, str) == self.use_json, "server answered in the wrong encoding"
        return decode_server(frame)

    async def until(self, mtype: str, timeout: float = 20.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Read until a message of `mtype`; return it and everything before it."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if msg["type"] == mtype:
                return msg, seen
            seen.append(msg)

    async def start(self, **fields: Any) -> dict[str, Any]:
        await self.send(type="session.start", **fields)
        ready, before = await self.until("session.ready")
        assert not [m for m in before if m["type"] == "error"], before
        return ready

    async def ping(self) -> None:
        await self.send(type="ping")
        pong, before = await self.until("pong", timeout=5)
        assert pong == {"type": "pong"}

    async def close(self) -> None:
        await self.ws.close()


def tone_wav(rate: int, seconds: float, hz: float = 180.0) -> bytes:
    """A steady tone as a mono PCM16 WAV file: a reference voice for ``voice.create``."""
    import wave

    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()
