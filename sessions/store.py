"""The session store: sessions, their turns, connection ownership and voices in Redis.

Layout (every key of a session shares a Redis Cluster hash tag, so multi-key scripts stay on one slot):

    {prefix}:s:{<id>}:meta    hash: record (msgpack Session), turns (count), updated_at
    {prefix}:s:{<id>}:turns   list of msgpack Turn, index i at position i
    {prefix}:s:{<id>}:owner   string: the owner id holding the session's live connection, with a lease (PX)
    {{prefix}:v}:<id>         string: msgpack Voice (codes + compressed reference audio)
    {{prefix}:v}:index        hash: voice id -> "bytes:expires_at_ms", the quota's count (voices of a tenant share a slot)

A tenant's keys live under a prefix of its own (`scoped`): `{prefix}:t:<tenant>`, so no tenant reaches another's.

Every write of a session refreshes the TTL of its meta and turns keys (the owner key has its own lease instead).
Multi-key writes are Lua scripts, so they are atomic. Every Redis failure is raised as `StoreError`; socket timeouts
are short so an outage surfaces quickly, and the pool reconnects on its own once Redis is back (also after a restart
of Redis: a dropped pooled connection is replaced by the one retry on a connection error, and scripts are reloaded).

Every write is safe to retry. A call that failed with a plain `StoreError` (a timeout, a dropped connection) may or
may not have been executed; calling it again with the same arguments gives the answer the first call would have
given had it succeeded, and never writes twice:

- `append_turn` of a turn whose index is already stored succeeds (returning the stored count, writing nothing) when
  the stored record is byte-identical to ours: retry with the same `Turn` (its `created_at` included).
- `create_session` of a session whose stored record is byte-identical to ours returns True (it was our create).
- `amend_turn`, `save_session`, `acquire`, `refresh`, `release` and `put_voice` set a value, so are idempotent.

A write that Redis answered and refused raises `WriteRejected` (a `StoreError`): retrying it unchanged cannot help.
One caveat: a timed-out write that Redis executes later still executes (a paused Redis runs what is in its socket
buffers when it resumes), so the retry must carry the same record, not a newer one, to be recognised.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sessions.connection import RedisConnection
from sessions.errors import StoreError
from sessions.model import Session, Turn, Voice
from sessions.serialize import decode, encode

__all__ = ["SessionKeys", "SessionStore", "StoreError", "VoiceQuotaExceeded", "WriteRejected"]

# KEYS: meta, turns. ARGV: record, updated_at, ttl_ms.
# Returns 1 if created, 2 if the id exists with this very record (a retried create), 0 if it exists otherwise.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'record') == ARGV[1] then return 2 end
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'turns', 0, 'updated_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: meta, turns. ARGV: record, updated_at, ttl_ms. Returns 1 if saved, 0 if there is no such session.
_SAVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'updated_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# KEYS: meta, turns. ARGV: index, turn, updated_at, ttl_ms. Returns {status, count}: {1, new count} appended,
# {2, count} already stored (the same bytes at that index: a retry), {3, count} a different record at that index,
# {0, count} the index is past the end, {-1, 0} there is no such session.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local n = tonumber(redis.call('HGET', KEYS[1], 'turns'))
local i = tonumber(ARGV[1])
if i < n then
  if redis.call('LINDEX', KEYS[2], i) ~= ARGV[2] then return {3, n} end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return {2, n}
end
if i > n then return {0, n} end
redis.call('RPUSH', KEYS[2], ARGV[2])
n = redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, n}
"""

# KEYS: meta, turns. ARGV: index, turn, updated_at, ttl_ms.
# Returns {1, count} replaced, {0, count} the index is not stored, {-1, 0} there is no such session.
_AMEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local n = tonumber(redis.call('HGET', KEYS[1], 'turns'))
if tonumber(ARGV[1]) >= n then return {0, n} end
redis.call('LSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, n}
"""

# KEYS: voice, index. ARGV: id, record, ttl_ms (0: none), now_ms, max_count, max_bytes.
# Stores (or replaces) a voice if the tenant stays within its quota; index entries of expired voices are pruned.
# Returns {1, count, bytes} stored (the totals after), {0, count, bytes} over the count, {-1, count, bytes} over bytes.
_PUT_VOICE = """
local now, size, ttl = tonumber(ARGV[4]), string.len(ARGV[2]), tonumber(ARGV[3])
local entries = redis.call('HGETALL', KEYS[2])
local count, bytes = 0, 0
for i = 1, #entries, 2 do
  local n, exp = string.match(entries[i + 1], '^(%d+):(%d+)$')
  n, exp = tonumber(n), tonumber(exp)
  if exp ~= 0 and exp <= now then
    redis.call('HDEL', KEYS[2], entries[i])
  elseif entries[i] ~= ARGV[1] then
    count, bytes = count + 1, bytes + n
  end
end
if count + 1 > tonumber(ARGV[5]) then return {0, count, bytes} end
if bytes + size > tonumber(ARGV[6]) then return {-1, count, bytes} end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
  redis.call('HSET', KEYS[2], ARGV[1], size .. ':' .. (now + ttl))
  if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], size .. ':0')
  redis.call('PERSIST', KEYS[2])
