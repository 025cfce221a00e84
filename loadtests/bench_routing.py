"""Route planning time for a big swarm: 1000 peers on a 64-block model (issue 18's goal: <= 10 ms).

Peers get random spans of 4-16 blocks (random starts), throughputs of 50-200 tokens/s, 0-3 live
sessions, a measured gateway round trip of 1-50 ms, and 8 announced next-hop round trips each
(`PeerRecord.next_rtt`), like the records a gateway plans from. Each plan is timed on its own
(`gateway.routing.plan_route`, relay and push): wall time (median and 90th percentile over
`--plans` plans) and CPU time (median; on a loaded machine wall time also counts the waits for a
core).
Plans reuse the snapshot's index (`routing.snapshot_index`, built by the first plan, as in the
gateway, which plans every route of a refresh period from one snapshot); its build time is timed
on its own (`snapshot_index`).
Side by side in the same run, the same plans with whole spans only (the planner before sub-spans:
no prefix or suffix edges), to show what the sub-span edges cost.

    python -m loadtests.bench_routing [--peers 1000] [--blocks 64] [--plans 200]
                                      [--out loadtests/results/routing_plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from unittest import mock

from discovery.records import PeerRecord
from gateway import routing
from loadtests.swarm_bench import command_line, write_results

REPO = Path(__file__).resolve().parent.parent


def swarm(peers: int, blocks: int, seed: int) -> tuple[list[PeerRecord], dict[str, float]]:
    rng = random.Random(seed)
    addresses = [f"10.{i // 250}.{i % 250}.1:7000" for i in range(peers)]
    records, rtt = [], {}
    for i, address in enumerate(addresses):
        length = rng.randint(4, 16)
        start = rng.randint(0, blocks - length)
        next_rtt = {other: rng.uniform(1.0, 80.0) for other in rng.sample(addresses, 8)}
        records.append(
            PeerRecord(
                peer_id=f"peer{i}",
                address=address,
                model="m",
                start=start,
                end=start + length,
                num_blocks=blocks,
                throughput=rng.uniform(50, 200),
                live_sessions=rng.randint(0, 3),
                free_cache_tokens=100_000,
                expires_at=time.time() + 3600,
                next_rtt=next_rtt,
            )  # fmt: skip
        )
        rtt[address] = rng.uniform(0.001, 0.050)
    return records, rtt


def whole_spans_only(peers, start, end, push=False):
    """The edges of the planner before sub-spans: each peer's (clipped) span, nothing else."""
    edges: dict[int, list[tuple[int, int]]] = {}
    for index, (begin, finish) in enumerate(zip(peers.start, peers.end, strict=True)):
        edges.setdefault(begin, []).append((finish, index))
    return edges


def time_index(records, repeats: int = 20) -> dict:
    """Building a snapshot's index (`routing.SnapshotIndex`): paid by the first plan of each
    snapshot only, every later plan of it reuses the index."""
    times, cpu = [], []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        routing.SnapshotIndex(records).announced_pairs()
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return {
        "median_ms": round(statistics.median(times) * 1000, 3),
        "cpu_median_ms": round(statistics.median(cpu) * 1000, 3),
    }


def time_plans(records, rtt, blocks: int, plans: int, push: bool) -> dict:
    times, cpu, hops, sub = [], [], [], 0
    for seed in range(plans):
        began, began_cpu = time.perf_counter(), time.process_time()
        route = routing.plan_route(records, blocks, rng=random.Random(seed), rtt=rtt, push=push)
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
        hops.append(len(route))
        by_id = {r.peer_id: r for r in records}
        sub += sum((h.start, h.end) != (by_id[h.peer_id].start, by_id[h.peer_id].end) for h in route)
    times.sort()
    return {
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 3),
        "cpu_median_ms": round(statistics.median(cpu) * 1000, 3),
        "mean_hops": round(statistics.mean(hops), 2),
        "sub_span_hops_per_route": round(sub / plans, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--plans", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "routing_plan.json")
    args = parser.parse_args(argv)
    records, rtt = swarm(args.peers, args.blocks, args.seed)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "command": command_line("loadtests.bench_routing", argv),
        "peers": args.peers,
        "blocks": args.blocks,
        "plans": args.plans,
        "rows": [],
    }
    result["snapshot_index"] = time_index(records)
    print(json.dumps({"snapshot_index": result["snapshot_index"]}))
    for push in (False, True):  # alternate the two planners so that load changes hit both alike
        for edges in ("sub-spans", "whole spans only"):
            if edges == "sub-spans":
                row = time_plans(records, rtt, args.blocks, args.plans, push)
            else:
                with mock.patch.object(routing, "_sub_span_edges", whole_spans_only):
                    row = time_plans(records, rtt, args.blocks, args.plans, push)
            row = {"mode": "push" if push else "relay", "edges": edges, **row}
            result["rows"].append(row)
            print(json.dumps(row))
    result["machine"]["loadavg_end"] = os.getloadavg()
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
