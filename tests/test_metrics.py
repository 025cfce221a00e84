"""Metrics and logs against a real swarm: the gateway's and each peer's /metrics move after real
requests, one request id shows up in the gateway's log and in every peer's log, prompts stay out of
logs unless --log-prompts, and the Redis gauge follows a real redis-server going away."""

from __future__ import annotations

import io
import json
import logging
import signal
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm.launcher import LocalSwarm
from tests.conftest import HEARTBEAT, TTL, RedisServer, wait_until

MODEL = "swarm-demo"
SECRET = "zebra-umbrella-7731"  # a prompt word that must never reach a log by default


@pytest.fixture(scope="module")
def swarm(demo_model, tiny_model, tmp_path_factory):
    """DHT + 2 peers serving /metrics + a gateway that also knows a model nobody serves."""
    local = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("metrics"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name=MODEL)  # fmt: skip
    try:
        local.start_dht()
        local.start_peers([(0, 2), (2, 4)], "--threads", "1", "--metrics-port", "0")
        local.start_gateway(None, "--model", str(tiny_model), "--model-name", "unserved-model")
        _wait(lambda: _covered(local.children[-1].address), 10)
        yield local
    finally:
        stop_all(local)


def stop_all(local: LocalSwarm) -> None:
    """SIGTERM every child at once, then wait: their graceful shutdowns (DHT withdrawals that may
    wait on nodes already gone) overlap instead of adding up."""
    for child in local.children:
        child.signal(signal.SIGTERM)
    local.stop()


@pytest.fixture(scope="module")
def gateway(swarm):
    return swarm.children[-1]


_wait = wait_until


def _covered(base_url: str) -> bool:
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"]
    return [m["id"] for m in models] == [MODEL]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(
    base_url: str, content: str, max_tokens: int = 6, headers: dict | None = None, **extra
) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **extra}  # fmt: skip
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers or {}, timeout=60)


def peer_metric_urls(gateway) -> list[str]:
    """Each peer's /metrics, from the metrics_port its DHT record announces (as the map shows it).

    Read through the gateway rather than a throw-away DHT node: a node that joins and leaves makes
    the swarm's next lookups wait for it (see the lead's notes on issue 7)."""
    peers = httpx.get(f"{gateway.address}/swarm/api", timeout=10).json()["models"][0]["peers"]
    assert len(peers) == 2 and all(peer["metrics_port"] > 0 for peer in peers), peers
    return [f"http://{peer['address'].rsplit(':', 1)[0]}:{peer['metrics_port']}/metrics" for peer in peers]


