"""A model with 1000 peers in a DHT of a few hundred nodes, on this machine (issue 18, "Internet
scale, by simulation").

Real `discovery.dht.SwarmDHT` nodes on loopback UDP: `--nodes` of them spread over `--workers`
processes (one asyncio loop each), which announce `--peers` signed records of one model (a peer
announces through one of the nodes with its own identity, as the DHT node of a real peer would).
Peers join `--join-wave` at a time, then re-announce `--settle` times after a review of their place
in the shard tree (`discovery.shards`), as their heartbeats would. Records live `--record-ttl`
seconds (the workers do not heartbeat during the measurements: 1000 peers re-announcing every 5 s
would need more CPU than this shared machine has). This process then runs a gateway's DHT node and
measures, in turn:

* one key: a read of the model's root shard (the single key of before sharding), with the crawl of
  its nearest nodes reused (`CRAWL_REUSE_S`) and with a fresh crawl (alpha 3 and `--wide-alpha`);
* the whole model: `SwarmDHT.peers`, the read a gateway's snapshot refresh makes every second,
  warm (crawl reused) and cold (fresh crawl), and the first read of a new node (no signature
  checked yet);
* the gateway's snapshot: `SwarmView.peers(fresh=True)`;
* route planning over the 1000 records (`gateway.routing.plan_route`, relay and push);
* announce traffic: `--sample-peers` extra peers in this process with a real `Announcer`
  (heartbeat 5 s, ttl 15 s) for `--minute` seconds; bytes sent and received by their nodes.

    python -m loadtests.sim_dht_scale [--nodes 300] [--peers 1000] [--workers 2] [--reads 200]
        [--out loadtests/results/dht_scale.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

from common.identity import Identity
from discovery.announcer import Announcer
from discovery.dht import READ_REPLICAS, SwarmDHT
from discovery.records import PeerRecord
from discovery.shards import ROOT, model_shard_key
from loadtests.swarm_bench import command_line, write_results

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim/llama-70b"
NUM_BLOCKS = 80
SPAN_LENGTHS = (4, 8, 10, 16, 20)


def make_record(index: int, identity: Identity, expires_at: float) -> PeerRecord:
    rng = random.Random(index)
    if index < NUM_BLOCKS // 10:  # the first few cover the model end to end
        start, end = index * 10, index * 10 + 10
    else:
        length = rng.choice(SPAN_LENGTHS)
        start = rng.randrange(0, NUM_BLOCKS - length + 1)
        end = start + length
    return PeerRecord(
        peer_id=identity.peer_id,
        address=f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}:50051",
        model=MODEL,
        start=start,
        end=end,
        num_blocks=NUM_BLOCKS,
        throughput=rng.uniform(5.0, 50.0),
        free_cache_tokens=rng.choice((4096, 16384, 65536)),
        live_sessions=rng.randrange(0, 8),
        version="0.1.0",
        expires_at=expires_at,
    )


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50_ms": round(at(0.5) * 1e3, 3), "p99_ms": round(at(0.99) * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3)}  # fmt: skip


async def timed(call, n: int, before=None) -> tuple[dict[str, float], list]:
    """Wall time of `n` calls, and this process's CPU time in them (the reader's own work; the
    rest is the DHT nodes' answers, and waiting for a turn on a loaded machine)."""
    samples, cpu, results = [], [], []
    for _ in range(n):
        if before is not None:
            before()
        begin, cpu_begin = time.perf_counter(), time.process_time()
        results.append(await call())
        samples.append(time.perf_counter() - begin)
        cpu.append(time.process_time() - cpu_begin)
    figures = quantiles(samples)
    figures["reader_cpu_p50_ms"] = quantiles(cpu)["p50_ms"]
    return figures, results


# --------------------------------------------------------------------------- worker process


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _say(**message) -> None:
    print(json.dumps(message), flush=True)


