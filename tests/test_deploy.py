"""deploy/: the compose files validate, every `swarm` command in them is accepted, the images are sound.

Checked here without a container engine (tests/test_compose.py builds the images and runs the
swarm for real, with podman):
- `docker-compose config` accepts both compose files (skipped where docker-compose is absent);
- every service of ours runs a `swarm` command line that the CLI accepts under the service's own
  environment (`--dry-run` where the subcommand has it), so a flag or variable the CLI does not
  know fails here rather than in a container;
- the Dockerfiles: torch pinned like deploy/setup.sh and installed before the source, a non-root
  USER, a HEALTHCHECK, and the healthcheck script they copy in (deploy/swarm-healthcheck), run
  against real processes.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
JOIN = DEPLOY / "docker-compose.join.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
HEALTHCHECK = DEPLOY / "swarm-healthcheck"
DOCKER_COMPOSE_MISSING = (
    "docker-compose is not installed (apt-get install -y --no-install-recommends docker-compose)"
)
# What the join file requires; any plausible values do.
JOIN_ENV = {"BOOTSTRAP": "192.0.2.10:31337", "ANNOUNCE_HOST": "192.0.2.20", "BLOCKS": "2:4"}
DRY_RUN_COMMANDS = {"up", "dht", "peer", "gateway"}  # the subcommands with --dry-run
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}


# --- compose files as compose reads them ----------------------------------------------------------
_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def replace(match: re.Match) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        if bare:
            return env.get(bare, "")
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return interpolate(arg, env) if unset else value
        if op in (":?", "?"):
            if unset:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolated(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def load_compose(path: Path, env: dict[str, str]) -> dict:
    return interpolated(yaml.safe_load(path.read_text()), env)


def read_dotenv(path: Path) -> dict[str, str]:
    result = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()
    return result


def service_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# --- Dockerfiles ------------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    heredocs: list[str] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and heredoc bodies attached; comments dropped."""
    lines = path.read_text().splitlines()
    result: list[Instruction] = []
    i = 0
    while i < len(lines):
        text = lines[i]
        i += 1
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        keyword, _, args = text.strip().partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        for match in re.finditer(r"<<-?(['\"]?)(\w+)\1", args):
            end = lines.index(match.group(2), i)
            instruction.heredocs.append("\n".join(lines[i:end]) + "\n")
            i = end + 1
        result.append(instruction)
    return result


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


@dataclass
class Image:
    """What a service built from one of our Dockerfiles runs when it overrides nothing."""

    entrypoint: list[str]
    cmd: list[str]


def image_of(dockerfile: Path) -> Image:
    instructions = parse_dockerfile(dockerfile)
    last = {ins.keyword: ins.args for ins in instructions}
    return Image(exec_form(last.get("ENTRYPOINT", "[]")), exec_form(last.get("CMD", "[]")))


# --- the swarm command lines of a compose file ------------------------------------------------------
def swarm_commands(argv: list[str]) -> list[list[str]]:
    """The argument lists of every `swarm` invocation in argv, directly or in `sh -c SCRIPT`."""
    if not argv:
        return []
    if Path(argv[0]).name == "swarm":
        return [argv[1:]]
    if argv[0] in SHELLS and len(argv) >= 3 and argv[1] == "-c":
        lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        commands = []
        for i, token in enumerate(tokens):
            if token == "swarm" and (i == 0 or tokens[i - 1] in {"||", "&&", ";", "|", "{", "(", "exec"}):
                args = []
                for arg in tokens[i + 1 :]:
                    if arg in {"||", "&&", ";", "|", "}", ")", "&"}:
                        break
                    args.append(arg)
                commands.append(args)
        return commands
    return []


def service_commands(compose_path: Path, env: dict[str, str]) -> list[tuple[str, list[str], dict[str, str]]]:
    """(service, swarm arguments, environment) for every swarm invocation of the file's services."""
    compose = load_compose(compose_path, env)
    found = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue  # not our image (redis)
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        context = compose_path.parent / (build["context"] if isinstance(build, dict) else build)
        image = image_of((context / dockerfile).resolve())
        entrypoint = service.get("entrypoint", image.entrypoint)
        command = service.get("command", image.cmd if "entrypoint" not in service else [])
        if isinstance(entrypoint, str):
            entrypoint = shlex.split(entrypoint)
        if isinstance(command, str):
            command = shlex.split(command)
        commands = swarm_commands([str(arg) for arg in entrypoint + command])
        assert commands, f"{compose_path.name}: service {name} runs no swarm command: {entrypoint + command}"
        found.extend((name, args, service_environment(service)) for args in commands)
    return found


