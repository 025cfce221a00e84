#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine, in ./.venv.
#   bash deploy/setup.sh         # runtime: torch (CPU wheel), the project
#   bash deploy/setup.sh test    # plus the test tools, redis-server and the Node test client
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
fi

# Podman's engine settings for these machines (only where podman runs as root: the test's case).
# runc, because crun refuses cgroups v1 in hybrid mode; and container ulimits within this machine's
# hard limits, or every container fails with "setrlimit RLIMIT_NOFILE: Operation not permitted".
configure_podman() {
    [ "$(id -u)" = 0 ] || return 0
    local conf=/etc/containers/containers.conf nofile
    nofile=$(ulimit -Hn)
    [ "$nofile" = unlimited ] && nofile=1048576
    if [ -f "$conf" ] && ! grep -q "deploy/setup.sh" "$conf"; then
        return 0  # the machine's own settings: leave them
    fi
    mkdir -p /etc/containers
    cat >"$conf.new" <<EOF
# Written by deploy/setup.sh test, for tests/test_compose.py (rootful podman).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
    if cmp -s "$conf.new" "$conf"; then rm "$conf.new"; else mv "$conf.new" "$conf"; fi
    # The base images deploy/ names, made locally where no registry can be reached (a no-op once made).
    bash deploy/local-base-images.sh
}

if [ "${1:-}" = "test" ]; then
    "${PIP[@]}" -e '.[test]'
    # System packages the integration tests use: a real redis-server, docker-compose to validate
    # the compose files (no engine needed; no recommends, or apt pulls in docker.io), and chromium
    # for the swarm map page.
    missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Rootful podman for tests/test_compose.py, which builds the images and brings the compose files
    # up for real (docker-compose talks to podman's Docker-compatible socket). With recommends:
    # they bring netavark and aardvark-dns, the networks and service names compose needs.
    if ! command -v podman >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
        || ! command -v runc >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq podman runc debootstrap >/dev/null
    fi
    configure_podman
    # the official `openai` npm package, for the Node client test (versions pinned by the lock file)
    if command -v npm >/dev/null 2>&1 && [ ! -d tests/node/node_modules ]; then
        npm ci --prefix tests/node --no-audit --no-fund --silent
    fi
    # real tokenizers of six families from llama-cpp-python's sdist on PyPI (no model hub here),
    # converted once and cached outside the repository (tests/real_tokenizers.py)
    .venv/bin/python -m tests.real_tokenizers
else
    "${PIP[@]}" -e .
fi
