"""API keys: 256-bit random, shown once, stored as SHA-256, compared by hash lookup."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select

from app.core.db import Database
from app.models import ApiKey
from app.models.base import utcnow
from app.services.errors import NotFound, Unauthorized

KEY_PREFIX = "hps_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Database, *, owner: str) -> str:
    """A new key for owner; the plain key is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.session() as session:
        session.add(ApiKey(owner=owner, key_hash=hash_key(key), prefix=key[:10]))
    return key


def revoke_key(db: Database, *, prefix_or_key: str) -> int:
    """Revoke keys by their full value or their shown prefix; returns how many."""
    with db.session() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
        hits = [r for r in rows if r.key_hash == hash_key(prefix_or_key) or r.prefix == prefix_or_key]
        if not hits:
            raise NotFound("no active key with that prefix")
        for row in hits:
            row.revoked_at = utcnow()
        return len(hits)


def list_keys(db: Database, *, owner: str | None = None) -> list[ApiKey]:
    """Keys by their shown prefix (never the key), oldest first; revoked ones too, marked by revoked_at."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    with db.read_session() as session:
        return list(session.scalars(query))


def authenticate(db: Database, key: str) -> str:
    """The owner of an active key, else Unauthorized."""
    digest = hash_key(key)
    with db.read_session() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
    # The lookup is by digest; the constant-time compare guards against a lookup that matched loosely.
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        raise Unauthorized("invalid or revoked API key")
    return row.owner
