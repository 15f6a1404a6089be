"""Durable sessions: the record (`model`), its serializer (`serialize`), the Redis store (`store`), the engine-worker
registry (`registry`), the Redis connection pool they share (`connection`), their one error (`errors`) and an
embedded Redis (`embedded`)."""

from sessions.connection import RedisConnection
from sessions.embedded import EmbeddedRedis, default_data_dir, find_redis_server
from sessions.model import SCHEMA_VERSION, TURN_STATES, Session, Speaker, Turn, Voice
from sessions.serialize import decode, encode
from sessions.errors import StoreError
from sessions.store import SessionKeys, SessionStore

__all__ = [
    "SCHEMA_VERSION",
    "TURN_STATES",
    "EmbeddedRedis",
    "RedisConnection",
    "Session",
    "SessionKeys",
    "SessionStore",
    "Speaker",
    "StoreError",
    "Turn",
    "Voice",
    "decode",
    "default_data_dir",
    "encode",
    "find_redis_server",
]
