"""Who may connect, and as whom: API keys (one per tenant), short-lived signed tokens, allowed origins.

API keys belong to back ends. Browsers and devices get a token instead (``POST /v1/tokens``, or ``shoal token``): a
JWT (HS256) naming its tenant (header ``kid``), an expiry, the scopes it may use and optionally the one session it
may open. Its signing secret is derived from the tenant's API key, so it is verified from the key ring alone, with
no store round trip, by any gateway that has the keys; replacing a tenant's key revokes every token made with it.

Every credential resolves to a ``Principal``; a tenant's sessions and voices live in a store namespace of its own
(``Principal.namespace``), so no tenant can read, resume, probe or overwrite another's.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import jwt

from realtime.protocol import valid_id

__all__ = ["AuthError", "KeyRing", "OriginPolicy", "Principal", "SCOPES", "DEFAULT_TENANT", "credential"]

SCOPES = ("realtime", "voices")  # realtime: start and resume sessions; voices: register voices (voice.create)
DEFAULT_TENANT = "default"  # the tenant of a single --api-key, and of everyone when auth is off
TOKEN_TTL_S = 600
MAX_TOKEN_TTL_S = 24 * 3600
_AUDIENCE = "shoal"
_ALGORITHM = "HS256"


class AuthError(Exception):
    """A credential that is missing, unknown, malformed, expired or not good for what was asked."""


@dataclass(frozen=True)
class Principal:
    """Who a connection or request acts for, and what it may do."""

    tenant: str = DEFAULT_TENANT
    scopes: frozenset[str] = frozenset(SCOPES)
    session: str | None = None  # a token bound to one session may open only that one
    via: str = "open"  # open (auth is off) | key | token

    @property
    def namespace(self) -> str | None:
        """The tenant's store namespace; None for the default tenant (the keys it always had)."""
        return None if self.tenant == DEFAULT_TENANT else self.tenant

    def may(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True)
class KeyRing:
    """API keys, one per tenant: ``{tenant: key}``. Empty: auth is off and everyone is the default tenant."""

    keys: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tenant, key in self.keys.items():
            if not valid_id(tenant):
                raise ValueError(f"tenant {tenant!r} must be 1-64 characters of A-Z a-z 0-9 _ . : -")
            if not key or key != key.strip():
                raise ValueError(f"the API key of tenant {tenant!r} is empty or has surrounding blanks")
        if len(set(self.keys.values())) != len(self.keys):
            raise ValueError("two tenants have the same API key")

    @classmethod
    def parse(cls, text: str, where: str = "keys") -> KeyRing:
        """``TENANT:KEY`` (or ``TENANT KEY``) per line or comma-separated entry; ``#`` starts a comment."""
        keys: dict[str, str] = {}
        entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",")]
        for n, entry in enumerate(e for e in entries if e):
            tenant, sep, key = entry.partition(":") if ":" in entry else entry.partition(" ")
            if not sep or not key.strip():
                raise ValueError(f"{where}: entry {n + 1} is not TENANT:KEY")
            if tenant.strip() in keys:
                raise ValueError(f"{where}: tenant {tenant.strip()!r} is listed twice")
            keys[tenant.strip()] = key.strip()
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def tenant_of_key(self, given: str) -> str | None:
        """The tenant whose API key this is (compared in constant time against every key)."""
        found = None
        for tenant, key in self.keys.items():
            if hmac.compare_digest(given.encode(), key.encode()):
                found = tenant
        return found

    def authenticate(self, given: str | None) -> Principal:
        """An API key or a token -> its principal. Raises ``AuthError``; with no keys, everyone is let in."""
        if not self.enabled:
            return Principal()
        if not given:
            raise AuthError("missing credential: send Authorization: Bearer TOKEN (or ?token=TOKEN)")
        tenant = self.tenant_of_key(given)
        if tenant is not None:
            return Principal(tenant=tenant, via="key")
        return self.verify(given)

    def issue(
        self,
        tenant: str,
        *,
        ttl_s: float = TOKEN_TTL_S,
        session: str | None = None,
        scopes: Iterable[str] = SCOPES,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A signed token for ``tenant`` and its expiry (Unix seconds). Raises ``ValueError`` for bad arguments."""
        if tenant not in self.keys:
            raise ValueError(f"no API key for tenant {tenant!r}")
        if not 1 <= ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"ttl_s must be within 1..{MAX_TOKEN_TTL_S}, got {ttl_s}")
        if session is not None and not valid_id(session):
            raise ValueError(f"session {session!r} must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        wanted = sorted(set(scopes))
        unknown = [s for s in wanted if s not in SCOPES]
        if unknown or not wanted:
            raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}, got {', '.join(unknown)}")
        issued = int(time.time() if now is None else now)
        expires = issued + int(ttl_s)
        claims: dict[str, object] = {"aud": _AUDIENCE, "iat": issued, "exp": expires, "scope": " ".join(wanted)}
        if session is not None:
            claims["sid"] = session
        token = jwt.encode(claims, self._secret(tenant), algorithm=_ALGORITHM, headers={"kid": tenant})
        return token, expires

    def verify(self, token: str) -> Principal:
        """Check a token's signature, expiry and claims. Raises ``AuthError`` naming what is wrong."""
        try:
            tenant = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise AuthError("wrong API key or malformed token") from None
        if not isinstance(tenant, str) or tenant not in self.keys:
            raise AuthError("token of an unknown tenant (or signed with a key that was replaced)")
        options = {"require": ["exp", "iat", "aud", "scope"]}
        try:
            claims = jwt.decode(token, self._secret(tenant), algorithms=[_ALGORITHM], audience=_AUDIENCE,
                                options=options, leeway=5)
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired: get a new one (POST /v1/tokens)") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        scopes = frozenset(str(claims["scope"]).split()) & frozenset(SCOPES)
        session = claims.get("sid")
        if session is not None and not (isinstance(session, str) and valid_id(session)):
            raise AuthError("invalid token: bad session claim")
        return Principal(tenant=tenant, scopes=scopes, session=session, via="token")

    def _secret(self, tenant: str) -> bytes:
        """The token-signing secret of a tenant: derived from its key, never the key itself."""
        return hmac.new(self.keys[tenant].encode(), b"shoal token v1", hashlib.sha256).digest()


def credential(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The credential a request carries: ``Authorization: Bearer X``, else ``?token=X`` (browsers' WebSockets
    cannot set headers)."""
    header = headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return query.get("token")


@dataclass(frozen=True)
class OriginPolicy:
    """Which web pages may open a socket (the ``Origin`` a browser sends). Clients that are not browsers send no
    ``Origin`` and are not affected. Entries: ``*`` (any), ``self`` (the page's origin is this server's own
    address, as the client reached it), or origins such as ``https://app.example.com``."""

    allowed: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        for entry in self.allowed:
            if entry in ("*", "self"):
                continue
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise ValueError(f"allowed origin {entry!r} must be *, self or scheme://host[:port]")

    @classmethod
    def default(cls, auth: bool) -> OriginPolicy:
        """Any page while auth is off (a local demo); only the server's own pages once it is on."""
        return cls(("self",) if auth else ("*",))

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or "*" in self.allowed:
            return True
        origin = origin.strip().lower().rstrip("/")
        if origin in (a.lower().rstrip("/") for a in self.allowed):
            return True
        if "self" in self.allowed and host:
            return urlsplit(origin).netloc == host.strip().lower()
        return False