async def worker(args: argparse.Namespace) -> None:
    """Start this worker's nodes, announce its peers on request, serve until stdin closes."""
    nodes: list[SwarmDHT] = []
    boot = [("127.0.0.1", args.bootstrap_port)] if args.bootstrap_port else []
    for _ in range(args.count):
        dht = SwarmDHT(rpc_timeout=2.0, review_s=3600.0)
        await dht.start("127.0.0.1", 0, boot or ([("127.0.0.1", nodes[0].port)] if nodes else []))
        nodes.append(dht)
    _say(nodes=len(nodes), port=nodes[0].port)
    await _read_line()  # "announce"
    expires_at = time.time() + args.record_ttl
    peers = [(j, Identity.generate()) for j in range(args.first_peer, args.first_peer + args.peers)]
    records = {j: make_record(j, identity, expires_at) for j, identity in peers}
    by_node: dict[int, list[tuple[int, Identity]]] = {}
    for position, (j, identity) in enumerate(peers):
        by_node.setdefault(position % len(nodes), []).append((j, identity))
    wave = asyncio.Semaphore(args.join_wave)

    async def announce_all(node: SwarmDHT, mine: list[tuple[int, Identity]]) -> None:
        for j, identity in mine:
            async with wave:
                node.identity = identity
                await node.announce(records[j])

    begin = time.perf_counter()
    await asyncio.gather(*(announce_all(nodes[i], mine) for i, mine in by_node.items()))
    joined_s = time.perf_counter() - begin
    for node in nodes:
        node.review_s = (
            0.0  # the next announce of every peer reviews its place, as a heartbeat after REVIEW_S would
        )
    settle_s = []
    for _ in range(args.settle):
        begin = time.perf_counter()
        await asyncio.gather(*(announce_all(nodes[i], mine) for i, mine in by_node.items()))
        settle_s.append(time.perf_counter() - begin)
    moved = sum(1 for node in nodes for (_, shard) in node._places.values() if shard != ROOT)
    _say(announced=len(peers), joined_s=round(joined_s, 2), settle_s=[round(s, 2) for s in settle_s],
         below_root=moved)  # fmt: skip
    await _read_line()  # EOF or "stop"
    for node in nodes:
        node.stop()


# --------------------------------------------------------------------------- the measuring process


class ByteCounter:
    """Counts the UDP bytes a node sends and receives (its transport and its protocol, wrapped)."""

    def __init__(self, dht: SwarmDHT):
        self.sent = self.received = 0
        protocol = dht._server.protocol
        transport, counter = protocol.transport, self

        class Counting:
            def sendto(self, data, addr=None):
                counter.sent += len(data)
                transport.sendto(data, addr)

            def __getattr__(self, name):
                return getattr(transport, name)

        protocol.transport = Counting()
        received = protocol.datagram_received

        def counting_received(data, addr):
            counter.received += len(data)
            received(data, addr)

        protocol.datagram_received = counting_received

    def reset(self) -> None:
        self.sent = self.received = 0


