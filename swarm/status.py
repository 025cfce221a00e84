"""`swarm status`: the swarm as a table in the terminal, read straight from the DHT."""

from __future__ import annotations

import time

from swarm.dht import PeerRecord, SwarmDHT


def format_table(records_by_model: dict[str, list[PeerRecord]], num_blocks: dict[str, int]) -> str:
    lines = []
    header = f"{'peer':<16} {'address':<22} {'blocks':<9} {'dtype':<9} {'quant':<5} {'state':<8} " \
             f"{'tok/s':>7} {'sessions':>8} {'free cache':>10} {'expires':>7}"  # fmt: skip
    now = time.time()
    for model, records in sorted(records_by_model.items()):
        total = num_blocks.get(model, 0)
        covered = sorted({block for r in records if r.state == "online" for block in range(r.start, r.end)})
        missing = [block for block in range(total) if block not in covered]
        state = "all blocks covered" if total and not missing else f"missing blocks {missing}"
        lines.append(f"model {model}: {total} blocks, {len(records)} peers, {state}")
        lines.append("  " + header)
        for r in sorted(records, key=lambda r: (r.start, r.end, r.peer_id)):
            lines.append(
                f"  {r.peer_id[:16]:<16} {r.address:<22} {f'[{r.start},{r.end})':<9} {r.dtype:<9} {r.quant:<5} "
                f"{r.state:<8} {r.throughput:>7.1f} {r.live_sessions:>8} {r.free_cache_tokens:>10} "
                f"{max(0.0, r.expires_at - now):>6.0f}s"
            )
        lines.append("")
    return "\n".join(lines) if lines else "no models announced in the DHT"


async def print_status(bootstrap: list[tuple[str, int]], model: str | None = None) -> int:
    dht = SwarmDHT()
    await dht.start("127.0.0.1" if all(h in ("127.0.0.1", "localhost") for h, _ in bootstrap) else "0.0.0.0", 0, bootstrap)
    try:
        models = await dht.models()
        if model:
            models = {model: models.get(model, 0)}
        records = {name: await dht.peers(name) for name in models}
    finally:
        dht.stop()
    print(format_table(records, models))
    return 0
