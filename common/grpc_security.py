"""Security of the gRPC hop between gateways and peers: swarm membership and mutual TLS.

* `MemberCheck`, a server interceptor: in a private swarm every call must carry a valid
  `common.swarm_key` credential; others end with UNAUTHENTICATED before any handler runs, and are
  counted. A credential is single-use (its nonce is remembered for its validity window), so one
  captured from a plaintext connection cannot be replayed.
* `TlsFiles`: mutual TLS. A peer serves with its certificate and requires a client certificate
  signed by the swarm's CA; a client (gateway) checks the peer's certificate against the same CA
  and presents its own. So only holders of a CA-signed certificate talk to peers at all, and a
  plaintext client's handshake fails (docs/security.md says why mutual TLS).
* `ClientSecurity`: what a client attaches: the channel credentials and the membership metadata.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.swarm_key import MAX_SKEW_S, METADATA_KEY, check_member, key_fingerprint, member_metadata

log = logging.getLogger(__name__)

INFO_METHOD = "/swarm.Peer/Info"
INFERENCE_METHOD = "/swarm.Peer/Inference"
PUSH_METHOD = "/swarm.Peer/Push"  # peer to peer (peer.forwarding)


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of a certificate chain, its private key, and the CA that members' certificates
    are signed by (None: trust the system's roots, and do not ask clients for certificates)."""

    cert: bytes
    key: bytes
    ca: bytes | None = None

    @classmethod
    def load(cls, cert: str | None, key: str | None, ca: str | None = None) -> TlsFiles | None:
        """From file paths; None when no certificate is given. ValueError names what is missing."""
        if not cert and not key and not ca:
            return None
        if not cert or not key:
            raise ValueError("TLS needs both --tls-cert and --tls-key")

        def read(path: str) -> bytes:
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {path}: {exc.strerror}") from None

        return cls(read(cert), read(key), read(ca) if ca else None)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


@dataclass(frozen=True)
class ClientSecurity:
    """What a gRPC client of peers presents: membership metadata and TLS, each when configured."""

    swarm_key: bytes | None = None
    public_key: str = ""  # the caller's identity (`common.identity`), named in its credential
    tls: TlsFiles | None = None

    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        if self.swarm_key is None:
            return ()
        return member_metadata(self.swarm_key, self.public_key, method)


def _deny(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED."""
    message = f"not a member of this swarm ({reason}): calls need the swarm key's credential"

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            deny_unary, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        deny_unary, handler.request_deserializer, handler.response_serializer
    )


class MemberCheck(grpc.aio.ServerInterceptor):
    """Admits only calls that carry a valid, unused swarm credential; counts the others by reason."""

    MAX_REMEMBERED = 200_000  # nonces inside the validity window; past it the oldest are forgotten

    def __init__(self, swarm_key: bytes):
        self._key = swarm_key
        self.rejected: Counter = Counter()
        self._seen: dict[str, float] = {}  # credential -> when it stops being valid
        self._prune_at = 4096

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        value = None
        for key, item in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                value = item if isinstance(item, str) else item.decode("latin-1")
                break
        now = time.time()
        member, reason = check_member(self._key, value, handler_call_details.method, now)
        if member is not None and value in self._seen:
            member, reason = None, "replayed"
        if member is None:
            self.rejected[reason] += 1
            log.info("refused a %s call: %s", handler_call_details.method, reason)
            return _deny(handler, reason)
        self._remember(value, now)
        return handler

    def _remember(self, value: str, now: float) -> None:
        if len(self._seen) >= self._prune_at:
            self._seen = {item: until for item, until in self._seen.items() if until > now}
            self._prune_at = max(4096, 2 * len(self._seen))
            while len(self._seen) >= self.MAX_REMEMBERED:  # a flood of valid calls: forget the oldest
                del self._seen[next(iter(self._seen))]
        self._seen[value] = now + 2 * MAX_SKEW_S


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def security_summary(swarm_key: bytes | None, tls: TlsFiles | None) -> str:
    """How this process talks to the swarm, for its startup line."""
    swarm = f"private swarm (key {key_fingerprint(swarm_key)})" if swarm_key else "open swarm (no swarm key)"
    transport = "plaintext gRPC" if tls is None else "mutual TLS" if tls.ca else "TLS"
    return f"{swarm}, {transport}"


def listen_warning(host: str) -> str:
    """The startup line's note for a listener that other machines can reach."""
    return "" if is_loopback(host) else f"; LISTENING BEYOND LOOPBACK on {host or '0.0.0.0'}"
