"""How many steps a peer that lies on 10 % of its steps keeps serving before the gateway convicts it
(issue 12), at several `--verify-fraction`s: the median over --runs generations.

An in-process simulation that drives the real code: real peers (`peer.server.PeerServer`, gRPC on
loopback) of the demo model in this process, blocks [0, 2) served by the liar (the test-only
`tests.lying_peer.LyingServicer`, perturbing its hidden states on --lie-fraction of the answers it
gives, check sessions included) and two honest replicas (a check's replica and a referee), blocks
[2, 4) by two honest peers (a check of the last span replays the liar's span on the liar itself); the gateway's `RouteRunner`, `FailurePolicy` and `Verifier` step a
greedy generation on the route liar -> honest, one token at a time, until the liar is convicted
(a new generation starts when one reaches --max-length tokens). Each run has its own policy (no
bans carried over) and its own seeds. A step is one `RouteRunner.step` (the prefill counts as one).

    python -m loadtests.sim_detection [--fractions 0.01,0.05] [--runs 20] [--lie-fraction 0.1]
        [--out loadtests/results/detection.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import time
from pathlib import Path

from loadtests.swarm_bench import write_results

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_peers(model_dir: Path, lie_fraction: float):
    import peer.server
    from peer.server import PeerConfig, PeerServer
    from peer.servicer import PeerServicer
    from tests.lying_peer import LyingServicer

    servers = []
    for start, end, lying in ((0, 2, True), (0, 2, False), (0, 2, False), (2, 4, False), (2, 4, False)):
        os.environ.update(
            LIE_MODE="perturb", LIE_FRACTION=str(lie_fraction), LIE_SEED="1", LIE_THROUGHPUT="0"
        )
        peer.server.PeerServicer = LyingServicer if lying else PeerServicer
        config = PeerConfig(model_dir=model_dir, model_id=MODEL, start=start, end=end, port=free_port(),
                            dht_bootstrap=None, cache_tokens=16384, threads=1)  # fmt: skip
        server = PeerServer(config)
        await server.start()
        servers.append(server)
    peer.server.PeerServicer = PeerServicer
    return servers


async def steps_until_conviction(servers, fraction: float, seed: int, args) -> int | None:
    from common.peer_client import ChannelPool
    from gateway.failure_policy import FailurePolicy
    from gateway.generation import RouteRunner
    from gateway.routing import Hop
    from gateway.swarm_view import SwarmView
    from gateway.verification import Verifier
    from protos import swarm_pb2

    records = [server.record() for server in servers]

    class Swarm(SwarmView):
        async def peers(self, model, fresh=False, timeout=None):
            return records

        def known(self, model):
            return records

    liar, honest_last = records[0], records[3]
    policy = FailurePolicy(replace_timeout=5.0)
    failover = policy.bind(Swarm(dht=None), MODEL, 4)
    verifier = Verifier(fraction, random.Random(seed))
    for server in servers[:1]:
        server.servicer.rng = random.Random(f"liar-{seed}")  # its own draws, independent of the checks
    route = tuple(Hop(r.peer_id, r.address, r.start, r.end) for r in (liar, honest_last))
    pool = ChannelPool()
    rng = random.Random(seed)
    steps = 0
    honest = {r.peer_id for r in records[1:]}
    try:
        while steps < args.max_steps:
            runner = RouteRunner(
                pool, route, 30.0, failover=failover, verifier=verifier, answer_shape=args.shape
            )
            prompt = [rng.randrange(1, 1000) for _ in range(8)]
            await runner.open(args.max_length, swarm_pb2.SamplingParams(), f"sim-{seed}")
            try:
                result = await runner.step(prompt)
                steps += 1
                while len(runner.history) < args.max_length - 1 and steps < args.max_steps:
                    if liar.peer_id in policy.bans.convictions():
                        return steps
                    result = await runner.step([result.token_id])
                    steps += 1
                if liar.peer_id in policy.bans.convictions():
                    return steps
            finally:
                await runner.close()
    finally:
        await pool.close()
        for outcome, count in policy.stats.checks.items():
            args.check_outcomes[outcome] = args.check_outcomes.get(outcome, 0) + count
        wrongly = honest & set(policy.bans.convictions())
        if wrongly:
            print(f"honest peers convicted: {sorted(wrongly)}", flush=True)
            args.honest_convicted += len(wrongly)
    return None


async def simulate(args) -> dict:
    from peer.demo_model import ensure_demo_model
    from swarm.launcher import DEFAULT_CACHE

    model_dir = ensure_demo_model(args.cache_dir or DEFAULT_CACHE, preset="demo")
    config = json.loads((model_dir / "config.json").read_text())
    args.shape = (config["hidden_size"], config["vocab_size"])
    servers = await start_peers(model_dir, args.lie_fraction)
    rows = []
    try:
        for fraction in args.fractions:
            found, began = [], time.perf_counter()
            args.honest_convicted = 0
            args.check_outcomes = {}
            for run in range(args.runs):
                steps = await steps_until_conviction(servers, fraction, 1000 * run + 17, args)
                found.append(steps)
                print(f"fraction {fraction} run {run}: {steps} steps", flush=True)
            caught = [s for s in found if s is not None]
            rows.append({
                "verify_fraction": fraction,
                "median_steps_to_conviction": statistics.median(caught) if len(caught) == len(found) else None,
                "steps": found,
                "not_caught_within_max_steps": len(found) - len(caught),
                "honest_peers_convicted": args.honest_convicted,
                "check_outcomes": args.check_outcomes,
                "seconds": round(time.perf_counter() - began, 1),
            })  # fmt: skip
    finally:
        for server in servers:
            server.config.drain_timeout = 0.0
            await server.stop()
    return {"benchmark": "detection", "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.05])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--lie-fraction", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the launcher's model cache")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "detection.json")
    args = parser.parse_args(argv)
    results = asyncio.run(simulate(args))
    del args.shape, args.honest_convicted, args.check_outcomes
    results["command"] = "python -m loadtests.sim_detection " + " ".join(argv or [])
    results["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write_results(args.out, results, indent=2)
    for row in results["rows"]:
        print(
            f"verify {row['verify_fraction']}: median {row['median_steps_to_conviction']} steps to conviction"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
