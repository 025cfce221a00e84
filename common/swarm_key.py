"""The swarm key: the shared secret that makes a swarm private (see docs/security.md).

A swarm key is 32 random bytes, kept as 64 hex characters in a file (`--swarm-key-file`, or the
path in the SWARM_KEY_FILE environment variable). Members prove they hold it with HMAC-SHA256:
* every DHT datagram carries a tag (`discovery.dht`), so non-members cannot read or write records;
* every gRPC call to a peer carries `member_metadata` (`x-swarm-member`): the caller's public key,
  a timestamp, a nonce and an HMAC over them and the method name. Peers check it in
  `common.grpc_security.MemberCheck` and answer UNAUTHENTICATED otherwise.

Without a swarm key the swarm is open, as before: anyone may join, and records are still signed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

ENV_VAR = "SWARM_KEY_FILE"
KEY_BYTES = 32
METADATA_KEY = "x-swarm-member"
MAX_SKEW_S = 60.0  # a credential is accepted this long around its timestamp (clocks must agree)


def create_swarm_key(path: str | os.PathLike[str]) -> Path:
    """Write a new random swarm key to `path` (mode 0600); refuses to overwrite an existing one."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path


def load_swarm_key(path: str | os.PathLike[str] | None) -> bytes | None:
    """The key in `path` (else in $SWARM_KEY_FILE); None when neither is given: an open swarm.

    ValueError, with the reason, for a file that is missing or does not hold 64 hex characters.
    """
    if not path:
        path = os.environ.get(ENV_VAR) or None
    if not path:
        return None
    path = Path(path).expanduser()
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the swarm key file {path}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"{path} must hold a swarm key of {2 * KEY_BYTES} hex characters (`swarm up --private` makes one)"
        )
    return key


def key_fingerprint(key: bytes) -> str:
    """A short name for a swarm key that reveals nothing of it (for logs and startup lines)."""
    return hashlib.sha256(b"swarm-key-fingerprint\n" + key).hexdigest()[:12]


def _mac(key: bytes, method: str, public_key: str, timestamp: str, nonce: str) -> str:
    message = "\n".join(("swarm-grpc-v1", method, public_key, timestamp, nonce)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def member_metadata(
    key: bytes, public_key: str, method: str, now: float | None = None
) -> tuple[tuple[str, str], ...]:
    """gRPC metadata proving that the caller (`public_key`) holds the swarm key, for one call of `method`."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(8)
    mac = _mac(key, method, public_key, timestamp, nonce)
    return ((METADATA_KEY, f"{public_key},{timestamp},{nonce},{mac}"),)


def check_member(
    key: bytes, value: str | None, method: str, now: float | None = None
) -> tuple[str | None, str]:
    """(caller's public key, "") when `value` is a valid credential for `method`; else (None, reason)."""
    if not value:
        return None, "missing"
    parts = value.split(",")
    if len(parts) != 4:
        return None, "malformed"
    public_key, timestamp, nonce, mac = parts
    try:
        stamp = float(timestamp)
    except ValueError:
        return None, "malformed"
    if not hmac.compare_digest(mac.encode(), _mac(key, method, public_key, timestamp, nonce).encode()):
        return None, "bad_mac"
    if abs((time.time() if now is None else now) - stamp) > MAX_SKEW_S:
        return None, "stale"
    return public_key, ""
