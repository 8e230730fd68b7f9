"""Signed indexes: Ed25519 keys, made by `provision keygen`.

A publisher signs every index it writes; a consumer that pins a public key (in its pin file,
its config, `--public-key` or $PROVISION_PUBLIC_KEY) refuses an index that is unsigned, signed by
another key, or changed after signing.

The signature covers the index document without its `signature` member, serialized canonically
(sorted keys, no spaces, UTF-8), so it survives any re-indentation but no change of content.
Public keys are one line: `ed25519:<base64 of the 32 raw bytes>`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from provision.errors import ProvisionError, StoreError
from provision.fsutil import write_atomic

KEY_PREFIX = "ed25519:"
SIGNATURE = "signature"


class SignatureError(StoreError):
    """An index is unsigned, signed by a key not trusted, or altered after signing."""


def _raw_public(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: str, where: str = "public key") -> str:
    """Validate a public key's text and return it normalized."""
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise ProvisionError(f"{where}: {text[:40]!r} is not an Ed25519 public key "
                             f"({KEY_PREFIX}<base64>, as printed by `provision keygen`)")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
        return _raw_public(Ed25519PublicKey.from_public_bytes(raw))
    except (binascii.Error, ValueError):
        raise ProvisionError(f"{where}: {text[:40]!r} is not a valid Ed25519 public key") from None


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    path: Path

    @property
    def public_key(self) -> str:
        return _raw_public(self.key.public_key())

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data)).decode()


def generate_key(path: Path, *, force: bool = False) -> Signer:
    """Write a new private key (PEM, mode 0600) at `path` and its public key at `path`.pub."""
    if path.exists() and not force:
        raise ProvisionError(f"{path} exists; not overwriting a signing key (use --force)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    signer = Signer(key, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, pem, mode=0o600)
        write_atomic(path.with_name(path.name + ".pub"), signer.public_key + "\n")
    except OSError as e:
        raise ProvisionError(f"cannot write {path}: {e.strerror}") from None
    return signer


def load_signer(path: Path) -> Signer:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProvisionError(f"cannot read signing key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ProvisionError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvisionError(f"{path}: not an Ed25519 key (make one with `provision keygen`)")
    if os.stat(path).st_mode & 0o077:
        raise ProvisionError(f"{path}: signing key is readable by others (chmod 600 it)")
    return Signer(key, path)


def canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_document(doc: dict[str, Any], signer: Signer) -> dict[str, Any]:
    return {**doc, SIGNATURE: {"key": signer.public_key, "sig": signer.sign(canonical(doc))}}


def verify_document(doc: dict[str, Any], trusted: str | None, where: str) -> str | None:
    """Check `doc`'s signature. With a trusted key, an unsigned document or another key's
    signature is refused; without one, a signature is checked for integrity only. Returns the
    key the document is signed by, if any."""
    sig = doc.get(SIGNATURE)
    if sig is None:
        if trusted is not None:
            raise SignatureError(f"{where}: index is not signed, but a signing key is pinned "
                                 f"({trusted[:20]}…)")
        return None
    try:
        key_text = parse_public_key(str(sig["key"]), where)
        raw_sig = base64.b64decode(str(sig["sig"]), validate=True)
    except (KeyError, TypeError, binascii.Error, ProvisionError):
        raise SignatureError(f"{where}: index has a malformed signature") from None
    if trusted is not None and key_text != trusted:
        raise SignatureError(f"{where}: index is signed by {key_text[:20]}…, not by the pinned "
                             f"key {trusted[:20]}…")
    pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(key_text[len(KEY_PREFIX):]))
    try:
        pub.verify(raw_sig, canonical(doc))
    except InvalidSignature:
        raise SignatureError(f"{where}: index signature does not match its content "
                             f"(altered after signing?)") from None
    return key_text
