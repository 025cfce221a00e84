"""`swarm status`: the swarm as a table in the terminal.

Two sources, one table: the DHT itself (`--dht`, what any machine can see), or a gateway's
`/swarm/api` (`--gateway`, the JSON behind the live map at `/swarm`), which adds whether each peer
answers right now and the routes the gateway is using. Both are turned into the same plain dicts
(`PeerRecord.to_dict()` plus optional fields) and printed by `format_models`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from discovery.dht import SwarmDHT
from discovery.records import PeerRecord

COLUMNS = (
    # title, width, right-aligned
    ("peer", 16, False),
    ("address", 21, False),
    ("blocks", 9, False),
    ("placed", 6, False),  # auto: chose its span itself (may move); pinned: --blocks
    ("moving to", 9, False),  # a move in progress (peer.balancer)
    ("health", 11, False),
    ("sessions", 8, True),
    ("free cache", 10, True),
    ("tok/s", 8, True),
    ("rtt ms", 6, True),  # the gateway's measured round trip (gateway.rtt); "-" read from the DHT
    ("next hops ms", 12, False),  # the round trips the peer measured to peers it pushed to
    ("dtype", 8, False),
    ("quant", 5, False),
    ("expires", 7, True),
    ("batching", 16, False),
    ("pushed/looped", 13, True),  # steps pushed to a next hop / decode-loop steps sent back
)


def batching_cell(peer: dict[str, Any]) -> str:
    """`packed, 2 groups` from the peer's `Info` (the gateway's map); '-' from the DHT alone."""
    batching = peer.get("batching")
    if not batching:
        return "-"
    groups = batching.get("pipeline_groups", 1)
    return f"{'packed' if batching.get('prepacked') else 'plain'}, {groups} group{'s' if groups != 1 else ''}"


def traffic_cell(peer: dict[str, Any]) -> str:
    """`1.2k/980`: steps the peer pushed to a next hop and decode-loop steps it sent back to a
    route's first hop, from its `Info` (the gateway's map); '-' from the DHT alone."""
    traffic = peer.get("traffic")
    if not traffic:
        return "-"
    return f"{_count(traffic['pushed_steps'])}/{_count(traffic['looped_steps'])}"


def _count(n: int) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return str(n)


def moving_cell(peer: dict[str, Any]) -> str:
    """`[0,4)` while the peer moves there, else '-'."""
    start, end = peer.get("move_start", 0), peer.get("move_end", 0)
    return f"[{start},{end})" if end else "-"


def next_rtt_cell(peer: dict[str, Any]) -> str:
    """The nearest next hop's round trip and how many the peer announced: `0.4 (of 2)`."""
    rtts = peer.get("next_rtt") or {}
    return f"{min(rtts.values()):.1f} (of {len(rtts)})" if rtts else "-"


def coverage_bar(peers: list[dict[str, Any]], num_blocks: int) -> str:
    """One character per block: how many online peers serve it (0 shown as '!')."""
    counts = [0] * num_blocks
    for peer in peers:
        if peer.get("state") == "online" and peer.get("health", "online") not in ("unreachable", "banned"):
            for block in range(max(0, peer["start"]), min(num_blocks, peer["end"])):
                counts[block] += 1
    return "".join("!" if c == 0 else (str(c) if c < 10 else "+") for c in counts)


def _row(values: list[str]) -> str:
    cells = []
    for (_, width, right), value in zip(COLUMNS, values, strict=True):
        cells.append(value.rjust(width) if right else value.ljust(width))
    return "  " + " ".join(cells).rstrip()