async def start_workers(args) -> tuple[list[asyncio.subprocess.Process], int]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    per_worker = [args.nodes // args.workers + (i < args.nodes % args.workers) for i in range(args.workers)]
    peers_per = [args.peers // args.workers + (i < args.peers % args.workers) for i in range(args.workers)]
    procs, port, first = [], 0, 0
    for i in range(args.workers):
        cmd = [sys.executable, "-m", "loadtests.sim_dht_scale", "--worker", "--count", str(per_worker[i]),
               "--bootstrap-port", str(port), "--first-peer", str(first), "--peers", str(peers_per[i]),
               "--join-wave", str(args.join_wave), "--settle", str(args.settle),
               "--record-ttl", str(args.record_ttl)]  # fmt: skip
        first += peers_per[i]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        ready = json.loads(await proc.stdout.readline())
        port = port or ready["port"]
        procs.append(proc)
    return procs, port


async def measure(args) -> dict:
    from gateway.routing import plan_route
    from gateway.swarm_view import SwarmView

    out_load = {"load_at_start": os.getloadavg()}
    began = time.perf_counter()
    procs, boot_port = await start_workers(args)
    started_s = time.perf_counter() - began
    print(f"{args.nodes} nodes up in {started_s:.1f}s; announcing {args.peers} peers", flush=True)
    for proc in procs:
        proc.stdin.write(b"announce\n")
        await proc.stdin.drain()
    joins = [json.loads(await proc.stdout.readline()) for proc in procs]
    print("announced:", joins, flush=True)
    boot = [("127.0.0.1", boot_port)]
    out: dict = {**out_load, "nodes_started_s": round(started_s, 1), "join": joins}
    try:
        gateway = SwarmDHT(rpc_timeout=2.0)
        await gateway.start("127.0.0.1", 0, boot)
        first_read_begin = time.perf_counter()
        records = await gateway.peers(MODEL)
        out["first_read_of_a_new_node_ms"] = round((time.perf_counter() - first_read_begin) * 1e3, 1)
        out["records_found"] = len(records)
        out["tree"] = dict(gateway.last_read)
        print(f"first read: {len(records)} records, {gateway.last_read}, {out['first_read_of_a_new_node_ms']} ms",
              flush=True)  # fmt: skip
        root = model_shard_key(MODEL, ROOT)
        server = gateway._server

        def cold() -> None:
            server._crawls.clear()

        async def one_key():
            return len((await server.read_values([root]))[root])

        out["one_key_warm"], _ = await timed(one_key, args.reads)
        out["one_key_cold_alpha3"], _ = await timed(one_key, args.reads // 2, cold)

        def whole():
            return gateway.peers(MODEL)

        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            await timed(whole, 20)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        out["whole_model_warm"], found = await timed(whole, args.reads)
        out["whole_model_warm"]["min_records"] = min(map(len, found))
        out["whole_model_warm"].update(gateway.last_read)  # shards and rounds of a warm read
        server.read_replicas = 1  # side by side: what asking 3 replicas of every shard costs
        out["whole_model_warm_1_replica"], found = await timed(whole, args.reads // 2)
        out["whole_model_warm_1_replica"]["min_records"] = min(map(len, found))
        server.read_replicas = READ_REPLICAS
        out["whole_model_cold_alpha3"], found = await timed(whole, args.reads // 2, cold)
        out["whole_model_cold_alpha3"]["min_records"] = min(map(len, found))
        server.alpha = args.wide_alpha
        out[f"one_key_cold_alpha{args.wide_alpha}"], _ = await timed(one_key, args.reads // 2, cold)
        out[f"whole_model_cold_alpha{args.wide_alpha}"], found = await timed(whole, args.reads // 2, cold)
        server.alpha = 3
        view = SwarmView(gateway)
        out["gateway_snapshot"], found = await timed(lambda: view.peers(MODEL, fresh=True), args.reads)
        out["gateway_snapshot"]["min_records"] = min(map(len, found))
        records = found[-1]
        # wall time, and this process's CPU time: with the machine's load at 8-10 on 2 cores, a
        # plan that takes 1 ms of CPU can take 10+ ms of wall time while this process waits its turn
        plan_samples = {"relay": [], "push": [], "relay_cpu": [], "push_cpu": []}
        rng = random.Random(0)
        for _ in range(args.reads):
            for mode in ("relay", "push"):
                begin, cpu = time.perf_counter(), time.process_time()
                route = plan_route(records, NUM_BLOCKS, rng=rng, push=mode == "push")
                plan_samples[mode].append(time.perf_counter() - begin)
                plan_samples[mode + "_cpu"].append(time.process_time() - cpu)
                if route is None:
                    raise RuntimeError("the simulated records do not cover the model")
        out["route_planning"] = {mode: quantiles(s) for mode, s in plan_samples.items()}
        out["route_planning"]["records"] = len(records)
        print(json.dumps({k: v for k, v in out.items() if k != "join"}, indent=1), flush=True)
        out["announce_traffic"] = await announce_traffic(args, boot)
        print("announce traffic:", out["announce_traffic"], flush=True)
        gateway.stop()
    finally:
        for proc in procs:
            if proc.stdin and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
    return out


async def announce_traffic(args, boot) -> dict:
    """Bytes per peer per minute of real heartbeats (5 s, ttl 15 s) of `--sample-peers` peers that
    join after the others (so their reviews walk a full tree), side by side with as many peers
    announcing as before this change: a crawl before every store, the `models` entry every
    heartbeat (and no review after the first)."""
    groups = {"now": [], "before": []}
    for i in range(2 * args.sample_peers):
        identity = Identity.generate()
        node = SwarmDHT(rpc_timeout=2.0, identity=identity)
        await node.start("127.0.0.1", 0, boot)
        group = "now" if i % 2 == 0 else "before"
        if group == "before":
            node._server.crawl_reuse_s = 0.0
            node.models_refresh_s = 0.0
            node.review_s = float("inf")
        index = args.peers + i

        def record(index=index, identity=identity, node=node) -> PeerRecord:
            return make_record(index, identity, node.clock() + 15.0)

        groups[group].append((node, ByteCounter(node), Announcer(node, record, heartbeat=5.0, ttl=15.0)))
    members = groups["now"] + groups["before"]
    await asyncio.gather(*(announcer.start() for _, _, announcer in members))
    first = {name: [c.sent + c.received for _, c, _ in group] for name, group in groups.items()}
    for _, counter, _ in members:
        counter.reset()
    await asyncio.sleep(args.minute)
    shards = [node._places.get((MODEL, node.identity.peer_id), (0, None))[1] for node, _, _ in groups["now"]]
    for _, _, announcer in members:
        await announcer.stop(withdraw=False)
    out = {"peers_per_group": args.sample_peers, "seconds": args.minute, "heartbeat_s": 5.0,
           "shards_of_sample_peers": shards}  # fmt: skip
    for name, group in groups.items():
        per_minute = [(c.sent + c.received) * 60.0 / args.minute for _, c, _ in group]
        out[name] = {
            "bytes_per_peer_per_minute_mean": round(sum(per_minute) / len(per_minute)),
            "bytes_per_peer_per_minute_max": round(max(per_minute)),
            "first_announce_bytes_mean": round(sum(first[name]) / len(first[name])),
        }
    for node, _, _ in members:
        node.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reads", type=int, default=200, help="samples per lookup figure")
    parser.add_argument("--join-wave", type=int, default=16, help="peers announcing at once per worker")
    parser.add_argument("--settle", type=int, default=2, help="re-announces with a review after joining")
    parser.add_argument("--record-ttl", type=float, default=1800.0)
    parser.add_argument("--wide-alpha", type=int, default=8)
    parser.add_argument("--sample-peers", type=int, default=8)
    parser.add_argument("--minute", type=float, default=60.0, help="seconds of heartbeats measured")
    parser.add_argument("--profile", action="store_true", help="print a profile of 20 warm whole-model reads")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "dht_scale.json"))
    # worker mode (started by the measuring process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-peer", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # late replies under load are expected, not news
    if args.worker:
        asyncio.run(worker(args))
        return 0
    if args.nodes < args.workers or args.peers < 1 or args.reads < 2:
        parser.error("need --nodes >= --workers, --peers >= 1 and --reads >= 2")
    results = asyncio.run(measure(args))
    report = {
        "benchmark": "dht_scale",
        "command": command_line("loadtests.sim_dht_scale", argv),
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("worker", "count", "bootstrap_port", "first_peer")
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **results,
    }
    write_results(Path(args.out), report, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
