from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from dataclasses import replace
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from sessions.embedded import EmbeddedRedis
from sessions.model import Session, Speaker, Turn, Voice
from sessions.serialize import encode
from sessions.store import SessionStore, StoreError, VoiceQuotaExceeded, WriteRejected

DAY_MS = 86400 * 1000


@pytest.fixture
async def raw(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the same server, to look at what the store wrote."""
    client = aioredis.Redis.from_url(redis_server)
    yield client
    await client.aclose()


def turn(index: int, frames: int = 8) -> Turn:
    codes = np.full((10, frames), index, dtype=np.int16)
    return Turn(
        index=index, speaker=index % 2, text=f"turn {index}", state="complete", audio_ms=frames * 21, codes=codes
    )


async def test_create_load_save(store: SessionStore) -> None:
    assert await store.load_session("s1") is None
    session = Session("s1", speakers=[Speaker(0, "alice")], output={"format": "opus"}, sampling={"temperature": 0.7})
    assert await store.create_session(session) is True
    assert await store.create_session(Session("s1")) is False  # the id exists: nothing overwritten
    loaded = await store.load_session("s1")
    assert loaded is not None
    assert (loaded.speakers, loaded.output, loaded.sampling, loaded.turns) == (
        [Speaker(0, "alice")],
        {"format": "opus"},
        {"temperature": 0.7},
        0,
    )
    loaded.speakers.append(Speaker(1, "bob"))
    loaded.sampling = {"temperature": 1.0}
    await store.save_session(loaded)
    again = await store.load_session("s1")
    assert again is not None
    assert again.speakers == [Speaker(0, "alice"), Speaker(1, "bob")] and again.sampling == {"temperature": 1.0}
    assert again.updated_at >= loaded.updated_at and again.created_at == session.created_at


async def test_save_of_a_missing_session_is_a_store_error(store: SessionStore) -> None:
    with pytest.raises(StoreError, match="no session 'ghost'"):
        await store.save_session(Session("ghost"))


async def test_append_and_load_turns(store: SessionStore, raw: aioredis.Redis) -> None:
    await store.create_session(Session("s"))
    for i in range(4):
        assert await store.append_turn("s", turn(i)) == i + 1
    turns = await store.load_turns("s")
    assert [t.index for t in turns] == [0, 1, 2, 3] and [t.text for t in turns] == [f"turn {i}" for i in range(4)]
    assert turns[2].codes is not None
    np.testing.assert_array_equal(turns[2].codes, np.full((10, 8), 2, np.int16))
    assert [t.index for t in await store.load_turns("s", start=2)] == [2, 3]
    session = await store.load_session("s")
    assert session is not None and session.turns == 4
    # save_session leaves the turn count alone, even when handed a stale one
    session.turns = 0
    await store.save_session(session)
    reloaded = await store.load_session("s")
    assert reloaded is not None and reloaded.turns == 4
    assert await raw.llen(store.session_keys("s").turns) == 4


async def test_append_turn_checks_the_index(store: SessionStore) -> None:
    await store.create_session(Session("s"))
    first = turn(0)
    assert await store.append_turn("s", first) == 1
    assert await store.append_turn("s", turn(1)) == 2
    assert await store.append_turn("s", first) == 2  # the same record again: a retry, done already
    other = turn(0)
    other.text = "something else"
    with pytest.raises(WriteRejected, match="turn 0 of session 's' is already stored with a different record") as e:
        await store.append_turn("s", other)  # a conflicting double write
    assert (e.value.reason, e.value.count) == ("conflict", 2)
    with pytest.raises(WriteRejected, match="turn index 3 does not follow the 2 stored turns") as e:
        await store.append_turn("s", turn(3))  # a gap
    assert (e.value.reason, e.value.count) == ("gap", 2)
    with pytest.raises(WriteRejected, match="no session 'nope'") as e:
        await store.append_turn("nope", turn(0))
    assert e.value.reason == "no_session" and isinstance(e.value, StoreError)
    with pytest.raises(ValueError):
        await store.append_turn("s", turn(-1))
    turns = await store.load_turns("s")
    assert [t.index for t in turns] == [0, 1] and turns[0].text == "turn 0"


async def test_concurrent_appends_of_the_same_index_store_one_turn(store: SessionStore) -> None:
    await store.create_session(Session("s"))
    same = turn(0)  # the same record written 20 times at once (retries racing the original): all succeed, once
    assert await asyncio.gather(*(store.append_turn("s", same) for _ in range(20))) == [1] * 20
    rivals = [Turn(1, 0, f"rival {i}", "complete", 0) for i in range(20)]  # different records for one index
    results = await asyncio.gather(*(store.append_turn("s", r) for r in rivals), return_exceptions=True)
    assert results.count(2) == 1
    assert all(isinstance(r, WriteRejected) and r.reason == "conflict" for r in results if r != 2)
    turns = await store.load_turns("s")
    assert len(turns) == 2 and turns[1].text == rivals[results.index(2)].text


async def test_a_retried_create_is_not_mistaken_for_another_session(store: SessionStore, raw: aioredis.Redis) -> None:
    session = Session("s", speakers=[Speaker(0, "alice")])
    assert await store.create_session(session) is True
    assert await store.create_session(session) is True  # the same record: our own create, its answer lost
    assert await store.create_session(Session("s", speakers=[Speaker(0, "alice")])) is False  # another one
    assert await raw.hget(store.session_keys("s").meta, "turns") == b"0"


async def test_amend_turn_replaces_a_stored_turn(store: SessionStore, raw: aioredis.Redis) -> None:
    keys = store.session_keys("s")
    await store.create_session(Session("s"))
    for i in range(3):
        await store.append_turn("s", turn(i, frames=8))
    before = await store.load_session("s")
    assert before is not None
    cut = turn(1, frames=3)
    cut.text, cut.state, cut.audio_ms = "turn", "cancelled", 63
    for key in (keys.meta, keys.turns):
        await raw.pexpire(key, 5_000)
    await store.amend_turn("s", cut)
    await store.amend_turn("s", cut)  # idempotent
    for key in (keys.meta, keys.turns):
        assert await raw.pttl(key) > DAY_MS - 10_000  # TTL refreshed
    turns = await store.load_turns("s")
    assert [t.text for t in turns] == ["turn 0", "turn", "turn 2"]
    assert (turns[1].state, turns[1].audio_ms) == ("cancelled", 63)
    assert turns[1].codes is not None and turns[1].codes.shape == (10, 3)
    after = await store.load_session("s")
    assert after is not None and after.turns == 3 and after.updated_at >= before.updated_at
    # the original append, retried after the amendment, is now a conflict: it does not undo the cut
    with pytest.raises(WriteRejected) as e:
        await store.append_turn("s", turn(1))
    assert e.value.reason == "conflict"

    with pytest.raises(WriteRejected, match="cannot amend turn 3 of session 's': only 3 turns are stored") as e:
        await store.amend_turn("s", turn(3))
    assert (e.value.reason, e.value.count) == ("not_stored", 3)
    with pytest.raises(WriteRejected, match="no session 'ghost'") as e:
        await store.amend_turn("ghost", turn(0))
    assert e.value.reason == "no_session"
    await store.create_session(Session("empty"))
    with pytest.raises(WriteRejected, match="only 0 turns are stored"):
        await store.amend_turn("empty", turn(0))
    assert await raw.llen(keys.turns) == 3


async def test_ttl_is_set_and_refreshed_on_every_write(store: SessionStore, raw: aioredis.Redis) -> None:
    keys = store.session_keys("s")
    await store.create_session(Session("s"))
    assert DAY_MS - 10_000 < await raw.pttl(keys.meta) <= DAY_MS
    await store.append_turn("s", turn(0))
    for key in (keys.meta, keys.turns):
        assert DAY_MS - 10_000 < await raw.pttl(key) <= DAY_MS
        await raw.pexpire(key, 5_000)
    await store.append_turn("s", turn(1))
    for key in (keys.meta, keys.turns):
        assert await raw.pttl(key) > DAY_MS - 10_000
        await raw.pexpire(key, 5_000)
    session = await store.load_session("s")
    assert session is not None
    await store.save_session(session)
    for key in (keys.meta, keys.turns):
        assert await raw.pttl(key) > DAY_MS - 10_000


async def test_session_expires_with_its_ttl(redis_server: str) -> None:
    async with SessionStore(redis_server, session_ttl_s=1, key_prefix=f"t-{uuid.uuid4().hex}") as store:
        await store.create_session(Session("s"))
        await store.append_turn("s", turn(0))
        await asyncio.sleep(1.2)
        assert await store.load_session("s") is None and await store.load_turns("s") == []


async def test_keys_share_a_cluster_hash_tag(store: SessionStore) -> None:
    keys = store.session_keys("abc")
    assert all(f"{store.key_prefix}:s:{{abc}}:" in k for k in keys)
    assert keys.meta.endswith(":meta") and keys.turns.endswith(":turns") and keys.owner.endswith(":owner")
    # a tenant's voices and their quota index share one tag, so the quota script stays on one slot
    assert store.voice_key("v") == f"{{{store.key_prefix}:v}}:v"
    assert store.voice_index_key() == f"{{{store.key_prefix}:v}}:index"


async def test_ownership(store: SessionStore, raw: aioredis.Redis) -> None:
    owner_key = store.session_keys("s").owner
    assert await store.acquire("s", "gw-1") is True
    assert await store.acquire("s", "gw-1") is True  # already ours
    assert await store.acquire("s", "gw-2") is False
    assert await store.refresh("s", "gw-2", 15_000) is False
    await store.release("s", "gw-2")  # not the owner: compare-and-delete leaves it
    assert await raw.get(owner_key) == b"gw-1"
    await raw.pexpire(owner_key, 1_000)
    assert await store.refresh("s", "gw-1", 60_000) is True
    assert 59_000 < await raw.pttl(owner_key) <= 60_000
    await store.release("s", "gw-1")
    assert await raw.exists(owner_key) == 0
    assert await store.acquire("s", "gw-2") is True


async def test_lease_expiry_frees_the_session(store: SessionStore) -> None:
    assert await store.acquire("s", "gw-1", lease_ms=100) is True
    await asyncio.sleep(0.25)
    assert await store.refresh("s", "gw-1", 100) is False  # lost it: the lease ran out
    assert await store.acquire("s", "gw-2") is True
    assert await store.acquire("s", "gw-1") is False


async def test_voices(store: SessionStore, raw: aioredis.Redis) -> None:
    assert await store.get_voice("v1") is None
    voice = Voice("v1", "hello", 1.0, 24000, b"\x01\x00" * 24000, codes=np.ones((10, 21), np.int16))
    await store.put_voice(voice)
    back = await store.get_voice("v1")
    assert back is not None and back.audio == voice.audio and back.text == "hello"
    assert back.codes is not None
    np.testing.assert_array_equal(back.codes, np.ones((10, 21), np.int16))
    assert 30 * DAY_MS - 10_000 < await raw.pttl(store.voice_key("v1")) <= 30 * DAY_MS


async def test_voices_without_ttl(redis_server: str, raw: aioredis.Redis) -> None:
    async with SessionStore(redis_server, voice_ttl_s=None, key_prefix=f"t-{uuid.uuid4().hex}") as store:
        await store.put_voice(Voice("v", "t", 0.5, 16000, b""))
        assert await raw.ttl(store.voice_key("v")) == -1


async def test_voice_quota_counts_voices_and_bytes_of_one_namespace(store: SessionStore) -> None:
    small = Voice("a", "t", 1.0, 16000, b"x" * 1000)
    for i in range(3):
        await store.put_voice(replace(small, voice=f"v{i}"), max_count=3)
    with pytest.raises(VoiceQuotaExceeded) as info:
        await store.put_voice(replace(small, voice="v3"), max_count=3)
    assert info.value.reason == "voice_count" and info.value.count == 3
    assert await store.get_voice("v3") is None
    await store.put_voice(replace(small, voice="v1", text="replaced"), max_count=3)  # a replacement fits
    assert (await store.get_voice("v1")).text == "replaced"  # type: ignore[union-attr]
    size = len(encode(replace(small, voice="v0")))
    with pytest.raises(VoiceQuotaExceeded) as info:
        await store.put_voice(replace(small, voice="v1", audio=b"x" * 5000), max_bytes=3 * size)
    assert info.value.reason == "voice_bytes" and info.value.stored_bytes == 2 * size
    other = store.scoped("tenant-b")  # another namespace has its own quota and its own voices
    await other.put_voice(replace(small, voice="v3"), max_count=1)
    assert await store.get_voice("v3") is None and await other.get_voice("v1") is None


async def test_expired_voices_leave_the_quota(redis_server: str) -> None:
    async with SessionStore(redis_server, voice_ttl_s=1, key_prefix=f"t-{uuid.uuid4().hex}") as store:
        voice = Voice("a", "t", 1.0, 16000, b"")
        await store.put_voice(voice, max_count=1)
        with pytest.raises(VoiceQuotaExceeded):
            await store.put_voice(replace(voice, voice="b"), max_count=1)
        await asyncio.sleep(1.1)
        await store.put_voice(replace(voice, voice="b"), max_count=1)


async def test_voices_stored_before_the_quota_index_are_still_found(store: SessionStore, raw: aioredis.Redis) -> None:
    old = Voice("narrator", "t", 1.0, 16000, b"\0\0" * 16000)
    await raw.set(f"{store.key_prefix}:v:{{narrator}}", encode(old))
    back = await store.get_voice("narrator")
    assert back is not None and back.audio_format == "pcm16" and back.audio == old.audio
    assert await store.scoped("t1").get_voice("narrator") is None  # tenants never had the old layout


async def test_a_malformed_stored_record_is_a_store_error(store: SessionStore, raw: aioredis.Redis) -> None:
    await store.create_session(Session("s"))
    await raw.hset(store.session_keys("s").meta, "record", b"\xc1garbage")
    with pytest.raises(StoreError, match="malformed session record"):
        await store.load_session("s")
    await raw.rpush(store.session_keys("s").turns, b"junk")
    with pytest.raises(StoreError, match="malformed turn record"):
        await store.load_turns("s")


async def test_unreachable_redis_is_a_store_error(tmp_path: Path) -> None:
    store = SessionStore(f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(StoreError, match="PING failed"):
        await store.connect()
    with pytest.raises(RuntimeError, match="not connected"):
        await store.load_session("s")


async def test_outage_and_recovery(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        async with SessionStore(server.url, socket_timeout_s=0.5) as store:
            await store.create_session(Session("s"))
            assert await store.append_turn("s", turn(0)) == 1

            # A hung Redis: the call fails after the socket timeout instead of hanging.
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StoreError, match="Timeout"):
                    await store.load_session("s")
                assert time.monotonic() - started < 2.0
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await store.load_session("s") is not None  # the same store works once it answers again

            # A stopped Redis: every operation is a StoreError, promptly.
            server.stop()
            started = time.monotonic()
            calls = [store.ping(), store.load_session("s"), store.append_turn("s", turn(1)), store.acquire("s", "o")]
            for call in calls:
                with pytest.raises(StoreError):
                    await call
            assert time.monotonic() - started < 2.0

            # Redis is back on the same socket: the same store object works again, and nothing was lost.
            server.start()
            await store.ping()
            assert await store.append_turn("s", turn(1)) == 2
            assert [t.index for t in await store.load_turns("s")] == [0, 1]
    finally:
        server.stop()


@contextlib.contextmanager
def paused(server: EmbeddedRedis) -> Iterator[None]:
    """Redis hung (SIGSTOP) for the duration of the block."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def until(read: Callable[[], Awaitable[Any]], want: Any, timeout_s: float = 2.0) -> Any:
    """Poll `read()` until it returns `want` or `timeout_s` passes; the last value read."""
    deadline = time.monotonic() + timeout_s
    while (value := await read()) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return value


async def test_a_timed_out_append_that_did_happen_is_not_stored_twice(tmp_path: Path) -> None:
    """Redis paused mid-append: the call times out, yet Redis runs it when it resumes; the retry counts as done."""
    with EmbeddedRedis(tmp_path / "redis") as server:
        raw = aioredis.Redis.from_url(server.url)
        async with SessionStore(server.url, socket_timeout_s=0.3) as store:
            keys = store.session_keys("s")
            await store.create_session(Session("s"))
            assert await store.append_turn("s", turn(0)) == 1
            t1 = turn(1)
            with paused(server), pytest.raises(StoreError, match="Timeout") as e:
                await store.append_turn("s", t1)
            assert not isinstance(e.value, WriteRejected)  # an unknown outcome: the caller retries
            # The timed-out append did happen once Redis resumed (it sat in Redis's socket buffer) ...
            assert await until(lambda: raw.llen(keys.turns), 2) == 2
            # ... and its retry is recognised: success, the count, no second copy.
            assert await store.append_turn("s", t1) == 2
            assert await store.append_turn("s", turn(2)) == 3
            assert [t.text for t in await store.load_turns("s")] == ["turn 0", "turn 1", "turn 2"]
            session = await store.load_session("s")
            assert session is not None and session.turns == 3
            # Another record at an index already stored stays an error.
            with pytest.raises(WriteRejected, match="already stored with a different record"):
                await store.append_turn("s", turn(1))

            # The other writes, retried after a timeout that did execute, give the answer the first call would have.
            new = Session("t")
            with paused(server), pytest.raises(StoreError, match="Timeout"):
                await store.create_session(new)
            assert await until(lambda: raw.exists(store.session_keys("t").meta), 1) == 1
            assert await store.create_session(new) is True  # not "exists": it is the session we created

            cut = Turn(2, 0, "turn", "cancelled", 21)
            with paused(server), pytest.raises(StoreError, match="Timeout"):
                await store.amend_turn("s", cut)
            await store.amend_turn("s", cut)
            settings = Session("s", output={"format": "pcm16"})
            with paused(server), pytest.raises(StoreError, match="Timeout"):
                await store.save_session(settings)
            await store.save_session(settings)
            session = await store.load_session("s")
            assert session is not None and session.turns == 3 and session.output == {"format": "pcm16"}
            assert [t.text for t in await store.load_turns("s")] == ["turn 0", "turn 1", "turn"]
        await raw.aclose()
