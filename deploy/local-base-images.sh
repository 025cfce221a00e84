#!/usr/bin/env bash
# Make, without a container registry, the base images that deploy/ names, in podman's local store:
#   python:3.11-slim-bookworm                 FROM of deploy/Dockerfile: Debian's python3 (3.11)
#   nvidia/cuda:12.8.1-base-ubuntu24.04       FROM of deploy/Dockerfile.cuda: plain Debian, no CUDA
#   redis:7-alpine                            the compose file's redis: Debian's redis-server
# from a Debian root made by debootstrap with this machine's own Debian mirror. Only for machines
# that cannot pull (the test machines, tests/test_compose.py); anywhere else docker/podman pull the
# real images, and nothing in the Dockerfiles or compose files changes for these stand-ins.
#
#   bash deploy/local-base-images.sh      (as root; needs podman and debootstrap; idempotent)
#
# Variables: MIRROR (default: the first Debian URI in the apt sources), SUITE (default: bookworm).
set -euo pipefail

SUITE=${SUITE:-bookworm}
DEBIAN=localhost/debian:$SUITE
PYTHON=docker.io/library/python:3.11-slim-bookworm
CUDA=docker.io/nvidia/cuda:12.8.1-base-ubuntu24.04
REDIS=docker.io/library/redis:7-alpine

has_image() { podman image exists "$1"; }
root="" context=$(mktemp -d)
trap 'rm -rf "$context" ${root:+"$root"}' EXIT

debian_mirror() {
    # deb822 (URIs: ...) or one-line (deb URI SUITE ...) sources; the first Debian archive wins.
    # `|| true`, not `|| echo`: under pipefail, head closing the pipe early fails the pipeline even
    # though it found the URI, and an `|| echo` fallback would then print a second line.
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -nE 's/^URIs:[[:space:]]+([^[:space:]]+).*/\1/p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
        | grep -v -- '-security' | grep debian | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! has_image "$DEBIAN"; then
    MIRROR=${MIRROR:-$(debian_mirror)}
    root=$(mktemp -d)
    echo "debootstrap $SUITE from $MIRROR" >&2
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN" >/dev/null
fi

# Each stand-in is a small build on the Debian root: apt inside it reaches the same mirror.
build() {  # TAG PACKAGES [INSTRUCTION...]
    local tag=$1 packages=$2
    shift 2
    has_image "$tag" && return 0
    echo "building $tag" >&2
    { printf 'FROM %s\n' "$DEBIAN"
      printf 'RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends %s >/dev/null' "$packages"
      printf ' && rm -rf /var/lib/apt/lists/*\n'
      printf '%s\n' "$@"
    } >"$context/Containerfile"
    podman build --format docker --pull=never -t "$tag" "$context" >/dev/null
}
build "$PYTHON" "python3 python3-venv python-is-python3 ca-certificates" 'CMD ["python3"]'
# The official image's redis-server runs without protected mode (which refuses every client but
# localhost when no password is set), whatever command the compose file gives it: so does this one.
cat >"$context/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
if [ "$1" = redis-server ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
EOF
build "$REDIS" "redis-server" 'COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/' \
    'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
has_image "$CUDA" || podman tag "$DEBIAN" "$CUDA"