def format_models(models: list[dict[str, Any]], now: float | None = None) -> str:
    """`models`: [{"id", "num_blocks", "peers": [peer dict], "routes"?: {"active", "recent"}}]."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for model in sorted(models, key=lambda m: m["id"]):
        total, peers = model["num_blocks"], model["peers"]
        bar = coverage_bar(peers, total)
        missing = [block for block, mark in enumerate(bar) if mark == "!"]
        state = "all blocks served" if total and not missing else f"blocks {missing} NOT served"
        lines.append(f"model {model['id']}: {total} blocks, {len(peers)} peers, {state}")
        lines.append(f"  coverage |{bar}|  (online peers per block, ! = none)")
        moving = [peer for peer in peers if peer.get("move_end")]
        if moving:
            lines.append("  moves in progress: " + ", ".join(
                f"{peer['peer_id'][:10]} [{peer['start']},{peer['end']}) -> {moving_cell(peer)}" for peer in moving))  # fmt: skip
        lines.append(_row([title for title, _, _ in COLUMNS]))
        for peer in sorted(peers, key=lambda p: (p["start"], p["end"], p["peer_id"])):
            expires = peer.get("expires_in_s", max(0.0, peer.get("expires_at", now) - now))
            lines.append(
                _row(
                    [
                        peer["peer_id"][:16],
                        peer["address"],
                        f"[{peer['start']},{peer['end']})",
                        "auto" if peer.get("auto_span") else "pinned",
                        moving_cell(peer),
                        peer.get("health", peer["state"]),
                        str(peer["live_sessions"]),
                        str(peer["free_cache_tokens"]),
                        f"{peer['throughput']:.1f}",
                        "-" if peer.get("rtt_ms") is None else f"{peer['rtt_ms']:.1f}",
                        next_rtt_cell(peer),
                        peer["dtype"],
                        peer["quant"],
                        f"{expires:.0f}s",
                        batching_cell(peer),
                        traffic_cell(peer),
                    ]
                )
            )
        routes = model.get("routes")
        if routes is not None:
            active, recent = routes.get("active", []), routes.get("recent", [])
            lines.append(f"  routes: {len(active)} running, last {len(recent)} finished")
            for route in [*active, *recent[:5]]:
                hops = " -> ".join(
                    f"{hop['peer_id'][:10]}[{hop['start']},{hop['end']})" for hop in route["hops"]
                )
                lines.append(
                    f"    {route['outcome']:<9} {route['request_id'][:32]:<32} {hops}  "
                    f"{route['prompt_tokens']}+{route['completion_tokens']} tokens"
                )
        lines.append("")
    return "\n".join(lines) if lines else "no models announced"


def format_table(records_by_model: dict[str, list[PeerRecord]], num_blocks: dict[str, int]) -> str:
    """The table from DHT records (kept for callers of the first version)."""
    models = [
        {"id": model, "num_blocks": num_blocks.get(model, 0), "peers": [r.to_dict() for r in records]}
        for model, records in records_by_model.items()
    ]
    return format_models(models)


async def print_status(
    bootstrap: list[tuple[str, int]], model: str | None = None, swarm_key: bytes | None = None
) -> int:
    dht = SwarmDHT(swarm_key=swarm_key)
    await dht.start(
        "127.0.0.1" if all(h in ("127.0.0.1", "localhost") for h, _ in bootstrap) else "0.0.0.0", 0, bootstrap
    )
    try:
        models = await dht.models()
        if model:
            models = {model: models.get(model, 0)}
        records = {name: await dht.peers(name) for name in models}
    finally:
        dht.stop()
    print(format_table(records, models))
    return 0


def print_gateway_status(
    base_url: str, model: str | None = None, timeout: float = 10.0, api_key: str | None = None
) -> int:
    url = base_url.rstrip("/") + "/swarm/api"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.load(response)
    except urllib.error.HTTPError as exc:
        hint = " (its operator pages need the admin key: --api-key)" if exc.code in (401, 403) else ""
        print(f"cannot read {url}: {exc}{hint}")
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cannot read {url}: {exc}")
        return 1
    models = [m for m in data.get("models", []) if model is None or m["id"] == model]
    print(format_models(models, now=data.get("generated_at")))
    return 0
