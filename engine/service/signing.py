"""Publisher signatures over freeze manifests: HMAC-SHA256 (shared secret) or Ed25519.

The signed message is the manifest's ``digest()`` (SHA-256 of its canonical JSON without the
``signature`` field), prefixed with a domain tag so a signature made for a manifest can never be
replayed as a signature over some other kind of object signed with the same key. The signature
is stored in the manifest itself::

    "signature": {"alg": "ed25519", "key_id": "3f1c...", "digest": "<manifest digest>",
                  "value": "<hex>"}

``digest`` is informational (it lets a refusal say "edited after signing" rather than just "bad
signature"); verification always recomputes the digest and checks ``value`` over that.

Key files:

* HMAC: a text file holding the secret as hex, at least 32 bytes (64 hex digits).
* Ed25519: PEM, PKCS#8 private key (``-----BEGIN PRIVATE KEY-----``) for signing, or
  SubjectPublicKeyInfo (``-----BEGIN PUBLIC KEY-----``) for a service that only verifies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from freezeasguard.engine.errors import SignatureError
from freezeasguard.engine.guard.manifest import Manifest
from freezeasguard.engine.io import atomic_write_bytes

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGORITHMS = (HMAC_SHA256, ED25519)
_TAG = b"freezeasguard.manifest-signature/1\x00"
_MIN_HMAC_BYTES = 32
_HEX = re.compile(r"^[0-9a-f]+$")


def _message(digest: str) -> bytes:
    return _TAG + digest.encode("ascii")


@dataclass(frozen=True)
class HmacKey:
    """A shared HMAC-SHA256 secret (the service that verifies can also sign)."""

    secret: bytes = dataclasses.field(repr=False)
    alg: ClassVar[str] = HMAC_SHA256

    def __post_init__(self) -> None:
        if len(self.secret) < _MIN_HMAC_BYTES:
            raise SignatureError(f"HMAC key has {len(self.secret)} bytes; at least {_MIN_HMAC_BYTES} "
                                 "are required")

    @property
    def key_id(self) -> str:
        # A hash of the secret under its own tag: identifies the key without revealing it (the
        # secret has >= 256 bits, so the id cannot be inverted by guessing).
        return hashlib.sha256(b"freezeasguard.key-id/1\x00" + self.secret).hexdigest()[:16]

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def verify(self, message: bytes, signature: bytes) -> bool:
        # compare_digest runs in time independent of where the bytes first differ, so a
        # verifier that answers many queries leaks nothing about the expected MAC.
        return hmac.compare_digest(self.sign(message), signature)


@dataclass(frozen=True)
class Ed25519Key:
    """An Ed25519 key pair, or only its public half (enough to verify)."""

    public: Any  # cryptography's Ed25519PublicKey
    private: Any = dataclasses.field(default=None, repr=False)  # Ed25519PrivateKey or None
    alg: ClassVar[str] = ED25519

    @property
    def key_id(self) -> str:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()[:16]

    def sign(self, message: bytes) -> bytes:
        if self.private is None:
            raise SignatureError("this Ed25519 key holds only the public half; it can verify, not sign")
        return self.private.sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


Key = HmacKey | Ed25519Key


# ------------------------------------------------------------------------------------------ keys
def new_hmac_key() -> HmacKey:
    return HmacKey(secrets.token_bytes(_MIN_HMAC_BYTES))


def new_ed25519_key() -> Ed25519Key:
    private = Ed25519PrivateKey.generate()
    return Ed25519Key(public=private.public_key(), private=private)


def _write_secret(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_bytes(path, data, private=True)  # 0600 from creation, never readable by others


def save_key(key: Key, path: str | os.PathLike, *, public_path: str | os.PathLike | None = None) -> Path:
    """Write a key file (and, for Ed25519, optionally the public half to ``public_path``)."""
    if isinstance(key, HmacKey):
        if public_path is not None:
            raise SignatureError("an HMAC key has no public half")
        return _write_secret(path, key.secret.hex().encode("ascii") + b"\n")
    if public_path is not None:
        atomic_write_bytes(public_path, key.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if key.private is None:
        return atomic_write_bytes(path, key.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return _write_secret(path, key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def load_key(path: str | os.PathLike, algorithm: str | None = None) -> Key:
    """Read a key file; ``algorithm`` (if given) must match what the file holds.

    Raises:
        SignatureError naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"key file {str(path)!r} does not exist") from None
    where = f"key file {str(path)!r}"
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            if b"PRIVATE KEY" in data:
                private = serialization.load_pem_private_key(data, password=None)
                if not isinstance(private, Ed25519PrivateKey):
                    raise SignatureError(f"{where}: a {type(private).__name__}, not an Ed25519 key")
                key: Key = Ed25519Key(public=private.public_key(), private=private)
            else:
                public = serialization.load_pem_public_key(data)
                if not isinstance(public, Ed25519PublicKey):
                    raise SignatureError(f"{where}: a {type(public).__name__}, not an Ed25519 key")
                key = Ed25519Key(public=public)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"{where}: not a readable PEM key ({exc})") from None
    else:
        text = data.decode("ascii", errors="replace").strip().lower()
        if not text or len(text) % 2 or not _HEX.match(text):
            raise SignatureError(f"{where}: expected an HMAC secret as hex digits or an Ed25519 PEM key")
        try:
            key = HmacKey(bytes.fromhex(text))
        except SignatureError as exc:
            raise SignatureError(f"{where}: {exc}") from None
    if algorithm is not None and key.alg != algorithm:
        raise SignatureError(f"{where} holds an {key.alg} key, but {algorithm} is required")
    return key


