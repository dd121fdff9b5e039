"""Encryption of open hub messages (CLARIFICATIONS.md, "Open hub").

The key is ``password[8:24]`` of the link's MQTT password (16 ASCII characters: AES-128).

- version "1.0": AES-ECB with PKCS7 padding, base64 (Tuya's smart-home SDK path);
- version "2.0": AES-GCM, base64(4-byte big-endian IV length || 12-byte IV || ciphertext || 16-byte
  tag), with the decimal digits of the message's ``t`` as associated data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSIONS = ("1.0", "2.0")
_IV_LEN = 12


class DecryptError(ValueError):
    """A message that does not decrypt with the given key (wrong key, tampered, malformed)."""


def key_from_password(password: str) -> bytes:
    key = password[8:24].encode()
    if len(key) != 16:
        raise ValueError("an open hub password must have at least 24 ASCII characters")
    return key


def encrypt(version: str, key: bytes, plaintext: bytes, t: int) -> str:
    if version == "1.0":
        padder = padding.PKCS7(128).padder()
        padded = padder.update(plaintext) + padder.finalize()
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        return base64.b64encode(enc.update(padded) + enc.finalize()).decode()
    if version == "2.0":
        iv = os.urandom(_IV_LEN)
        sealed = AESGCM(key).encrypt(iv, plaintext, str(t).encode())  # ciphertext || tag
        return base64.b64encode(_IV_LEN.to_bytes(4, "big") + iv + sealed).decode()
    raise ValueError(f"unknown message encryption version {version!r}")


def decrypt(version: str, key: bytes, data: str, t: int | str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
        if version == "1.0":
            dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
            padded = dec.update(raw) + dec.finalize()
            unpadder = padding.PKCS7(128).unpadder()
            return unpadder.update(padded) + unpadder.finalize()
        if version == "2.0":
            iv_len = int.from_bytes(raw[:4], "big")
            if iv_len < 8 or iv_len > 64 or len(raw) < 4 + iv_len + 16:
                raise DecryptError("bad IV length")
            iv = raw[4 : 4 + iv_len]
            return AESGCM(key).decrypt(iv, raw[4 + iv_len :], str(t).encode())
    except DecryptError:
        raise
    except Exception as exc:
        raise DecryptError(f"message does not decrypt: {exc.__class__.__name__}") from None
    raise ValueError(f"unknown message encryption version {version!r}")


def sign(key: bytes, data: str, t: int) -> str:
    """The envelope's ``sign``: hex HMAC-SHA256 over ``data`` followed by the digits of ``t``."""
    return hmac.new(key, (data + str(t)).encode(), hashlib.sha256).hexdigest()
