"""What a block peer says about itself in the DHT, and the names both sides use for it.

`PeerRecord` is network input for every reader, so construction validates every field (ValueError)
and string fields are length-capped: one record stays far below the DHT's store limit whatever a
peer puts in it (see `discovery.entries`). It is the one description of a peer: the peer builds it
(`peer.identity.describe`), announces it, and answers `Info` and `/metrics` from it.

Precision names live here because the peer announces them and the gateway routes by them:
a peer's precision is its weight quantization when it has one, else its compute dtype.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute and wire dtypes, as spelled everywhere
QUANT_MODES = ("none", "int8", "nf4")
PRECISIONS = (*DTYPE_NAMES, *QUANT_MODES[1:])
# How far two honest peers of one precision may disagree on a step's hidden states: the largest
# |a - b| over the largest |b| of the rows compared (`gateway.answer_checks.hidden_distance`).
# fp32 replicas differ by batch composition only (~1e-6); half precisions round each block's
# output (2^-8 for bfloat16); dynamic int8 quantizes activations per pass, so its outputs move
# with the batch; a re-execution check bans a peer only past its record's tolerance.
TOLERANCES = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2, "int8": 0.15, "nf4": 0.25}


class PeerState(enum.StrEnum):
    ONLINE = "online"
    DRAINING = "draining"  # finishing its sessions before it leaves: no new ones


def precision_name(dtype: str, quant: str) -> str:
    """The label a peer serves under: the quant mode when quantized, else the compute dtype."""
    return quant if quant and quant != "none" else dtype


def default_tolerance(precision: str) -> float:
    return TOLERANCES.get(precision, max(TOLERANCES.values()))


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; ValueError when malformed."""
    if not isinstance(address, str):
        raise ValueError(f"address must be a string 'host:port', got {type(address).__name__}")
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must look like 'host:port', got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses must be bracketed like '[::1]:port', got {address!r}")
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"address has an invalid host: {address!r}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"address has a non-numeric port: {address!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"address port must be in 1..65535: {address!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Caps keep one entry far below MAX_STORE_BYTES whatever a peer puts in its strings.
_STR_LIMITS = {
    "peer_id": 128,
    "address": 256,
    "model": 256,
    "dtype": 32,
    "quant": 32,
    "state": 16,
    "version": 64,
}
_INT_FIELDS = ("start", "end", "num_blocks", "free_cache_tokens", "live_sessions", "metrics_port", "move_start",
               "move_end")  # fmt: skip
_FLOAT_FIELDS = ("throughput", "expires_at", "tolerance")
_MAY_BE_EMPTY = ("version",)


MAX_NEXT_RTT = 8  # announced round trips per record: a few nearest next hops, ~0.5 KB at most
MAX_RTT_MS = 60_000.0


def _next_rtt(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ValueError(f"next_rtt must be an object of address -> ms, got {type(value).__name__}")
    if len(value) > MAX_NEXT_RTT:
        raise ValueError(f"next_rtt holds at most {MAX_NEXT_RTT} entries")
    out = {}
    for address, ms in value.items():
        if not isinstance(address, str) or len(address) > _STR_LIMITS["address"]:
            raise ValueError("next_rtt keys must be addresses of at most 256 characters")
        parse_address(address)
        if not is_finite_number(ms) or not 0 <= ms <= MAX_RTT_MS:
            raise ValueError(f"next_rtt values must be milliseconds in [0, {MAX_RTT_MS:g}]")
        out[address] = float(ms)
    return out


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PeerRecord:
    """What a block peer says about itself in the DHT. Construction validates (ValueError)."""

    peer_id: str
    address: str  # "host:port" of the peer's gRPC server
    model: str
    start: int  # blocks [start, end)
    end: int
    num_blocks: int  # blocks in the whole model
    dtype: str = "float32"
    quant: str = "none"
    throughput: float = 0.0  # tokens/s
    free_cache_tokens: int = 0
    live_sessions: int = 0
    state: PeerState = PeerState.ONLINE
    version: str = ""
    expires_at: float = 0.0  # unix time
    metrics_port: int = 0  # HTTP port of the peer's Prometheus /metrics on its host; 0 = not served
    # hidden-state disagreement this peer expects from an honest replica (see TOLERANCES); 0: the
    # default of its precision (records of older peers)
    tolerance: float = 0.0
    # Round trips (ms) this peer measured to peers it pushed steps to, by their address: its few
    # nearest (`peer.forwarding`). The planner charges them for the edge between two hops in push
    # mode. Not hashed: a record's identity is its other fields.
    next_rtt: dict[str, float] = dataclasses.field(default_factory=dict, hash=False)
    # The peer chose its span itself (no --blocks: `peer.block_selection`) and may move it.
    auto_span: bool = False
    # A move in progress (`peer.balancer`): the span [move_start, move_end) the peer is moving to,
    # announced with `draining`; 0, 0 when not moving. Other peers count it as served already, so
    # two peers do not both move onto the same gap. Records of older peers lack both: not moving.
    move_start: int = 0
    move_end: int = 0

    def __post_init__(self) -> None:
        for name, limit in _STR_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > limit or (not value and name not in _MAY_BE_EMPTY):
                raise ValueError(f"{name} must be 1..{limit} characters")
        for name in _INT_FIELDS:
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ValueError(f"{name} must be a finite number")
            object.__setattr__(self, name, float(value))
        if not 0 <= self.start < self.end <= self.num_blocks:
            raise ValueError(f"span [{self.start}, {self.end}) is not inside 0..{self.num_blocks}")
        if (self.move_start, self.move_end) != (
            0,
            0,
        ) and not 0 <= self.move_start < self.move_end <= self.num_blocks:
            raise ValueError(
                f"move target [{self.move_start}, {self.move_end}) is not inside 0..{self.num_blocks}"
            )
        if not isinstance(self.auto_span, bool):
            raise ValueError("auto_span must be true or false")
        if self.throughput < 0 or self.free_cache_tokens < 0 or self.live_sessions < 0:
            raise ValueError("throughput, free_cache_tokens and live_sessions must be >= 0")
        if not 0 <= self.tolerance <= 1:
            raise ValueError("tolerance must be in [0, 1]")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")
        if self.state not in PeerState.__members__.values():
            raise ValueError(f"state must be one of {[s.value for s in PeerState]}, got {self.state!r}")
        object.__setattr__(self, "state", PeerState(self.state))
        parse_address(self.address)
        object.__setattr__(self, "next_rtt", _next_rtt(self.next_rtt))

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: object) -> PeerRecord:
        """Parse network input; unknown keys are ignored (newer peers), missing required ones are not."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a peer record must be a JSON object, got {type(data).__name__}")
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in data:
                kwargs[field.name] = data[field.name]
            elif field.default is dataclasses.MISSING:
                raise ValueError(f"peer record lacks {field.name!r}")
        return cls(**kwargs)

    def with_expiry(self, expires_at: float) -> PeerRecord:
        return dataclasses.replace(self, expires_at=expires_at)

    def is_expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)

    @property
    def moving_to(self) -> tuple[int, int] | None:
        """The span this peer is moving to, or None."""
        return (self.move_start, self.move_end) if self.move_end > 0 else None

    @property
    def precision(self) -> str:
        return precision_name(self.dtype, self.quant)

    @property
    def check_tolerance(self) -> float:
        """The tolerance a re-execution check applies to this peer's hidden states."""
        return self.tolerance or default_tolerance(self.precision)
