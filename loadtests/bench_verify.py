"""What re-execution checks cost (issue 12): aggregate throughput at 16 streams with
`--verify-fraction` 0, 0.01 and 0.05, side by side in one run.

One local swarm of the "bench" model (~156M parameters, 8 blocks) split in two spans with two
replicas of each (a check needs a replica of the span it re-executes; with a third the referee
could also be asked, which only happens on a disagreement), and one gateway per fraction in front
of the same peers. The rounds go gateway after gateway, `--rounds` times over, so that the
machine's drift (other work on these shared cores) spreads over every fraction alike; each
fraction's figure is its total output tokens over its total time, and the ratio is that over the
fraction 0 figure. `loadtests.loadgen` drives the load: 2*C chat requests of --input-len prompt
tokens and exactly --output-len tokens out.

    python -m loadtests.bench_verify [--preset bench] [--concurrency 16] [--rounds 2]
        [--fractions 0,0.01,0.05] [--out loadtests/results/verify.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from pathlib import Path

from loadtests.swarm_bench import write_results

REPO = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace) -> dict:
    import httpx

    from loadtests.loadgen import LoadConfig, run_load
    from peer.demo_model import ensure_demo_model
    from swarm.launcher import DEFAULT_CACHE, LocalSwarm, num_blocks_of, split_blocks

    model_dir = ensure_demo_model(args.cache_dir or DEFAULT_CACHE, preset=args.preset)
    model_id = f"verify-{args.preset}"
    split = split_blocks(num_blocks_of(model_dir), 2)
    swarm = LocalSwarm(model_dir, log_level="WARNING", model_name=model_id)
    results: dict = {
        "benchmark": "verify",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu_count": os.cpu_count()},
        "spans": split,
    }
    try:
        swarm.start_dht()
        # a loaded machine takes minutes to start four peers of this model
        swarm.start_peers(split * 2, "--threads", str(args.threads), "--cache-tokens", "8192", timeout=600)
        gateways = {
            fraction: swarm.start_gateway(
                None, "--verify-fraction", str(fraction), "--step-timeout", "60", name=f"gateway-v{fraction}"
            )
            for fraction in args.fractions
        }
        for gateway in gateways.values():
            for _ in range(120):  # the model is listed once the gateway's DHT view covers it
                if httpx.get(f"{gateway.address}/v1/models").json()["data"]:
                    break
                time.sleep(0.5)

        def load(address: str, requests: int) -> dict:
            cfg = LoadConfig(base_url=address, model=model_id, concurrency=args.concurrency, num_requests=requests,
                             input_len=args.input_len, output_len=args.output_len, progress=False)  # fmt: skip
            return asyncio.run(run_load(cfg))

        for gateway in gateways.values():
            load(gateway.address, 2)  # warm-up
        totals = {fraction: {"tokens": 0, "seconds": 0.0, "failed": 0} for fraction in args.fractions}
        results["load_before"] = os.getloadavg()
        for round_ in range(args.rounds):
            for fraction, gateway in gateways.items():
                report = load(gateway.address, 2 * args.concurrency)
                totals[fraction]["tokens"] += report["output_tokens"]
                totals[fraction]["seconds"] += report["duration_s"]
                totals[fraction]["failed"] += report["failed"]
                print(f"round {round_} fraction {fraction}: {report['output_throughput']:.1f} tok/s "
                      f"failed {report['failed']}", flush=True)  # fmt: skip
        results["load_after"] = os.getloadavg()
        checks = {}
        for fraction, gateway in gateways.items():
            text = httpx.get(f"{gateway.address}/metrics").text
            checks[str(fraction)] = {
                line.split('"')[1]: float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("swarm_gateway_answer_checks_total{")
            }
        base = totals[args.fractions[0]]
        base_rate = base["tokens"] / base["seconds"]
        results["rows"] = [
            {
                "verify_fraction": fraction,
                "output_tok_s": round(t["tokens"] / t["seconds"], 2),
                "ratio_vs_off": round(t["tokens"] / t["seconds"] / base_rate, 3),
                "failed": t["failed"],
                "checks": checks[str(fraction)],
            }
            for fraction, t in totals.items()
        ]
    finally:
        swarm.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench", choices=["bench", "demo"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.01, 0.05]
    )
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the launcher's model cache")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "verify.json")
    args = parser.parse_args(argv)
    results = run(args)
    results["command"] = "python -m loadtests.bench_verify " + " ".join(argv or [])
    results["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write_results(args.out, results, indent=2)
    for row in results["rows"]:
        print(f"verify {row['verify_fraction']:>5}: {row['output_tok_s']:7.1f} tok/s  x{row['ratio_vs_off']:.3f}  "
              f"checks {row['checks']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