def run_swarm_cli(args: list[str], service_env: dict[str, str]) -> subprocess.CompletedProcess:
    """The command as the container would run it, stopped before it does anything."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_")}
    env.update(service_env)
    subcommand = next((arg for arg in args if not arg.startswith("-")), None)
    if subcommand in DRY_RUN_COMMANDS:
        argv = [sys.executable, "-m", "swarm.cli", *args, "--dry-run"]
    else:  # parse only: these run quickly for real, but need not run here
        parse = "import sys; from swarm.cli import build_parser; build_parser().parse_args(sys.argv[1:])"
        argv = [sys.executable, "-c", parse, *args]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


CASES = [
    ("docker-compose.yml", COMPOSE, {}),
    ("docker-compose.yml+.env.example", COMPOSE, read_dotenv(ENV_EXAMPLE)),
    (
        "docker-compose.yml+real-model",
        COMPOSE,
        {
            "MODEL_DIR": "/srv/models/llama",
            "MODEL_NAME": "llama",
            "PEER0_BLOCKS": "0:16",
            "PEER1_BLOCKS": "16:32",
            "API_KEY": "secret",
            "PEER_DTYPE": "bfloat16",
            "PEER_QUANT": "int8",
        },
    ),
    ("docker-compose.join.yml", JOIN, JOIN_ENV),
]
SERVICE_COMMANDS = [
    pytest.param(name, args, env, id=f"{case}:{name}")
    for case, path, case_env in CASES
    for name, args, env in service_commands(path, case_env)
]


@pytest.mark.parametrize(("service", "args", "env"), SERVICE_COMMANDS)
def test_service_command_is_accepted_by_the_cli(service, args, env):
    result = run_swarm_cli(args, env)
    assert result.returncode == 0, (
        f"service {service}: `swarm {shlex.join(args)}` with {env} exited {result.returncode}:\n"
        f"{result.stdout}{result.stderr}"
    )


def test_every_role_is_in_the_compose_files():
    main = {args[0] for _, args, _ in service_commands(COMPOSE, {})}
    assert {"dht", "peer", "gateway", "demo-model"} <= main
    peers = [args for _, args, _ in service_commands(COMPOSE, {}) if args[0] == "peer"]
    assert len(peers) >= 2
    join = [args for _, args, _ in service_commands(JOIN, JOIN_ENV)]
    assert [args[0] for args in join].count("peer") >= 1


def test_a_flag_the_cli_lacks_is_caught():
    """The check above is not vacuous: an unknown flag or a malformed variable fails it."""
    assert run_swarm_cli(["peer", "--model", "/m", "--blocks", "0:2", "--no-such-flag"], {}).returncode != 0
    assert run_swarm_cli(["peer", "--model", "/m"], {"SWARM_PEER_BLOCKS": "2"}).returncode != 0
    assert run_swarm_cli(["demo-model", "--preset", "huge"], {}).returncode != 0
    assert run_swarm_cli(["peer", "--model", "/m"], {"SWARM_PEER_BLOCKS": "0:2"}).returncode == 0


def test_swarm_commands_are_found_in_shell_scripts():
    script = "test -f /m/x || { swarm demo-model --path /m && touch /m/x; }; exec swarm dht --port 1"
    assert swarm_commands(["/bin/sh", "-c", script]) == [
        ["demo-model", "--path", "/m"],
        ["dht", "--port", "1"],
    ]
    assert swarm_commands(["swarm", "peer"]) == [["peer"]]
    assert swarm_commands(["redis-server"]) == []


def test_interpolation_matches_compose():
    env = {"SET": "v", "EMPTY": ""}
    assert (
        interpolate("$$HOME ${SET} ${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET", env)
        == "$HOME v v d d  v"
    )
    assert interpolate("${UNSET:-${SET}}", env) == "v"
    with pytest.raises(ValueError, match="BOOTSTRAP"):
        load_compose(JOIN, {})


def test_compose_wiring():
    compose = load_compose(COMPOSE, {})
    services = compose["services"]
    assert {"redis", "dht", "gateway", "model-init"} <= set(services)
    gateway = services["gateway"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["dht"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name != "model-init":
            assert service.get("restart") == "unless-stopped", name
            assert "healthcheck" in service, name
    peers = {name: s for name, s in services.items() if s.get("command", [None])[0] == "peer"}
    spans = []
    for name, service in peers.items():
        command = service["command"]
        env = service_environment(service)
        # Reachable from the gateway: the service's own name and a fixed port.
        assert command[command.index("--announce-host") + 1] == name
        assert env["SWARM_PEER_PORT"] == service["healthcheck"]["test"][-1]
        assert env["SWARM_PEER_DHT"] == "dht:31337"
        assert "/model:ro" in service["volumes"][0]
        start, end = command[command.index("--blocks") + 1].split(":")
        spans.append((int(start), int(end)))
    # The default split covers the demo model's 4 blocks without a gap, and one span has a replica.
    assert len(set(spans)) < len(spans)
    spans = sorted(set(spans))
    assert spans[0][0] == 0 and spans[-1][1] == 4
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert service_environment(gateway)["SWARM_GATEWAY_REDIS_URL"].startswith("redis://redis:")


@pytest.mark.parametrize(("path", "env"), [(COMPOSE, {}), (JOIN, JOIN_ENV)], ids=["swarm", "join"])
def test_every_server_listens_beyond_the_container(path, env):
    """The CLI listens on 127.0.0.1 by default: in a container, reachable from nothing outside it."""
    for service, args, service_env in service_commands(path, env):
        command = args[0]
        if command in {"dht", "peer", "gateway", "up"}:
            variable = f"SWARM_{command.upper()}_HOST"
            host = args[args.index("--host") + 1] if "--host" in args else service_env.get(variable)
            assert host == "0.0.0.0", f"{path.name}: {service} listens on {host or '127.0.0.1'}"


# --- docker-compose config ----------------------------------------------------------------------------
def compose_variables() -> set[str]:
    text = COMPOSE.read_text() + JOIN.read_text()
    return {m.group(2) or m.group(5) for m in _VARIABLE.finditer(text) if m.group(2) or m.group(5)}


def docker_compose(path: Path, extra_env: dict[str, str], env_file: Path, *args: str):
    if shutil.which("docker-compose") is None:
        pytest.skip(DOCKER_COMPOSE_MISSING)
    variables = compose_variables()
    env = {key: value for key, value in os.environ.items() if key not in variables}
    env.update(extra_env)
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(path), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "env", "env_file"),
    [
        pytest.param(COMPOSE, {}, None, id="swarm"),
        pytest.param(COMPOSE, {}, ENV_EXAMPLE, id="swarm+.env.example"),
        pytest.param(JOIN, JOIN_ENV, None, id="join"),
        pytest.param(JOIN, JOIN_ENV, ENV_EXAMPLE, id="join+.env.example"),
    ],
)
def test_docker_compose_config_accepts_the_file(path, env, env_file, tmp_path):
    if env_file is None:
        env_file = tmp_path / "empty.env"  # not deploy/.env, which may hold someone's settings
        env_file.write_text("")
    result = docker_compose(path, env, env_file, "config")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["services"]


def test_docker_compose_join_requires_the_bootstrap_address(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = docker_compose(JOIN, {}, empty, "config")
    assert result.returncode != 0
    assert "BOOTSTRAP" in result.stderr


# --- Dockerfiles ------------------------------------------------------------------------------------
def setup_torch_pin() -> str:
    match = re.search(r"torch==([\w.+-]+)", (DEPLOY / "setup.sh").read_text())
    assert match, "deploy/setup.sh pins no torch version"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile):
    instructions = parse_dockerfile(dockerfile)
    keywords = [ins.keyword for ins in instructions]
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args[name] = value

    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    healthchecks = [ins.args for ins in instructions if ins.keyword == "HEALTHCHECK"]
    assert healthchecks and not healthchecks[-1].upper().startswith("NONE")
    assert "swarm-healthcheck" in healthchecks[-1]
    assert exec_form(next(ins.args for ins in reversed(instructions) if ins.keyword == "ENTRYPOINT")) == [
        "swarm"
    ]

    runs = [(i, ins.args) for i, ins in enumerate(instructions) if ins.keyword == "RUN"]
    torch_runs = [(i, run) for i, run in runs if re.search(r"torch==", run)]
    assert len(torch_runs) == 1, "torch is installed in one pinned step"
    torch_at, torch_run = torch_runs[0]
    pin = re.search(r"torch==([^\s\"']+)", torch_run).group(1)
    pin = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), pin)
    assert pin == setup_torch_pin(), "the image's torch differs from deploy/setup.sh's"
    # Cache-friendly: torch, then the dependencies, then the source.
    source_at = next(
        i for i, ins in enumerate(instructions) if ins.keyword == "COPY" and ins.args.startswith(". ")
    )
    deps_at = next(i for i, run in runs if "requirements" in run)
    project_at = next(i for i, run in runs if i > source_at and "pip install" in run)
    assert torch_at < deps_at < source_at < project_at
    assert "--no-deps" in instructions[project_at].args
    for _, run in runs:
        if "pip install" in run:
            assert "--no-cache-dir" in run, run
    assert keywords.index("USER") > project_at  # installs as root, runs as the user


def test_dockerfiles_copy_the_healthcheck():
    for dockerfile in DOCKERFILES:
        assert healthcheck_script(dockerfile) == HEALTHCHECK
    compile(HEALTHCHECK.read_text(), "swarm-healthcheck", "exec")
    # No heredocs (podman's builder, buildah 1.28, cannot parse them): every instruction is one line.
    for dockerfile in DOCKERFILES:
        assert not any(ins.heredocs for ins in parse_dockerfile(dockerfile)), dockerfile.name


def test_dockerignore_lets_in_the_packages_only():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [
        path
        for path in REPO.iterdir()
        if (path / "__init__.py").exists() and any(Path(path.name).match(glob) for glob in include["include"])
    ]
    assert packages
    for package in packages:
        for source in package.glob("*.py"):
            assert not dockerignored(source.relative_to(REPO).as_posix(), patterns), source
    assert not dockerignored("pyproject.toml", patterns)
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "swarm/__pycache__/cli.cpython-311.pyc",
        "deploy/Dockerfile",
    ]:
        assert dockerignored(path, patterns), path
    assert not dockerignored(HEALTHCHECK.relative_to(REPO).as_posix(), patterns)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!"))
        if any(compiled.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# --- the healthcheck script, against real processes ------------------------------------------------------
def healthcheck_script(dockerfile: Path) -> Path:
    """The file of the build context that the Dockerfile copies to /usr/local/bin/swarm-healthcheck."""
    for ins in parse_dockerfile(dockerfile):
        if ins.keyword == "COPY" and ins.args.endswith("/usr/local/bin/swarm-healthcheck"):
            assert "--chmod=755" in ins.args, "the healthcheck must be executable"
            return REPO / shlex.split(ins.args)[-2]
    raise AssertionError(f"{dockerfile.name} does not write /usr/local/bin/swarm-healthcheck")


@pytest.fixture(scope="module")
def healthcheck():
    def run(*args: str, pid: int | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        if pid is not None:
            env["SWARM_HEALTHCHECK_PID"] = str(pid)
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_dht(healthcheck):
    port = free_port(socket.SOCK_DGRAM)
    node = subprocess.Popen(
        [sys.executable, "-m", "swarm.cli", "dht", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        lines = iter(node.stdout.readline, "")  # a line about the node may come first
        assert any(line.startswith("DHT_READY") for line in lines), "the DHT node did not start"
        explicit = healthcheck("dht", str(port))
        assert explicit.returncode == 0, explicit.stdout
        # Without arguments: the role and the port come from the process's own command line.
        auto = healthcheck(pid=node.pid)
        assert auto.returncode == 0, auto.stdout
        assert f"UDP port {port}" in auto.stdout
    finally:
        node.terminate()
        node.wait(10)
    assert healthcheck("dht", str(port)).returncode == 1


def test_healthcheck_gateway(healthcheck):
    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        assert healthcheck("gateway", port).returncode == 0
        status["code"] = 503
        assert healthcheck("gateway", port).returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck("gateway", port).returncode == 1


def test_healthcheck_peer(healthcheck):
    import grpc

    from protos import swarm_pb2, swarm_pb2_grpc

    class Peer(swarm_pb2_grpc.PeerServicer):
        def Info(self, request, context):  # noqa: N802 - the proto's name
            return swarm_pb2.InfoResponse(peer_id="p1", model="m", start_block=0, end_block=2, state="online")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    swarm_pb2_grpc.add_PeerServicer_to_server(Peer(), server)
    port = str(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    try:
        result = healthcheck("peer", port)
        assert result.returncode == 0, result.stdout
        assert "p1" in result.stdout
    finally:
        server.stop(0).wait()
    assert healthcheck("peer", port).returncode == 1


def test_healthcheck_without_a_swarm_process(healthcheck):
    other = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        result = healthcheck(pid=other.pid)
        assert result.returncode == 1
        assert "no swarm process" in result.stdout
    finally:
        other.kill()
        other.wait()
    assert healthcheck("peer").returncode == 1  # a role without its port is a usage error
