"""Decode time per token over emulated WAN links, relay vs push vs push's decode loop, side by side.

    python -m loadtests.bench_wan [--model demo|bench] [--hops 2,3,4] [--rtt-ms 0,10,50]

For each hop count a swarm is started once (DHT, one peer per span, and three gateways: one with
`--relay`, one pushing with `--no-decode-loop`, one with the defaults: push and its decode loop);
every peer sits behind a `loadtests.wan` link, and the links are reshaped between measurements, so
the figures for 0, 10 and 50 ms round trip come from the same processes, and the three modes'
runs alternate on them. Every link a token crosses, gateway to peer or peer to peer (a peer pushes
to the next one's announced proxy), holds it for half the round trip. In relay mode every hidden
state returns to the gateway, so a token pays one round trip per hop; in push mode half a round
trip per hop plus half one back to the gateway and half one out to the first peer; with the
decode loop the last peer sends the next step straight to the first, so half a round trip per hop.
Writes loadtests/results/wan_push.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.swarm_bench import write_results
from loadtests.wan import LinkShape, WanLink
from swarm.launcher import LocalSwarm, free_port, split_blocks

RESULTS = Path(__file__).parent / "results" / "wan_push.json"
TOKENS = 24


def _decode_ms_per_token(address: str, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    stamps = []
    with httpx.stream("POST", f"{address}/v1/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) * 1000


def run(model_dir: Path, model: str, hops_list: list[int], rtts: list[float], runs: int) -> dict:
    results = {"model": model, "tokens": TOKENS, "runs": runs, "load_before": os.getloadavg(), "rows": []}
    num_blocks = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    for hops in hops_list:
        with LocalSwarm(model_dir, workdir=Path(tempfile.mkdtemp(prefix="bench-wan-")), model_name=model,
                        heartbeat=2.0, ttl=10.0) as swarm:  # fmt: skip
            swarm.start_dht()
            links, children = [], []
            for start, end in split_blocks(num_blocks, hops):
                port, proxy = free_port(), free_port()
                links.append(WanLink(proxy, ("127.0.0.1", port), LinkShape()).start())
                children.append(swarm.spawn_peer(start, end, "--threads", "1", "--port", str(port),
                                                 "--announce-port", str(proxy)))  # fmt: skip
            try:
                for child in children:
                    child.address = child.wait_for_line("PEER_READY", 300)
                gateways = {
                    "relay": swarm.start_gateway(
                        None, "--step-timeout", "30", "--relay", name="gateway-relay"
                    ),
                    "push": swarm.start_gateway(
                        None, "--step-timeout", "30", "--no-decode-loop", name="gateway-push"
                    ),
                    "loop": swarm.start_gateway(None, "--step-timeout", "30", name="gateway-loop"),
                }
                deadline = time.monotonic() + 60
                for gateway in gateways.values():
                    while not httpx.get(f"{gateway.address}/v1/models", timeout=10).json()["data"]:
                        if time.monotonic() > deadline:
                            raise TimeoutError("no route")
                        time.sleep(0.5)
                for rtt in rtts:
                    for link in links:
                        link.shape = LinkShape(delay_ms=rtt / 2)
                    times: dict[str, list[float]] = {mode: [] for mode in gateways}
                    for gateway in gateways.values():
                        _decode_ms_per_token(gateway.address, model, "warm up")
                    for i in range(runs):  # alternating, so load drifts hit both modes alike
                        for mode, gateway in gateways.items():
                            times[mode].append(_decode_ms_per_token(gateway.address, model, f"run {i}"))
                    relay, push, loop = (statistics.median(times[mode]) for mode in ("relay", "push", "loop"))
                    row = {
                        "hops": hops,
                        "rtt_ms": rtt,
                        "relay_ms_per_token": round(relay, 1),
                        "push_ms_per_token": round(push, 1),
                        "loop_ms_per_token": round(loop, 1),
                        "push_over_relay": round(push / relay, 3),
                        "loop_over_push": round(loop / push, 3),
                        "loop_over_relay": round(loop / relay, 3),
                        "load": os.getloadavg()[0],
                    }
                    print(row, flush=True)
                    results["rows"].append(row)
            finally:
                for link in links:
                    link.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=["demo", "bench"])
    parser.add_argument("--hops", default="2,3,4")
    parser.add_argument("--rtt-ms", default="0,10,50")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from peer.demo_model import create_demo_model
    from swarm.launcher import DEFAULT_CACHE

    model_dir = DEFAULT_CACHE / f"bench-wan-{args.model}"
    if not (model_dir / "config.json").exists():
        create_demo_model(model_dir, preset=args.model)
    hops = [int(h) for h in args.hops.split(",")]
    rtts = [float(r) for r in args.rtt_ms.split(",")]
    results = run(model_dir, f"wan-{args.model}", hops, rtts, args.runs)
    write_results(RESULTS, results, indent=2)


if __name__ == "__main__":
    main()
