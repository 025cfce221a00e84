"""Idle push links: does a link between two peers survive minutes without traffic?

A local swarm of the demo model (DHT node, 2 peers, gateway: separate processes) answers one small
greedy request, then one after each idle gap (`--gaps`, seconds). Reported from the processes' own
logs: the connections their servers ended for too many keepalive pings (GOAWAY too_many_pings, what
gRPC's default server does with clients that ping an idle connection every 10 s) and the pushes that
failed. Before `common.peer_client.server_options` a link broke after ~2-3 minutes idle and the next
push through it failed; the decode loop's own push back to the first peer included.

    python -m loadtests.idle_links [--gaps 0,70,130,200] [--out loadtests/results/idle_links.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.swarm_bench import command_line, write_results

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from peer.demo_model import create_demo_model
    from swarm.launcher import LocalSwarm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps", default="0,70,130,200", help="idle seconds before each request")
    parser.add_argument("--workdir", type=Path, help="the processes' logs (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "idle_links.json")
    args = parser.parse_args(argv)
    gaps = [float(gap) for gap in args.gaps.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="idle-links-"))
    workdir.mkdir(parents=True, exist_ok=True)
    swarm = LocalSwarm(
        create_demo_model(workdir / "model", preset="demo"), workdir=workdir, model_name="demo"
    )
    requests = []
    try:
        swarm.start_dht()
        swarm.start_peers([(0, 2), (2, 4)], "--threads", "1")
        gateway = swarm.start_gateway(None)
        body = {"model": "demo", "prompt": "idle", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        for _ in range(120):
            if httpx.get(f"{gateway.address}/v1/models", timeout=10).json()["data"]:
                break
            time.sleep(0.5)
        for gap in gaps:
            time.sleep(gap)
            response = httpx.post(f"{gateway.address}/v1/completions", json=body, timeout=60)
            requests.append({"after_idle_s": gap, "status": response.status_code})
            print(f"after {gap:g} s idle: HTTP {response.status_code}", flush=True)
    finally:
        swarm.stop()
    logs = {path.stem: path.read_text(errors="replace") for path in workdir.glob("*.log")}
    result = {
        "benchmark": "idle_links",
        "command": command_line("loadtests.idle_links", argv),
        "requests": requests,
        "goaway_too_many_pings": {name: text.count("too_many_pings {") for name, text in logs.items()},
        "failed_pushes": {name: text.count("could not push") for name, text in logs.items()},
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    print(
        f"GOAWAY too_many_pings: {result['goaway_too_many_pings']}; failed pushes: {result['failed_pushes']}"
    )
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
