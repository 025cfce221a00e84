"""A swarm member's identity: an Ed25519 keypair kept in a file, and the peer id derived from it.

Every peer and gateway has one. A peer's id is the hash of its public key (`peer_id_of`), so a DHT
record that carries the public key and a signature by it (`discovery.signing`) proves that it was
written by the owner of that id: nobody can announce in another peer's name, move its address or
write its tombstone. The key file is created on first start (mode 0600) and reused afterwards, so
a restarted peer keeps its id; a process holds an exclusive lock on it while it runs, because two
processes with one id would overwrite each other's records.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PEER_ID_HEX_CHARS = 32  # 128 bits of the key's SHA-256: collisions need ~2^64 keys
PUBLIC_KEY_CHARS = 43  # 32 bytes, unpadded base64url


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Unpadded base64url -> bytes; ValueError when malformed."""
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not base64url: {exc}") from None


def peer_id_of(public_key: str) -> str:
    """The peer id that belongs to a base64url Ed25519 public key."""
    return hashlib.sha256(b64decode(public_key)).hexdigest()[:PEER_ID_HEX_CHARS]


def verify_signature(public_key: str, signature: str, data: bytes) -> bool:
    """True when `signature` (base64url) is `public_key`'s Ed25519 signature of `data`; never raises."""
    try:
        raw_key = b64decode(public_key)
        raw_sig = b64decode(signature)
        if len(raw_key) != 32 or len(raw_sig) != 64:
            return False
        Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_sig, data)
        return True
    except (ValueError, InvalidSignature):
        return False


def identity_in_use(path: str | os.PathLike[str]) -> bool:
    """Whether another process holds the identity file `path` (see `Identity.load_or_create`)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


class Identity:
    """An Ed25519 private key with its public key and peer id."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None):
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = b64encode(raw)
        self.peer_id = peer_id_of(self.public_key)
        self.path = path
        self._lock_file = None

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity that lives only in memory (tests, one-shot readers)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str], *, lock: bool = True) -> Identity:
        """The identity kept in `path` (PEM, PKCS#8), created there (mode 0600) if absent.

        With `lock`, the file stays exclusively locked for the life of the process; a second
        process gets ValueError instead of silently sharing the id.
        """
        path = Path(path).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            # O_EXCL: two processes creating the same file at once must not end with two keys
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(pem)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a PEM Ed25519 private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        identity = cls(key, path)
        if lock:
            identity._lock(path)
        return identity

    def _lock(self, path: Path) -> None:
        handle = open(path, "rb")  # noqa: SIM115 - held (and locked) for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ValueError(
                f"identity file {path} is in use by another process; give each peer its own (--identity-file)"
            ) from None
        self._lock_file = handle

    def sign(self, data: bytes) -> str:
        """The base64url Ed25519 signature of `data`."""
        return b64encode(self._key.sign(data))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r}, path={str(self.path) if self.path else None!r})"
