"""Durable sessions: the record (`model`), its serializer (`serialize`), the Redis store and an embedded Redis."""

from sessions.embedded import EmbeddedRedis, default_data_dir, find_redis_server
from sessions.model import SCHEMA_VERSION, TURN_STATES, Session, Speaker, Turn, Voice
from sessions.serialize import decode, encode
from sessions.store import SessionKeys, SessionStore, StoreError

__all__ = [
    "SCHEMA_VERSION",
    "TURN_STATES",
    "EmbeddedRedis",
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
