"""Open hub tables: applications (access id + secret), users, device bindings, API tokens, links.

They share :data:`meterhub.storage.schema.metadata`; the migration that creates them is
``storage/migrations/versions/0003_openhub.py`` (and ``0006_openhub_seen_requests.py``).
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Index, String, Table

from meterhub.storage.schema import metadata

apps = Table(
    "openhub_apps",
    metadata,
    Column("access_id", String(64), primary_key=True),
    Column("secret", String(64), nullable=False),  # HMAC needs the secret itself, not a hash
    Column("name", String(128), nullable=False, unique=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False),
)

users = Table(
    "openhub_users",
    metadata,
    Column("uid", String(64), primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("salt", String(64), nullable=False),
    # Tuya's SDK sends md5(password) (smart-home login) or sha256(password) (custom login):
    # keep a salted PBKDF2 of each digest so either can be checked.
    Column("pw_md5", String(128), nullable=False),
    Column("pw_sha256", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

bindings = Table(
    "openhub_bindings",
    metadata,
    Column("uid", String(64), primary_key=True),
    Column("cid", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Index("ix_openhub_bindings_cid", "cid"),
)

tokens = Table(
    "openhub_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("refresh_hash", String(64), nullable=False, unique=True),
    Column("access_id", String(64), nullable=False),
    Column("uid", String(64)),  # None: a project token (grant_type=1)
    Column("expires_at", Float, nullable=False),
    Column("refresh_expires_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

links = Table(
    "openhub_links",
    metadata,
    Column("id", String(64), primary_key=True),  # random, one per issued credential
    Column("client_id", String(64), nullable=False, index=True),
    Column("uid", String(64), nullable=False, index=True),
    Column("link_id", String(128), nullable=False),
    Column("link_type", String(16), nullable=False),
    Column("username", String(64), nullable=False),
    Column("password", String(64), nullable=False),  # its [8:24] is the message key
    Column("msg_version", String(8), nullable=False),
    Column("source_topic", String(128), nullable=False),
    Column("sink_topic", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
)

# Signed requests already seen (replay protection), shared by every node on the database. ``key`` is
# sha256 hex of the signature (or of the nonce, when the caller sends one); ``expires_at`` is when
# the request's ``t`` leaves the accepted time window, after which the row may be purged.
seen_requests = Table(
    "openhub_seen_requests",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)
