"""What this peer is, stated once: the DHT record, `Info` and the `swarm_peer_info` metric all read it.

`describe` builds the `discovery.records.PeerRecord` that `PeerServer.record()` announces; the
servicer answers `Info` with its fields (plus counters the record does not carry), and `/metrics`
labels `swarm_peer_info` with them. So the three never disagree on the spelling of a dtype or a
state: the dtype name comes from `peer.tensor_codec`, the state from `discovery.records.PeerState`.
"""

from __future__ import annotations

from common.version import VERSION
from discovery.records import PeerRecord, PeerState, default_tolerance, precision_name
from peer.model import BlockSpan
from peer.tensor_codec import dtype_name


def describe(
    span: BlockSpan,
    *,
    peer_id: str,
    model: str,
    address: str,
    throughput: float,
    free_cache_tokens: int,
    live_sessions: int,
    draining: bool,
    expires_at: float = 0.0,
    metrics_port: int = 0,
    next_rtt: dict[str, float] | None = None,
    auto_span: bool = False,
    moving_to: tuple[int, int] | None = None,
) -> PeerRecord:
    """The record of a peer serving `span` (its blocks, dtype and quantization) with this live state."""
    return PeerRecord(
        peer_id=peer_id,
        address=address,
        model=model,
        start=span.start,
        end=span.end,
        num_blocks=span.config.num_hidden_layers,
        dtype=dtype_name(span.dtype),
        quant=span.quant,
        throughput=throughput,
        free_cache_tokens=free_cache_tokens,
        live_sessions=live_sessions,
        state=PeerState.DRAINING if draining else PeerState.ONLINE,
        version=VERSION,
        expires_at=expires_at,
        metrics_port=metrics_port,
        next_rtt=dict(next_rtt or {}),
        auto_span=auto_span,
        move_start=moving_to[0] if moving_to else 0,
        move_end=moving_to[1] if moving_to else 0,
        tolerance=default_tolerance(precision_name(dtype_name(span.dtype), span.quant)),
    )
