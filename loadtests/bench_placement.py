"""Automatic block placement against the best hand placement, and recovery from a lost span.

    python -m loadtests.bench_placement [--model bench|demo] [--streams 16] [--rounds 5]

Two swarms of the same four peers (each with room for half of an 8-block model, `--num-blocks 4`)
run side by side, each with its own DHT and gateway:

* **hand**: `--blocks 0:4`, `0:4`, `4:8`, `4:8`, the best placement there is for four half-model
  peers (routes use whole spans: every block twice);
* **auto**: the same four peers without `--blocks`, all started at the same moment, so that all
  of them see an empty swarm and choose [0, 4); their balancers then spread them (a move
  announces its target, so two do not move onto the same gap). The time until every block is
  served by an online peer, and until the placement settles, is reported.

(a) Aggregate tokens/s of `--streams` concurrent completions (greedy, `ignore_eos`, `--tokens`
each), rounds alternating between the two swarms so that load drifts on this shared machine hit
both alike; the medians and their ratio auto / hand (goal >= 0.9).

(b) On the auto swarm: one peer of [4, 8) is SIGKILLed and its record left to expire; then the
other, now the span's only peer, is SIGKILLed too, and the clock runs until the gateway's map
shows every block served by a reachable online peer again (a [0, 4) peer moves). That includes
noticing the loss (the record's ttl, `--ttl`), the balancer's interval (`--balance-interval`,
x0.5-1.5 jitter, plus a pause of up to a quarter of it), the drain, loading the blocks and the
start-up profile.

Writes loadtests/results/placement.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.swarm_bench import wait_models, write_results
from swarm.launcher import LocalSwarm

RESULTS = Path(__file__).parent / "results" / "placement.json"
NUM_BLOCKS = 8
HALF = NUM_BLOCKS // 2


def _api_peers(gateway: str) -> list[dict]:
    models = httpx.get(f"{gateway}/swarm/api", timeout=10).json()["models"]
    return models[0]["peers"] if models else []


def served_by_live_peers(peers: list[dict]) -> bool:
    """Every block has a reachable peer that is online (not draining, not moving)."""
    counts = [0] * NUM_BLOCKS
    for peer in peers:
        if peer.get("reachable") and peer.get("health") == "online":
            for block in range(peer["start"], peer["end"]):
                counts[block] += 1
    return min(counts) > 0


def spans(peers: list[dict]) -> list[tuple[int, int]]:
    return sorted((p["start"], p["end"]) for p in peers if p.get("reachable") and p.get("health") == "online")


def wait_for(predicate, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until `predicate()` holds, or None after `timeout`."""
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        try:
            if predicate():
                return time.monotonic() - begin
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(interval)
    return None