end
return {1, count + 1, bytes + size}
"""

# KEYS: owner. ARGV: owner, lease_ms. Takes a free lease or extends our own.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: owner. ARGV: owner, lease_ms.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: owner. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class WriteRejected(StoreError):
    """Redis answered and refused the write; retrying the same call cannot succeed.

    `reason` says why: "no_session" (never created, or expired), "gap" (an append past the end), "conflict" (another
    record is stored at that index), "not_stored" (an amend of an index not stored yet). `count` is the number of
    stored turns Redis reported (0 for "no_session").
    """

    def __init__(self, message: str, *, reason: str, count: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.count = count


class VoiceQuotaExceeded(WriteRejected):
    """A tenant's voices would pass its quota (reason "voice_count" or "voice_bytes"); `count` and `stored_bytes`
    are what the tenant has stored now."""

    def __init__(self, message: str, *, reason: str, count: int, stored_bytes: int) -> None:
        super().__init__(message, reason=reason, count=count)
        self.stored_bytes = stored_bytes


class SessionKeys(NamedTuple):
    meta: str
    turns: str
    owner: str


class SessionStore:
    """A narrow async interface to sessions in Redis over one connection pool (`connect` ... `aclose`).

    `redis`: a URL, or the process's shared `RedisConnection` (see `sessions.connection`); the store owns it either
    way: `connect` makes its pool, `aclose` releases it."""

    def __init__(
        self,
        redis: str | RedisConnection,
        *,
        session_ttl_s: int = 86400,
        voice_ttl_s: int | None = 30 * 86400,
        key_prefix: str = "shoal",
        socket_timeout_s: float = 2.0,
    ) -> None:
        if session_ttl_s <= 0:
            raise ValueError("session_ttl_s must be positive")
        if voice_ttl_s is not None and voice_ttl_s <= 0:
            raise ValueError("voice_ttl_s must be positive or None (no expiry)")
        if not isinstance(redis, RedisConnection):
            redis = RedisConnection(redis, socket_timeout_s=socket_timeout_s)
        self.redis = redis
        self.url = self.redis.url
        self.session_ttl_s = session_ttl_s
        self.voice_ttl_s = voice_ttl_s
        self.key_prefix = key_prefix
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._namespace: str | None = None  # set on a tenant's view (`scoped`)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Make the connection pool and check that Redis answers (raises `StoreError` if it does not)."""
        if self._redis is not None:
            return
        client = await self.redis.connect()
        self._scripts = {
            name: client.register_script(src)
            for name, src in [
                ("create", _CREATE),
                ("save", _SAVE),
                ("append", _APPEND),
                ("amend", _AMEND),
                ("acquire", _ACQUIRE),
                ("refresh", _REFRESH),
                ("release", _RELEASE),
                ("put_voice", _PUT_VOICE),
            ]
        }
        self._redis = client
        try:
            await self.ping()
        except StoreError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._redis = None
        await self.redis.aclose()

    async def __aenter__(self) -> SessionStore:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def scoped(self, namespace: str | None) -> SessionStore:
        """A view of this store whose keys live under ``{prefix}:t:<namespace>`` (a tenant's own); ``None``: this
        store. The view shares the connection pool: connect and close the original only."""
        if namespace is None:
            return self
        view = copy.copy(self)
        view.key_prefix = f"{self.key_prefix}:t:{namespace}"
        view._namespace = namespace
        return view

    async def ping(self) -> None:
        with _errors("PING"):
            await self._client.ping()

    # -- keys ------------------------------------------------------------------------------------------------------

    def session_keys(self, session_id: str) -> SessionKeys:
        base = f"{self.key_prefix}:s:{{{session_id}}}"
        return SessionKeys(f"{base}:meta", f"{base}:turns", f"{base}:owner")

    def voice_key(self, voice_id: str) -> str:
        return f"{{{self.key_prefix}:v}}:{voice_id}"

    def voice_index_key(self) -> str:
        return f"{{{self.key_prefix}:v}}:index"

    # -- sessions --------------------------------------------------------------------------------------------------

    async def create_session(self, session: Session) -> bool:
        """Store a new session with no turns. True if it is stored now: created by this call, or already stored with
        a byte-identical record (the retry of a create whose answer was lost; nothing is written then). False, and
        nothing written, if the id exists with another record."""
        if session.turns != 0:
            raise ValueError("a new session has no turns; append them with append_turn")
        k = self.session_keys(session.id)
        with _errors("create_session"):
            created = await self._eval(
                "create", keys=[k.meta, k.turns], args=[encode(session), repr(time.time()), self._session_ttl_ms]
            )
        return created in (1, 2)

    async def load_session(self, session_id: str) -> Session | None:
        with _errors("load_session"):
            fields = await self._client.hgetall(self.session_keys(session_id).meta)
        if not fields:
            return None
        try:
            record, turns, updated_at = fields[b"record"], int(fields[b"turns"]), float(fields[b"updated_at"])
        except (KeyError, ValueError) as e:
            raise StoreError(f"malformed session meta for {session_id!r}: {e!r}") from e
        session = decode(_bytes(record), Session)
        session.turns, session.updated_at = turns, updated_at
        return session

    async def save_session(self, session: Session) -> None:
        """Save the session's settings (speakers, output, sampling) and refresh its TTL; `turns` is not touched."""
        k = self.session_keys(session.id)
        with _errors("save_session"):
            saved = await self._eval(
                "save", keys=[k.meta, k.turns], args=[encode(session), repr(time.time()), self._session_ttl_ms]
            )
        if not saved:
            raise WriteRejected(f"no session {session.id!r} to save (never created, or expired)", reason="no_session")

    async def append_turn(self, session_id: str, turn: Turn) -> int:
        """Atomically append `turn` and return the stored turn count.

        `turn.index` must equal the stored count, or be an index already stored with this very record (byte for
        byte: the same `Turn`, `created_at` included), which is a retry of an append that did happen: nothing is
        written and the current count is returned. Raises `WriteRejected` with reason "no_session", "gap" (index past
        the end) or "conflict" (another record stored at that index; use `amend_turn` to replace one), and a plain
        `StoreError` when Redis failed (a timeout or a dropped connection: the append may have happened, retry it).
        """
        return await self._write_turn("append", session_id, turn)

    async def amend_turn(self, session_id: str, turn: Turn) -> None:
        """Replace the stored record at `turn.index` (e.g. a turn cut by the listener's playback report after it was
        stored), refreshing the session's TTL; atomic, and idempotent. Raises `WriteRejected` with reason
        "no_session" or "not_stored" (that index has not been appended yet)."""
        await self._write_turn("amend", session_id, turn)

    async def load_turns(self, session_id: str, start: int = 0) -> list[Turn]:
        """The stored turns from index `start` on, in order."""
        if start < 0:
            raise ValueError("start must be >= 0")
        with _errors("load_turns"):
            items = await self._client.lrange(self.session_keys(session_id).turns, start, -1)
        return [decode(_bytes(item), Turn) for item in items]

    # -- ownership: one live connection per session ----------------------------------------------------------------

    async def acquire(self, session_id: str, owner: str, lease_ms: int = 15000) -> bool:
        """Take the session's lease for `owner` (or extend it if `owner` holds it); False if another owner does."""
        _check_lease(owner, lease_ms)
        with _errors("acquire"):
            held = await self._eval("acquire", keys=[self.session_keys(session_id).owner], args=[owner, lease_ms])
        return bool(held)

    async def refresh(self, session_id: str, owner: str, lease_ms: int) -> bool:
        """Extend the lease if `owner` still holds it; False if it expired or another owner took it."""
        _check_lease(owner, lease_ms)
        with _errors("refresh"):
            held = await self._eval("refresh", keys=[self.session_keys(session_id).owner], args=[owner, lease_ms])
        return bool(held)

    async def release(self, session_id: str, owner: str) -> None:
        """Drop the lease if `owner` holds it; a lease held by another owner is left alone."""
        with _errors("release"):
            await self._eval("release", keys=[self.session_keys(session_id).owner], args=[owner])

    # -- voices ----------------------------------------------------------------------------------------------------

    async def put_voice(self, voice: Voice, *, max_count: int = 1 << 30, max_bytes: int = 1 << 62) -> int:
        """Store (or replace) a voice by id, with `voice_ttl_s` (None: kept until deleted), if this namespace then
        holds at most `max_count` voices of at most `max_bytes` stored bytes (a replaced voice no longer counts).
        Returns the record's size in bytes. Raises `VoiceQuotaExceeded` (nothing written) if it would not fit."""
        record = encode(voice)
        ttl_ms = 0 if self.voice_ttl_s is None else self.voice_ttl_s * 1000
        with _errors("put_voice"):
            status, count, stored = await self._eval(
                "put_voice", keys=[self.voice_key(voice.voice), self.voice_index_key()],
                args=[voice.voice, record, ttl_ms, int(time.time() * 1000), max_count, max_bytes],
            )
        status, count, stored = int(status), int(count), int(stored)
        if status == 0:
            raise VoiceQuotaExceeded(f"{count} voices are stored, the most allowed is {max_count}",
                                     reason="voice_count", count=count, stored_bytes=stored)
        if status == -1:
            raise VoiceQuotaExceeded(
                f"{stored} bytes of voices are stored; {len(record)} more would pass the {max_bytes} allowed",
                reason="voice_bytes", count=count, stored_bytes=stored)
        return len(record)

    async def get_voice(self, voice_id: str) -> Voice | None:
        with _errors("get_voice"):
            data = await self._client.get(self.voice_key(voice_id))
            if data is None and self._namespace is None:  # stored before voices had an index (not counted)
                data = await self._client.get(f"{self.key_prefix}:v:{{{voice_id}}}")
        return None if data is None else decode(_bytes(data), Voice)

    # -- internals -------------------------------------------------------------------------------------------------

    @property
    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("SessionStore is not connected; await connect() first")
        return self._redis

    async def _write_turn(self, script: str, session_id: str, turn: Turn) -> int:
        if turn.index < 0:
            raise ValueError("turn.index must be >= 0")
        k = self.session_keys(session_id)
        with _errors(f"{script}_turn"):
            status, count = await self._eval(
                script, keys=[k.meta, k.turns], args=[turn.index, encode(turn), repr(time.time()), self._session_ttl_ms]
            )
        status, count = int(status), int(count)
        if status in (1, 2):
            return count
        where = f"turn {turn.index} of session {session_id!r}"
        if status == -1:
            raise WriteRejected(
                f"no session {session_id!r} to {script} a turn of (never created, or expired)", reason="no_session"
            )
        if script == "amend":
            raise WriteRejected(
                f"cannot amend {where}: only {count} turns are stored", reason="not_stored", count=count
            )
        if status == 3:
            raise WriteRejected(
                f"{where} is already stored with a different record (a conflicting double write; amend_turn replaces)",
                reason="conflict",
                count=count,
            )
        raise WriteRejected(
            f"turn index {turn.index} does not follow the {count} stored turns of session {session_id!r}"
            " (an out-of-order write)",
            reason="gap",
            count=count,
        )

    async def _eval(self, script: str, *, keys: list[str], args: list[Any]) -> Any:
        if self._redis is None:
            raise RuntimeError("SessionStore is not connected; await connect() first")
        return await self._scripts[script](keys=keys, args=args)

    @property
    def _session_ttl_ms(self) -> int:
        return self.session_ttl_s * 1000


def _bytes(value: bytes | str) -> bytes:
    assert isinstance(value, bytes), "the client is made with decode_responses=False"
    return value


def _check_lease(owner: str, lease_ms: int) -> None:
    if not owner:
        raise ValueError("owner must be a non-empty string")
    if lease_ms <= 0:
        raise ValueError("lease_ms must be positive")


@contextlib.contextmanager
def _errors(operation: str) -> Iterator[None]:
    """Raise every Redis or socket failure inside as one `StoreError`."""
    try:
        yield
    except (RedisError, OSError) as e:  # OSError covers socket errors and builtin TimeoutError
        raise StoreError(f"redis {operation} failed: {type(e).__name__}: {e}") from e