# ------------------------------------------------------------------------------------ signatures
def sign_digest(digest: str, key: Key) -> dict[str, str]:
    """The signature record of a manifest digest (64 hex digits)."""
    if not (len(digest) == 64 and _HEX.match(digest)):
        raise SignatureError(f"not a SHA-256 hex digest: {digest!r}")
    return {"alg": key.alg, "key_id": key.key_id, "digest": digest,
            "value": key.sign(_message(digest)).hex()}


def signature_problem(digest: str, signature: Any, key: Key) -> str | None:
    """Why ``signature`` is not a valid signature by ``key`` over ``digest`` (None if it is)."""
    if signature is None:
        return "the manifest is not signed"
    if not isinstance(signature, dict) or not all(isinstance(signature.get(k), str)
                                                  for k in ("alg", "key_id", "value")):
        return "the signature must be an object with string 'alg', 'key_id' and 'value'"
    if signature["alg"] != key.alg:
        return f"signed with {signature['alg']!r}, but the policy requires {key.alg!r}"
    if signature["key_id"] != key.key_id:
        return (f"signed by key {signature['key_id']!r}, not by the publisher key {key.key_id!r}")
    try:
        value = bytes.fromhex(signature["value"])
    except ValueError:
        return "the signature value is not hex"
    if key.verify(_message(digest), value):
        return None
    signed = signature.get("digest")
    if isinstance(signed, str) and signed != digest:
        return (f"the manifest was edited after signing: its digest is {digest[:16]}..., the "
                f"signed digest was {signed[:16]}...")
    return "the signature does not verify (forged, or made over different content)"


def verify_digest(digest: str, signature: Any, key: Key) -> None:
    problem = signature_problem(digest, signature, key)
    if problem is not None:
        raise SignatureError(problem)


def sign_manifest(manifest: Manifest, key: Key) -> Manifest:
    """A copy of ``manifest`` carrying ``key``'s signature over its digest."""
    return dataclasses.replace(manifest, signature=sign_digest(manifest.digest(), key))


def verify_manifest(manifest: Manifest, key: Key) -> None:
    """Raise ``SignatureError`` unless ``manifest`` carries a valid signature by ``key``."""
    verify_digest(manifest.digest(), manifest.signature, key)