def test_gateway_metrics_count_a_streamed_request(gateway):
    before = scrape(f"{gateway.address}/metrics")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count me"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    usage = None
    with httpx.stream("POST", f"{gateway.address}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage and usage["completion_tokens"] == 8
    after = scrape(f"{gateway.address}/metrics")

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    route = dict(route="/v1/chat/completions", method="POST", status="200")
    assert delta("swarm_gateway_requests_total", **route) == 1
    assert delta("swarm_gateway_request_duration_seconds_count", route="/v1/chat/completions") == 1
    assert delta("swarm_gateway_time_to_first_token_seconds_count", model=MODEL) == 1
    assert delta("swarm_gateway_inter_token_latency_seconds_count", model=MODEL) == 7  # gaps between 8 tokens
    assert delta("swarm_gateway_inter_token_latency_seconds_sum", model=MODEL) > 0
    assert delta("swarm_gateway_completion_tokens_total", model=MODEL) == 8
    assert delta("swarm_gateway_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert delta("swarm_gateway_generations_total", model=MODEL, outcome="ok") == 1
    assert value(after, "swarm_gateway_active_generations") == 0
    assert value(after, "swarm_gateway_session_store_available", backend="memory") == 1
    families = {
        family.name for family in text_string_to_metric_families(httpx.get(f"{gateway.address}/metrics").text)
    }
    assert {"swarm_gateway_failovers", "swarm_gateway_route_planning_failures"} <= families


def test_route_planning_failure_and_unmatched_paths_are_counted(gateway):
    before = scrape(f"{gateway.address}/metrics")
    body = {"model": "unserved-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{gateway.address}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 503
    assert httpx.get(f"{gateway.address}/no/such/path/{uuid.uuid4().hex}", timeout=10).status_code == 404
    after = scrape(f"{gateway.address}/metrics")
    failures = "swarm_gateway_route_planning_failures_total"
    assert (
        value(after, failures, model="unserved-model") - value(before, failures, model="unserved-model") == 1
    )
    status_503 = dict(route="/v1/chat/completions", method="POST", status="503")
    assert (
        value(after, "swarm_gateway_requests_total", **status_503)
        == value(before, "swarm_gateway_requests_total", **status_503) + 1
    )
    unmatched = dict(route="unmatched", method="GET", status="404")
    assert value(after, "swarm_gateway_requests_total", **unmatched) >= 1
    assert not any("no/such/path" in str(labels) for _, labels in after)  # no unbounded labels


def test_peer_metrics_show_live_sessions_and_forward_passes(swarm, gateway):
    urls = peer_metric_urls(gateway)
    before = [scrape(url) for url in urls]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 120,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{gateway.address}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:  # wait for the first token: every peer of the route holds the session now
            if '"content"' in line and '"role"' not in line:
                break
        during = [scrape(url) for url in urls]
        gateway_during = scrape(f"{gateway.address}/metrics")
        # read to the end: a client that hangs up leaves the last hop's session open for seconds
        # (a gateway bug reported on issue 7), which is not what this test is about
        assert [line for line in lines if line][-1] == "data: [DONE]"
    for sample in during:
        assert value(sample, "swarm_peer_sessions") == 1
        assert value(sample, "swarm_peer_kv_cache_bytes_used") > 0
        assert value(sample, "swarm_peer_kv_cache_tokens_reserved") > 0
    assert value(gateway_during, "swarm_gateway_active_generations") == 1
    # each peer frees its session when its stream closes, just after the client saw [DONE]
    assert _wait(lambda: all(value(scrape(url), "swarm_peer_sessions") == 0 for url in urls), 10)
    for url, old in zip(urls, before, strict=True):
        new = scrape(url)
        assert value(new, "swarm_peer_sessions") == 0
        assert value(new, "swarm_peer_kv_cache_bytes_budget") > 0
        assert value(new, "swarm_peer_tokens_processed_total") > value(
            old, "swarm_peer_tokens_processed_total"
        )
        assert value(new, "swarm_peer_step_seconds_count") > value(old, "swarm_peer_step_seconds_count")
        assert value(new, "swarm_peer_step_seconds_sum") > value(old, "swarm_peer_step_seconds_sum")
        assert value(new, "swarm_peer_batch_size_count") > value(old, "swarm_peer_batch_size_count")
        assert value(new, "swarm_peer_batch_tokens_sum") > value(old, "swarm_peer_batch_tokens_sum")
        info = [labels for (name, labels) in new if name == "swarm_peer_info"]
        assert len(info) == 1 and dict(info[0])["model"] == MODEL
    # push (the default): the first peer pushed the steps to the second, which accepted them; the
    # second, the last, pushed every decode step after the first back to the first (decode loop)
    after = {url: scrape(url) for url in urls}

    def grew(url: str, name: str) -> float:
        return value(after[url], name) - value(before[urls.index(url)], name)

    looped = {url: grew(url, "swarm_peer_looped_steps_total") for url in urls}
    last = max(looped, key=looped.get)
    (first,) = set(urls) - {last}
    # 119 decode steps; the verifier's 1 % of checked steps (relayed, sent by the gateway) may
    # each cut the loop for one step
    assert looped[first] == 0 and 110 <= looped[last] <= 120 - 1, looped
    assert grew(last, "swarm_peer_pushes_total") == looped[last]
    assert grew(first, "swarm_peer_pushes_received_total") == looped[last]
    assert grew(first, "swarm_peer_pushes_total") > 0
    assert grew(last, "swarm_peer_pushes_received_total") >= grew(first, "swarm_peer_pushes_total")
    for url in urls:
        assert value(after[url], "swarm_peer_push_links") == 1
        assert value(after[url], "swarm_peer_push_links_closed_total") == 0


def test_one_request_id_in_gateway_and_every_peer_log(swarm, gateway):
    request_id = f"test-{uuid.uuid4().hex[:12]}"
    response = chat(gateway.address, f"tell me about {SECRET}", headers={"X-Request-Id": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    peers = [child for child in swarm.children if child.name.startswith("peer")]
    assert len(peers) == 2
    marker = f"request_id={request_id}"
    for child in [gateway, *peers]:  # peers write their lines as the sessions close
        assert _wait(lambda child=child: marker in child.log(), 10), f"{child.name} log lacks {marker}"
    for child in peers:
        opened = [
            line for line in child.log().splitlines() if marker in line and 'msg="session opened"' in line
        ]
        assert len(opened) == 1, child.log()[-2000:]

    def gateway_lines() -> list[str]:
        return [line for line in gateway.log().splitlines() if marker in line]

    # the access line is written once the response has gone out, maybe after the client read it
    assert _wait(lambda: any("msg=request" in line and "status=200" in line for line in gateway_lines()), 10)
    assert any("msg=generation" in line and "outcome=ok" in line for line in gateway_lines())
    for child in [gateway, *peers]:
        assert SECRET not in child.log(), f"{child.name} logged prompt text without --log-prompts"


def test_unsafe_request_ids_are_replaced(gateway):
    response = httpx.get(
        f"{gateway.address}/health", headers={"X-Request-Id": 'bad id" msg=forged'}, timeout=10
    )
    assert response.status_code == 200
    assigned = response.headers["x-request-id"]
    assert assigned != 'bad id" msg=forged' and len(assigned) == 32 and assigned.isalnum()


def test_log_prompts_and_redis_gauge(swarm, tmp_path):
    """A second gateway with --log-prompts and a real redis-server that goes away."""
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        second = swarm.start_gateway(None, "--log-prompts", "--redis-url", redis.url, name="gateway-prompts")
        assert _wait(lambda: _covered(second.address), 10)
        assert chat(second.address, f"say {SECRET}", headers={"X-Session-Id": "s1"}).status_code == 200
        samples = scrape(f"{second.address}/metrics")
        assert value(samples, "swarm_gateway_redis_available") == 1
        assert value(samples, "swarm_gateway_session_store_available", backend="redis") == 1
        assert _wait(lambda: SECRET in second.log(), 5), "--log-prompts did not log the prompt"
        redis.stop()
        assert chat(second.address, "still served", headers={"X-Session-Id": "s1"}).status_code == 200
        samples = scrape(f"{second.address}/metrics")
        assert value(samples, "swarm_gateway_redis_available") == 0
        assert value(samples, "swarm_gateway_session_store_available", backend="redis") == 0
    finally:
        redis.stop()


# -- in-process units: no swarm needed -----------------------------------------------------------
def test_each_app_has_its_own_registry():
    from fastapi import FastAPI

    from gateway.metrics import GatewayMetrics

    first, second = GatewayMetrics(FastAPI()), GatewayMetrics(FastAPI())  # no "duplicated timeseries"
    first.tokens_out.labels("m").inc(3)
    assert b'swarm_gateway_completion_tokens_total{model="m"} 3.0' in first.exposition()
    assert b'model="m"' not in second.exposition()


def test_record_failover_reaches_the_current_requests_metrics():
    from fastapi import FastAPI

    from gateway.metrics import GatewayMetrics, RequestContext, _request, record_failover

    record_failover()  # outside a request: a no-op, never an error
    metrics = GatewayMetrics(FastAPI())
    token = _request.set(RequestContext("r", time.perf_counter(), metrics))
    try:
        record_failover()
        record_failover("timeout")
    finally:
        _request.reset(token)
    text = metrics.exposition().decode()
    assert 'swarm_gateway_failovers_total{reason="peer_failed"} 1.0' in text
    assert 'swarm_gateway_failovers_total{reason="timeout"} 1.0' in text


def test_log_lines_are_one_line_and_carry_the_request_id():
    from common.logs import JsonFormatter, KeyValueFormatter, request_id_var

    stream = io.StringIO()
    logger = logging.getLogger("test.structured")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id_var.set("rid-1")
    try:
        for formatter in (KeyValueFormatter(), JsonFormatter()):
            handler.setFormatter(formatter)
            try:
                raise ValueError("boom\nsecond line")
            except ValueError:
                logger.exception('failed "quoted"', extra={"peer": "p1", "tokens": 3})
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
    kv, js = stream.getvalue().splitlines()  # exactly two lines: tracebacks are folded in
    assert kv.startswith("ts=") and "level=error" in kv and "request_id=rid-1" in kv
    assert 'msg="failed \\"quoted\\""' in kv and "peer=p1" in kv and "tokens=3" in kv and "ValueError" in kv
    data = json.loads(js)
    assert data["request_id"] == "rid-1" and data["peer"] == "p1" and data["tokens"] == 3
    assert "boom" in data["exc"]
