"""What an operator configures on a gateway (`swarm gateway` flags and their environment variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.grpc_security import TlsFiles


@dataclass
class GatewaySettings:
    models: dict[str, str]  # model id -> folder (or hub id) holding its tokenizer and config
    dht_bootstrap: list[tuple[str, int]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    dht_port: int = 0
    redis_url: str | None = None
    api_key: str | None = None  # the admin key: every route, no limits (gateway.auth)
    open_ops: bool = False  # /metrics, /swarm, /swarm/api, /docs, /openapi.json stay open to anyone
    keys_file: str | None = None  # serve the API keys of this file (gateway.keys.FileKeyStore)
    redis_keys: bool = False  # serve the API keys kept in redis_url, shared by replicas
    key_check_interval: float = 1.0  # a stream re-reads its key this often (revoked: it ends)
    # derives the peers' session ids from pins (`Gateway.peer_session_id`); None: random per process
    session_secret: str | None = None
    step_timeout: float = 10.0
    failover_timeout: float = 5.0  # search for a replacement peer this long after a failure
    session_ttl: float = 3600.0
    wire_dtype: str = ""  # dtype hidden states travel in ("" = each sender's compute dtype)
    relay: bool = False  # hidden states through the gateway, not peer to peer (gateway.generation)
    decode_loop: bool = True  # push: the last peer sends each next decode step to the first itself
    max_body_bytes: int = 4 << 20
    max_concurrent: int = 256  # generations in flight before new ones get 429 (0: no limit)
    # re-execute this fraction of steps on a replica and convict peers that lie (gateway.verification)
    verify_fraction: float = 0.01
    verify_ban: float = 3600.0  # seconds a convicted peer (lying or malformed answers) stays banned
    log_prompts: bool = False  # log prompt and completion text (off: logs never hold user text)
    # swarm security (docs/security.md): the gateway's own key (created there on first start; None:
    # a new one in memory), the swarm key of a private swarm, mutual TLS to the peers, and HTTPS
    identity_file: str | None = None
    swarm_key: bytes | None = None
    tls: TlsFiles | None = None
    https_cert: str | None = None
    https_key: str | None = None
