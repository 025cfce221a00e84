"""What a key costs a request: the key store's work per request, file and Redis side by side.

    python -m loadtests.bench_keys [--requests 2000] [--concurrency 1,32] [--output loadtests/results/keys.json]

A metered request adds, on top of the generation: finding its key by the secret's hash
(`KeyStore.find`), one reservation (`reserve`) and one settlement (`settle`); a stream also re-reads
its key every `--key-check-interval` seconds. This runs exactly those three calls per simulated
request against each backend in one process, one after the other: the JSON file store (`fsync` per
write) and a real `redis-server` started on a free port (two clients, as two replicas, alternating).
The key has RPM / TPM / credit limits large enough never to refuse, so every call takes the full
path. Reported per backend and concurrency: requests per second and the mean / p50 / p99 latency
of one request's three calls, with the machine's load average (other work shares the CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.keys import FileKeyStore, RedisKeyStore, new_key
from loadtests.swarm_bench import write_results


async def one_request(store, secret: str) -> float:
    started = time.perf_counter()
    key = await store.find(secret)
    await store.reserve(key, 120)
    await store.settle(key.id, "m", 120, 20, 30)
    return time.perf_counter() - started


async def run(stores: list, secret: str, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            latencies.append(await one_request(stores[i % len(stores)], secret))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
    }


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    from swarm.launcher import free_port

    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    return process, f"redis://127.0.0.1:{port}/0"


async def bench(requests: int, concurrencies: list[int]) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        redis, url = start_redis(Path(workdir))
        try:
            key, secret = new_key("bench", rpm=10**9, tpm=10**12, credits=10**15)
            file_store = FileKeyStore(Path(workdir) / "keys.json")
            await file_store.add(key)
            replicas = [RedisKeyStore(url), RedisKeyStore(url)]
            await replicas[0].add(key)
            for concurrency in concurrencies:
                for backend, stores in (("file", [file_store]), ("redis", replicas)):
                    await run(stores, secret, min(200, requests), concurrency)  # warm up
                    results.append({"backend": backend, **await run(stores, secret, requests, concurrency)})
                    print(json.dumps(results[-1]), flush=True)
            final = await replicas[0].get(key.id)
            for replica in replicas:
                await replica.close()
        finally:
            redis.terminate()
            redis.wait(10)
    return {
        "benchmark": "key store work per metered request (find + reserve + settle)",
        "results": results,
        "redis_usage_check": final.usage["requests"],
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,32", help="comma-separated concurrencies")
    parser.add_argument("--output", default="loadtests/results/keys.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args.requests, [int(c) for c in args.concurrency.split(",")]))
    write_results(Path(args.output), report)


if __name__ == "__main__":
    main()
