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
    # the official `openai` npm package, for the Node client test (versions pinned by the lock file)
    if command -v npm >/dev/null 2>&1 && [ ! -d tests/node/node_modules ]; then
        npm ci --prefix tests/node --no-audit --no-fund --silent
    fi
else
    "${PIP[@]}" -e .
fi
