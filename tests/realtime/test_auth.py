"""Keys, tokens and origins without a server: what a credential grants, and what it does not."""

from __future__ import annotations

import time

import jwt
import pytest

from realtime.auth import AuthError, KeyRing, OriginPolicy, Principal

RING = KeyRing({"acme": "acme-key", "globex": "globex-key"})


def test_keys_parse_from_lines_or_commas_and_refuse_nonsense() -> None:
    ring = KeyRing.parse("# keys\nacme:acme-key\n\nglobex globex-key  # trailing comment\n")
    assert ring.keys == {"acme": "acme-key", "globex": "globex-key"}
    assert KeyRing.parse("a:1,b:2").keys == {"a": "1", "b": "2"}
    for bad in ("acme", "acme:", "a:1\na:2", "bad\ntenant:k", "a:same,b:same"):
        with pytest.raises(ValueError):
            KeyRing.parse(bad)


def test_each_key_is_its_tenant_and_no_keys_means_open() -> None:
    assert RING.authenticate("globex-key") == Principal(tenant="globex", via="key")
    with pytest.raises(AuthError, match="missing"):
        RING.authenticate(None)
    with pytest.raises(AuthError):
        RING.authenticate("acme-key2")
    assert KeyRing().authenticate(None) == Principal()  # auth off: the default tenant, as before
    assert Principal(tenant="acme").namespace == "acme" and Principal().namespace is None


def test_a_token_carries_tenant_session_scopes_and_expiry() -> None:
    token, expires = RING.issue("acme", ttl_s=60, session="room-1", scopes=["realtime"])
    assert expires - time.time() == pytest.approx(60, abs=2)
    who = RING.authenticate(token)
    assert who == Principal(tenant="acme", scopes=frozenset({"realtime"}), session="room-1", via="token")
    assert not who.may("voices")
    old, _ = RING.issue("acme", ttl_s=60, now=time.time() - 120)
    with pytest.raises(AuthError, match="expired"):
        RING.verify(old)
    with pytest.raises(ValueError):
        RING.issue("acme", scopes=["admin"])
    with pytest.raises(ValueError):
        RING.issue("acme", session="abc\n")
    with pytest.raises(ValueError):
        RING.issue("initech")


def test_a_token_cannot_be_moved_to_another_tenant_or_outlive_its_key() -> None:
    token, _ = RING.issue("acme")
    claims = jwt.decode(token, options={"verify_signature": False})
    # re-signed by someone who knows only the token, claiming globex: the signature is globex's derived key's
    forged = jwt.encode(claims, "a guess at the secret, 32 bytes long", algorithm="HS256", headers={"kid": "globex"})
    with pytest.raises(AuthError, match="invalid token"):
        RING.verify(forged)
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "acme"})
    with pytest.raises(AuthError):
        RING.verify(unsigned)
    rotated = KeyRing({"acme": "new-acme-key", "globex": "globex-key"})
    with pytest.raises(AuthError):
        rotated.verify(token)  # replacing a key revokes its tokens


def test_origins() -> None:
    own = OriginPolicy.default(auth=True)
    assert own.allows(None, "127.0.0.1:8000")  # not a browser
    assert own.allows("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert not own.allows("https://evil.example", "127.0.0.1:8000")
    assert not own.allows("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert OriginPolicy.default(auth=False).allows("https://evil.example", "x")
    listed = OriginPolicy(("https://app.example.com",))
    assert listed.allows("https://APP.example.com", "api.example.com")
    assert not listed.allows("https://app.example.com.evil.example", "api.example.com")
    with pytest.raises(ValueError):
        OriginPolicy(("app.example.com",))