async def aggregate_tokens_per_second(gateway: str, model: str, streams: int, tokens: int) -> float:
    """`streams` concurrent completions at once; their completion tokens over the wall time."""
    async with httpx.AsyncClient(base_url=gateway, timeout=600) as client:
        await wait_models(client)

        async def one(i: int) -> int:
            body = {"model": model, "prompt": f"stream {i}: the swarm places its blocks", "max_tokens": tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        begin = time.perf_counter()
        produced = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(produced) / (time.perf_counter() - begin)


def run(model_dir: Path, model: str, streams: int, tokens: int, rounds: int, balance_interval: float,
        ttl: float) -> dict:  # fmt: skip
    heartbeat = ttl / 5
    peer_flags = ("--threads", "1", "--balance-interval", str(balance_interval), "--drain-timeout", "30",
                  "--num-blocks", str(HALF))  # fmt: skip
    results: dict = {
        "model": model, "streams": streams, "tokens_per_stream": tokens, "rounds": rounds,
        "peers": "4 peers of 4 blocks each, 8-block model, --threads 1", "balance_interval_s": balance_interval,
        "ttl_s": ttl, "heartbeat_s": heartbeat, "load_before": os.getloadavg(),
    }  # fmt: skip
    swarm_args = {"heartbeat": heartbeat, "ttl": ttl, "model_name": model}
    with (
        LocalSwarm(model_dir, workdir=Path(tempfile.mkdtemp(prefix="bench-hand-")), **swarm_args) as hand,
        LocalSwarm(model_dir, workdir=Path(tempfile.mkdtemp(prefix="bench-auto-")), **swarm_args) as auto,
    ):
        hand.start_dht()
        auto.start_dht()
        hand.start_peers(
            [(0, HALF), (0, HALF), (HALF, NUM_BLOCKS), (HALF, NUM_BLOCKS)], *peer_flags, timeout=300
        )
        started = time.monotonic()
        auto_peers = auto.start_peers([(None, None)] * 4, *peer_flags, timeout=300)  # all at once
        ready = time.monotonic() - started
        gateways = {"hand": hand.start_gateway(None, "--step-timeout", "60").address,
                    "auto": auto.start_gateway(None, "--step-timeout", "60").address}  # fmt: skip
        covered = wait_for(lambda: served_by_live_peers(_api_peers(gateways["auto"])), 300)
        covered = None if covered is None else time.monotonic() - started
        settled = wait_for(
            lambda: spans(_api_peers(gateways["auto"])) == [(0, 4), (0, 4), (4, 8), (4, 8)], 300
        )
        settled = None if settled is None else time.monotonic() - started
        results["auto_start"] = {
            "first_choices": sorted(_chosen(peer.log()) for peer in auto_peers),
            "all_ready_s": round(ready, 1),  # from spawning the four at once
            "covered_s": None if covered is None else round(covered, 1),
            "settled_s": None if settled is None else round(settled, 1),
            "spans": spans(_api_peers(gateways["auto"])),
            "moves": sum(peer.log().count("now serving blocks") for peer in auto_peers),
        }
        print("auto start:", results["auto_start"], flush=True)
        if settled is None:
            raise RuntimeError(f"automatic placement did not settle: {results['auto_start']}")

        # (a) side by side, alternating
        for address in gateways.values():  # warm up: first passes allocate
            asyncio.run(aggregate_tokens_per_second(address, model, streams, 4))
        figures: dict[str, list[float]] = {"hand": [], "auto": []}
        for i in range(rounds):
            for kind in ("auto", "hand") if i % 2 else ("hand", "auto"):
                figures[kind].append(
                    asyncio.run(aggregate_tokens_per_second(gateways[kind], model, streams, tokens))
                )
                print(kind, round(figures[kind][-1], 1), "tok/s", flush=True)
        hand_tps, auto_tps = statistics.median(figures["hand"]), statistics.median(figures["auto"])
        results["throughput"] = {
            "hand_tokens_per_s": [round(x, 1) for x in figures["hand"]],
            "auto_tokens_per_s": [round(x, 1) for x in figures["auto"]],
            "hand_median": round(hand_tps, 1),
            "auto_median": round(auto_tps, 1),
            "auto_over_hand": round(auto_tps / hand_tps, 3),
            "load": os.getloadavg(),
        }
        print("throughput:", results["throughput"], flush=True)

        # (b) lose the only peer of [4, 8)
        back = [peer for peer in auto_peers if _span_of(peer, gateways["auto"]) == (HALF, NUM_BLOCKS)]
        back[0].signal(signal.SIGKILL)
        gone = wait_for(lambda: spans(_api_peers(gateways["auto"])) == [(0, 4), (0, 4), (4, 8)], 3 * ttl + 30)
        if gone is None:
            raise RuntimeError(f"the first killed peer never left the map: {_api_peers(gateways['auto'])}")
        back[1].signal(signal.SIGKILL)
        # until another peer, online and answering, serves [4, 8) (the map still shows the killed
        # one until its record expires, and as reachable for up to a second: its last probe)
        dead = {child.address for child in back}

        def served_again() -> bool:
            peers = [peer for peer in _api_peers(gateways["auto"]) if peer["address"] not in dead]
            return served_by_live_peers(peers)

        recovered = wait_for(served_again, 6 * balance_interval + 3 * ttl + 60)
        results["recovery"] = {
            "covered_again_s": None if recovered is None else round(recovered, 1),
            "spans": spans(_api_peers(gateways["auto"])),
            "load": os.getloadavg(),
        }
        print("recovery:", results["recovery"], flush=True)
        # still serving: one more completion through the moved peer
        asyncio.run(aggregate_tokens_per_second(gateways["auto"], model, 1, 4))
    return results


def _chosen(log: str) -> str:
    for line in log.splitlines():
        if "chose blocks" in line:
            return line.split("chose blocks ", 1)[1].split(" of ")[0]
    return "?"


def _span_of(child, gateway: str) -> tuple[int, int] | None:
    for peer in _api_peers(gateway):
        if peer["address"] == child.address:
            return peer["start"], peer["end"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", choices=["demo", "bench"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per stream")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per swarm, alternating")
    parser.add_argument("--balance-interval", type=float, default=5.0)
    parser.add_argument("--ttl", type=float, default=10.0)
    args = parser.parse_args()
    from peer.demo_model import create_demo_model
    from swarm.launcher import DEFAULT_CACHE

    model_dir = DEFAULT_CACHE / f"bench-placement-{args.model}"
    if not (model_dir / "config.json").exists():
        create_demo_model(model_dir, preset=args.model, num_hidden_layers=NUM_BLOCKS)
    results = run(model_dir, f"placement-{args.model}", args.streams, args.tokens, args.rounds,
                  args.balance_interval, args.ttl)  # fmt: skip
    write_results(RESULTS, results, indent=2)


if __name__ == "__main__":
    main()
