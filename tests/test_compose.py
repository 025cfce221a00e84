"""deploy/ for real: the images built with rootful podman, deploy/docker-compose.yml brought up, and
the host as the client, through the published ports only.

docker-compose (1.29, Debian's) drives podman through its Docker-compatible socket, which this module
starts for itself and stops at the end. In order, on one swarm (dht, redis, model-init, peer0 on
blocks 0:2, peer1 and peer2 both on 2:4, gateway):
- the OpenAI SDK streams a chat completion through the gateway's published port;
- `/swarm/api` shows every peer, reachable;
- `docker-compose kill` of the replica that carries a stream, mid-stream: the stream completes with
  the same tokens as the stream without the kill, and the gateway counts one failover;
- a peer from deploy/docker-compose.join.yml, a second compose project on its own network that
  reaches the first only through published ports, becomes routable: with the first project's
  replicas of its span gone, the same request is answered through it, token for token;
- `docker-compose down` leaves no container, network or volume of either project.
And deploy/Dockerfile.cuda builds (without CUDA: its base is a local stand-in); its GPU paths need a GPU.

What only this test does, not an operator (docs/deploy.md, "What the test does differently"):
- base images: no registry can be reached on the test machines, so deploy/local-base-images.sh makes
  stand-ins under the names the Dockerfiles and the compose file use (deploy/setup.sh test makes them;
  here they are made if missing), and builds never pull;
- the builds see the host's pip configuration and every file or folder it names, read-only, and
  install torch from the host's index: pip then finds its packages where the host's pip does
  (torch's CPU wheel on disk, the package index behind the host's CA certificates);
- health: without systemd, podman runs no HEALTHCHECK by itself, so a thread runs `podman
  healthcheck run` on every container of ours not yet healthy, which is what compose's
  `depends_on: condition: service_healthy` waits for.

Figures (image size, build time and how much of it came from the layer cache, `up` to the first
answered request, the stream's pause when its peer was killed, the joined peer's time to be routed)
are written to loadtests/results/compose.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from swarm.launcher import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # a cold build takes minutes

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
JOIN = DEPLOY / "docker-compose.join.yml"
RESULTS = REPO / "loadtests" / "results" / "compose.json"
MODEL = "swarm-demo"  # the compose files' MODEL_NAME
REPLICATED_SPAN = (2, 4)  # peer1 and peer2 in docker-compose.yml
MESSAGES = [{"role": "user", "content": "Write a Python function that merges two sorted lists."}]
# Greedy, and long enough (ignore_eos) that `docker-compose kill` lands while it streams.
REQUEST = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "temperature": 0.0, "logprobs": True}
EXTRA = {"ignore_eos": True}
# The images stay after the test: `podman rmi` of an image deletes the layers only it uses, and
# with them the build cache of the next run. (`podman rmi` these two to free ~3 GB.)
CPU_TAG = "localhost/swarm-serve:test-cpu"
CUDA_TAG = "localhost/swarm-serve:test-cuda"


# --- podman ---------------------------------------------------------------------------------------------
def podman_unusable() -> str | None:
    """Why podman cannot run the swarm here, or None. Only these skip the test; any other failure fails it."""
    if os.geteuid() != 0:
        return "needs root: the compose test runs rootful podman"
    for tool in ("podman", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash deploy/setup.sh test installs and configures it)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-500:]}"
    return None


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


HOST_PIP = "/run/host-pip"  # where the build sees the host's pip files: a path no image uses


def host_pip_setup(conf_dir: Path) -> tuple[list[str], str]:
    """(`-v` flags, torch's index) that make pip inside a build resolve as the host's pip does.

    The host's settings (files and PIP_* variables, merged by `pip config list`) become one pip.conf
    mounted at /etc/pip.conf; every absolute path or file:// URL they name is mounted read-only under
    HOST_PIP (a local index's parent folder with it: its pages link to ../../files), never over a
    path of the image (a CA bundle mounted over the image's own breaks apt's ca-certificates)."""
    listed = run([str(REPO / ".venv/bin/python"), "-m", "pip", "config", "list"], timeout=60).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.match(r"^(:env:|[\w-]+)\.([\w-]+)='(.*)'$", line)
        if match and (match.group(1) == ":env:" or match.group(2) not in settings):
            settings[match.group(2)] = match.group(3)  # the environment wins, as in pip
    mounts: set[str] = set()

    def inside(token: str) -> str:
        scheme = "file://" if token.startswith("file://") else ""
        path = token.removeprefix(scheme)
        if not (path.startswith("/") and os.path.exists(path)):
            return token
        mounts.add(
            os.path.dirname(path.rstrip("/")) if scheme and path.rstrip("/").endswith("/simple") else path
        )
        return scheme + HOST_PIP + path

    settings = {key: " ".join(inside(token) for token in value.split()) for key, value in settings.items()}
    conf = conf_dir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in sorted(settings.items())))
    volumes = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for path in sorted(mounts):
        volumes += ["-v", f"{path}:{HOST_PIP}{path}:ro"]
    return volumes, settings.get("index-url", "https://pypi.org/simple")


def build_image(dockerfile: Path, tag: str, conf_dir: Path) -> dict:
    """Build one of our Dockerfiles; its figures. Never pulls: the bases are local (see the docstring)."""
    volumes, torch_index = host_pip_setup(conf_dir)
    started = time.monotonic()
    result = run(
        ["podman", "build", "--format", "docker", "--pull=never", "-f", str(dockerfile), "-t", tag,
         "--build-arg", f"TORCH_INDEX_URL={torch_index}", *volumes, str(REPO)],
        timeout=1800,
    )  # fmt: skip
    seconds = time.monotonic() - started
    steps = len(re.findall(r"^STEP \d+/\d+", result.stdout, re.M))
    cached = result.stdout.count("--> Using cache")
    size = int(run(["podman", "image", "inspect", tag, "--format", "{{.Size}}"], timeout=60).stdout)
    return {
        "build_s": round(seconds, 1),
        "steps": steps,
        "steps_from_cache": cached,
        "size_mb": round(size / 1e6),
    }


class HealthProber(threading.Thread):
    """Runs the HEALTHCHECK of every container of the given projects that is not healthy yet.

    Podman runs healthchecks from systemd timers; without systemd nothing runs them and a container
    stays "starting" for ever. Healthy containers are left alone: compose only waits for the first
    healthy state, and every probe costs a Python start inside the container."""

    def __init__(self, projects: list[str]):
        super().__init__(daemon=True)
        self.projects = projects
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            for project in list(self.projects):
                for health in ("starting", "unhealthy"):
                    ids = subprocess.run(
                        ["podman", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                         "--filter", f"health={health}"],
                        capture_output=True, text=True, timeout=60,
                    ).stdout.split()  # fmt: skip
                    for container in ids:
                        subprocess.run(
                            ["podman", "healthcheck", "run", container], capture_output=True, timeout=60
                        )

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=120)


# --- the host as a client ---------------------------------------------------------------------------------
def host_address() -> str:
    """This machine's address on its network: what a peer on another machine would announce. The
    containers of one project reach the other's published ports there (not at 127.0.0.1, which is
    each container's own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        return sock.getsockname()[0]


def stream_chat(base_url: str, on_chunk=None) -> dict:
    """One streamed chat completion with the OpenAI SDK: its text, tokens and chunk arrival times."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)
    text, tokens, times = [], [], []
    with client.chat.completions.create(**REQUEST, stream=True, extra_body=EXTRA) as stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            times.append(time.monotonic())
            text.append(choice.delta.content or "")
            if choice.logprobs and choice.logprobs.content:
                tokens += [item.token for item in choice.logprobs.content]
            if on_chunk is not None:
                on_chunk(len(tokens))
    return {"text": "".join(text), "tokens": tokens, "times": times}


def swarm_api(base_url: str) -> dict:
    response = httpx.get(f"{base_url}/swarm/api", timeout=30)
    response.raise_for_status()
    return next(model for model in response.json()["models"] if model["id"] == MODEL)


def failovers(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return sum(
        float(m.group(1)) for m in re.finditer(r"^swarm_gateway_failovers_total\{[^}]*\} (\S+)$", text, re.M)
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not up yet; the last one is reported
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"{what} within {timeout:.0f} s (last error: {last_error!r})")


# --- the swarm --------------------------------------------------------------------------------------------
class Deployment:
    """The compose projects of this module, on podman, and the figures they produce."""

    def __init__(self, docker_host: str, image: str, work: Path):
        self.image = image
        self.work = work
        self.main = f"swarmtest{os.getpid()}"
        self.join = f"{self.main}join"
        self.gateway_port = free_port()
        self.dht_port = free_port(socket.SOCK_DGRAM)
        self.base_url = f"http://127.0.0.1:{self.gateway_port}"
        self.figures: dict = {}
        variables = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text() + JOIN.read_text()))
        # Only what the test sets: none of the developer's own compose variables leak in.
        self.env = {key: value for key, value in os.environ.items() if key not in variables}
        self.env.update(
            DOCKER_HOST=docker_host,
            SWARM_IMAGE=image,
            GATEWAY_PORT=str(self.gateway_port),
            DHT_PORT=str(self.dht_port),
            PEER_THREADS="1",  # six processes share the machine's cores
            LOG_LEVEL="INFO",
        )
        self.env_file = work / "empty.env"  # not deploy/.env, which may hold someone's settings
        self.env_file.write_text("")
        self.prober = HealthProber([self.main, self.join])

    def compose(self, project: str, *args: str, timeout: float = 300, env: dict | None = None, check=True):
        path = JOIN if project == self.join else COMPOSE
        argv = ["docker-compose", "--env-file", str(self.env_file), "-p", project, "-f", str(path), *args]
        return run(argv, timeout=timeout, env={**self.env, **(env or {})}, check=check)

    def compose_primed(self, project: str, *args: str) -> subprocess.Popen:
        """`docker-compose ARGS SERVICE`, started now, run when SERVICE is written to its stdin.

        docker-compose spends seconds importing itself on a loaded machine, longer than a stream
        lasts; primed, it runs its real command line within a fraction of a second of the word."""
        primed = (
            "import sys\n"
            "from compose.cli.main import main\n"
            "service = sys.stdin.readline().strip()\n"
            "sys.argv = ['docker-compose', *sys.argv[1:], service]\n"
            "main()\n"
        )
        python = Path(shutil.which("docker-compose")).read_text().splitlines()[0].removeprefix("#!").strip()
        argv = [
            python,
            "-c",
            primed,
            "--env-file",
            str(self.env_file),
            "-p",
            project,
            "-f",
            str(COMPOSE),
            *args,
        ]
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )

    def containers(self, project: str, *flags: str) -> list[str]:
        label = f"label=com.docker.compose.project={project}"
        return run(["podman", "ps", "-q", *flags, "--filter", label], timeout=60).stdout.split()

    def leftovers(self, project: str) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={project}"
        networks = run(["podman", "network", "ls", "--format", "{{.Name}}"], timeout=60).stdout.split()
        return {
            "containers": self.containers(project, "-a"),
            "networks": [name for name in networks if name == f"{project}_default"],
            "volumes": run(["podman", "volume", "ls", "-q", "--filter", label], timeout=60).stdout.split(),
        }

    def down(self) -> None:
        for project in (self.join, self.main):
            self.compose(project, "down", "-v", "--remove-orphans", "--timeout", "10", check=False,
                         env={"BOOTSTRAP": "-", "ANNOUNCE_HOST": "-", "BLOCKS": "-"})  # fmt: skip

    def cleanup(self) -> None:
        """`down`, and whatever a failed `down` or a test that stopped half-way left."""
        self.down()
        for project in (self.join, self.main):
            for container in self.containers(project, "-a"):
                run(["podman", "rm", "-f", container], timeout=120, check=False)
            run(["podman", "network", "rm", "-f", f"{project}_default"], timeout=60, check=False)
            label = f"label=com.docker.compose.project={project}"
            for volume in run(["podman", "volume", "ls", "-q", "--filter", label], timeout=60).stdout.split():
                run(["podman", "volume", "rm", "-f", volume], timeout=60, check=False)

    def logs(self, project: str) -> str:
        return self.compose(project, "logs", "--no-color", "--tail", "40", check=False).stdout[-6000:]


def write_figures(figures: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    figures = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        **figures,
    }
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory):
    reason = podman_unusable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("podman")
    sock = folder / "podman.sock"
    log = open(folder / "service.log", "w")  # noqa: SIM115 - closed at teardown
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: sock.exists() and service.poll() is None, 60, "podman's socket did not appear")
        yield f"unix://{sock}"
    finally:
        service.terminate()
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()


@pytest.fixture(scope="module")
def figures():
    collected: dict = {}
    yield collected
    if "up_to_first_answer_s" in collected:  # a run that brought the swarm up, not a part of one
        write_figures(collected)


@pytest.fixture(scope="module")
def base_images(docker_host, figures):
    """The stand-ins for the registry's images (a no-op once made: deploy/setup.sh test makes them)."""
    started = time.monotonic()
    run(["bash", str(DEPLOY / "local-base-images.sh")], timeout=1800)
    figures["base_images_s"] = round(time.monotonic() - started, 1)


@pytest.fixture(scope="module")
def cpu_image(base_images, tmp_path_factory, figures):
    figures["cpu_image"] = build_image(DEPLOY / "Dockerfile", CPU_TAG, tmp_path_factory.mktemp("pip"))
    return CPU_TAG


@pytest.fixture(scope="module")
def deployment(docker_host, cpu_image, tmp_path_factory, figures):
    deployment = Deployment(docker_host, cpu_image, tmp_path_factory.mktemp("compose"))
    deployment.prober.start()
    try:
        # Both projects' networks, made before compose would make them, which it then adopts by name:
        # podman's Docker API makes compose's networks isolated from each other, and on one host that
        # drops even the traffic between two projects through published ports (between machines the
        # packets come in from outside, and no isolation rule sees them).
        for project in (deployment.main, deployment.join):
            run(["podman", "network", "create", f"{project}_default"], timeout=60)
        started = time.monotonic()
        try:
            deployment.compose(deployment.main, "up", "-d", "--no-build", timeout=600)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{deployment.logs(deployment.main)}") from None
        figures["up_returned_s"] = round(time.monotonic() - started, 1)
        from openai import OpenAI

        client = OpenAI(base_url=f"{deployment.base_url}/v1", api_key="sk-test", max_retries=0, timeout=60)
        first = {**REQUEST, "max_tokens": 1, "logprobs": False}
        wait_for(lambda: client.chat.completions.create(**first), 300, "no chat completion was answered")
        figures["up_to_first_answer_s"] = round(time.monotonic() - started, 1)
        deployment.figures = figures
        yield deployment
    finally:
        deployment.prober.stop()
        deployment.cleanup()


@pytest.fixture(scope="module")
def reference(deployment) -> dict:
    """The stream with every peer alive: what every other run must reproduce."""
    result = stream_chat(deployment.base_url)
    assert len(result["tokens"]) == REQUEST["max_tokens"]
    return result


# --- the tests --------------------------------------------------------------------------------------------
def test_chat_streams_through_the_published_port(reference):
    assert reference["text"].strip()


def test_swarm_api_shows_every_peer(deployment):
    expected = {"peer0:50051", "peer1:50051", "peer2:50051"}

    def listed():  # the map asks the DHT on each call, and one lookup can come back short
        model = swarm_api(deployment.base_url)
        return model if {peer["address"] for peer in model["peers"]} == expected else None

    model = wait_for(listed, 60, f"/swarm/api did not list {sorted(expected)}")
    assert all(peer["reachable"] and peer["health"] == "online" for peer in model["peers"]), model["peers"]
    assert model["covered"] and model["coverage"] == [1, 1, 2, 2]
    health = httpx.get(f"{deployment.base_url}/health", timeout=30).json()
    assert health["session_store"] == "redis" and health["session_store_available"], health


def test_killing_a_peer_mid_stream_changes_no_token(deployment, reference):
    before = failovers(deployment.base_url)
    killer = deployment.compose_primed(deployment.main, "kill")
    killed: dict = {}

    def kill() -> None:
        try:
            active = swarm_api(deployment.base_url)["routes"]["active"]
            hops = [
                hop
                for route in active
                for hop in route["hops"]
                if (hop["start"], hop["end"]) == REPLICATED_SPAN
            ]
            assert len(hops) == 1, active
            killed["service"] = hops[0]["address"].split(":")[0]
            out, _ = killer.communicate(killed["service"] + "\n", timeout=120)
            assert killer.returncode == 0, out
            killed["returned"] = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
            killed["error"] = exc

    def kill_the_replica_in_use(tokens_so_far: int) -> None:
        # From another thread: the client keeps reading while docker-compose works, so the
        # stream's pause is the gateway's, not the client's.
        if "thread" not in killed and tokens_so_far >= 10:
            killed["at_token"] = tokens_so_far
            killed["thread"] = threading.Thread(target=kill, daemon=True)
            killed["thread"].start()

    result = stream_chat(deployment.base_url, on_chunk=kill_the_replica_in_use)
    assert "thread" in killed, "the stream ended before a peer could be killed"
    killed["thread"].join(120)
    if killer.poll() is None:
        killer.kill()
        killer.wait()
    if "error" in killed:
        raise killed["error"]
    assert result["times"][-1] > killed["returned"], "the stream ended before the kill: make it longer"
    assert result["tokens"] == reference["tokens"]
    assert result["text"] == reference["text"]
    assert failovers(deployment.base_url) == before + 1
    gaps = [b - a for a, b in zip(result["times"], result["times"][1:], strict=False)]
    after_kill = [t for t in result["times"] if t > killed["returned"]]
    deployment.figures["failover"] = {
        "killed": killed["service"],
        "kill_started_after_tokens": killed["at_token"],
        "longest_pause_s": round(max(gaps), 3),
        "kill_returned_to_next_token_s": round(after_kill[0] - killed["returned"], 3),
        "median_gap_s": round(sorted(gaps)[len(gaps) // 2], 4),
        "stream_s_with_kill": round(result["times"][-1] - result["times"][0], 2),
        "stream_s_reference": round(reference["times"][-1] - reference["times"][0], 2),
    }


def test_a_peer_from_another_compose_project_becomes_routable(deployment, reference):
    host = host_address()
    peer_port, peer_dht_port = free_port(), free_port(socket.SOCK_DGRAM)
    address = f"{host}:{peer_port}"
    join_env = {
        "BOOTSTRAP": f"{host}:{deployment.dht_port}",
        "ANNOUNCE_HOST": host,
        "BLOCKS": f"{REPLICATED_SPAN[0]}:{REPLICATED_SPAN[1]}",
        "PEER_PORT": str(peer_port),
        "PEER_DHT_PORT": str(peer_dht_port),
    }
    started = time.monotonic()
    try:
        deployment.compose(deployment.join, "up", "-d", "--no-build", "peer", env=join_env, timeout=600)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{deployment.logs(deployment.join)}") from None

    def listed() -> bool:
        peers = {peer["address"]: peer for peer in swarm_api(deployment.base_url)["peers"]}
        return address in peers and peers[address]["reachable"]

    wait_for(listed, 180, f"the joined peer {address} was not listed and reachable in /swarm/api")
    deployment.figures["join_up_to_listed_s"] = round(time.monotonic() - started, 1)
    # Its span's last replica in the first project goes: only the joined peer can serve it now.
    for service in ("peer1", "peer2"):
        deployment.compose(deployment.main, "kill", service, timeout=120, check=False)

    def killed_ones_gone() -> bool:  # else the chat may plan through one, then fail over
        peers = {peer["address"]: peer for peer in swarm_api(deployment.base_url)["peers"]}
        return not any(peers.get(f"{service}:50051", {}).get("reachable") for service in ("peer1", "peer2"))

    wait_for(killed_ones_gone, 60, "the killed peers stayed listed as reachable")
    result = stream_chat(deployment.base_url)
    assert result["tokens"] == reference["tokens"]
    recent = swarm_api(deployment.base_url)["routes"]["recent"][0]
    assert address in [hop["address"] for hop in recent["hops"]], recent


def test_down_leaves_nothing(deployment):
    started = time.monotonic()
    deployment.down()
    deployment.figures["down_s"] = round(time.monotonic() - started, 1)
    for project in (deployment.main, deployment.join):
        assert deployment.leftovers(project) == {"containers": [], "networks": [], "volumes": []}, project
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{deployment.base_url}/health", timeout=5)


@pytest.mark.skipif(
    os.environ.get("SWARM_TEST_CUDA_IMAGE") != "1",
    reason="set SWARM_TEST_CUDA_IMAGE=1: a cold build of the CUDA image takes ~6 minutes more, which the "
    "suite's 20-minute budget on 2 cores cannot hold",
)
def test_cuda_dockerfile_builds(base_images, tmp_path_factory, figures):
    """Where it can: its base is a local stand-in without CUDA, and torch is the host's (CPU) wheel.
    What is checked is the build and that the image's entry point runs; its GPU paths need a GPU."""
    tag = CUDA_TAG
    figures["cuda_image"] = build_image(DEPLOY / "Dockerfile.cuda", tag, tmp_path_factory.mktemp("pip-cuda"))
    result = run(["podman", "run", "--rm", "--pull=never", tag, "peer", "--help"], timeout=120)
    assert "--blocks" in result.stdout
    user = run(["podman", "run", "--rm", "--pull=never", "--entrypoint", "id", tag, "-u"], timeout=120)
    assert user.stdout.strip() == "10001"
