"""The floor of one hop on this machine: a `Peer.Inference` server that answers every step at once
(no model, no scheduler) in its own process, driven by the gateway's own client
(`common.peer_client.PeerSession`), one step in flight, a 1024-float hidden state each way.

Three servers, interleaved so that machine noise hits them alike: grpc.aio with an async-generator
handler (what the peer did before), grpc.aio with `context.read()` / `context.write()` (what it does
now), and the synchronous server (a thread per stream, the alternative the issue names). Reported:
median round trip, and CPU per step of the server process and of the client, medians over repeats.
A real peer's hop costs this plus its scheduler and forward pass (docs/benchmarks-batching.md).

    python -m loadtests.bench_grpc_floor [--steps 2000] [--repeats 4] [--out loadtests/results/grpc-floor.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from loadtests.swarm_bench import write_results
from protos import swarm_pb2, swarm_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
KINDS = ("aio-generator", "aio-read-write", "sync-threads")
HIDDEN = swarm_pb2.Tensor(data=bytes(4096), dtype="float32", shape=[1, 1024])


def _answer(request: swarm_pb2.InferenceRequest) -> swarm_pb2.InferenceResponse | None:
    kind = request.WhichOneof("kind")
    if kind == "open":
        return swarm_pb2.InferenceResponse(opened=swarm_pb2.Opened(peer_id="floor"))
    if kind == "step":
        return swarm_pb2.InferenceResponse(result=swarm_pb2.StepResult(hidden=HIDDEN, cache_length=1))
    return None


class AioGenerator(swarm_pb2_grpc.PeerServicer):
    async def Inference(self, request_iterator, context):
        async for request in request_iterator:
            response = _answer(request)
            if response is None:
                return
            yield response


class AioReadWrite(swarm_pb2_grpc.PeerServicer):
    async def Inference(self, request_iterator, context):
        while (request := await context.read()) is not grpc.aio.EOF:
            response = _answer(request)
            if response is None:
                return
            await context.write(response)


class SyncThreads(swarm_pb2_grpc.PeerServicer):
    def Inference(self, request_iterator, context):
        for request in request_iterator:
            response = _answer(request)
            if response is None:
                return
            yield response


def serve(kind: str) -> None:
    if kind == "sync-threads":
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(8))
        swarm_pb2_grpc.add_PeerServicer_to_server(SyncThreads(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        servicer = AioGenerator() if kind == "aio-generator" else AioReadWrite()
        swarm_pb2_grpc.add_PeerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, pid: int, steps: int) -> tuple[float, float, float]:
    from common.peer_client import ChannelPool, PeerSession

    pool = ChannelPool()
    session = PeerSession(pool, f"127.0.0.1:{port}")
    try:
        await session.open(swarm_pb2.OpenSession(start_block=0, end_block=1, max_length=16))
        step = swarm_pb2.Step(token_ids=[5], position=0, hidden=HIDDEN)
        for _ in range(50):  # warm-up
            await session.step(step)
        server_cpu, client_cpu, times = process_cpu_s(pid), time.process_time(), []
        for _ in range(steps):
            begin = time.perf_counter()
            await session.step(step)
            times.append(time.perf_counter() - begin)
        return (
            statistics.median(times) * 1e3,
            (process_cpu_s(pid) - server_cpu) / steps * 1e3,
            (time.process_time() - client_cpu) / steps * 1e3,
        )
    finally:
        await session.close()
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "grpc-floor.json")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    load_before = os.getloadavg()
    servers = {}
    try:
        for kind in KINDS:
            process = subprocess.Popen(
                [sys.executable, "-m", "loadtests.bench_grpc_floor", "--serve", kind],
                stdout=subprocess.PIPE, text=True, cwd=REPO,
            )  # fmt: skip
            servers[kind] = (process, int(process.stdout.readline()))
        runs: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in KINDS}
        for repeat in range(args.repeats):
            for kind in KINDS if repeat % 2 == 0 else KINDS[::-1]:
                process, port = servers[kind]
                runs[kind].append(asyncio.run(drive(port, process.pid, args.steps)))
    finally:
        for process, _ in servers.values():
            process.kill()
            process.wait()
    rows = {
        kind: {
            "round_trip_ms": statistics.median(run[0] for run in values),
            "server_cpu_ms_per_step": statistics.median(run[1] for run in values),
            "client_cpu_ms_per_step": statistics.median(run[2] for run in values),
            "raw": values,
        }
        for kind, values in runs.items()
    }
    results = {
        "benchmark": "grpc_floor",
        "steps": args.steps,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "grpc": grpc.__version__,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "servers": rows,
    }
    for kind, row in rows.items():
        print(f"{kind:15s} round trip {row['round_trip_ms']:.3f} ms  server CPU {row['server_cpu_ms_per_step']:.3f} "
              f"ms/step  client CPU {row['client_cpu_ms_per_step']:.3f} ms/step")  # fmt: skip
    print(f"load {load_before[0]:.1f} -> {results['load_after'][0]:.1f}")
    write_results(args.out, results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
