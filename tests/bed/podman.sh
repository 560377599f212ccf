#!/usr/bin/env bash
# The container engine of the test bed: Podman from Debian's packages,
# serving the Docker Engine API on a socket of this run, with images made
# without a registry (none is reachable from the test machines):
#
#   localhost/decap-debian:bookworm   a Debian minbase root filesystem made
#                                     by debootstrap, `podman import`ed
#   localhost/decap-redis:bookworm    FROM it, with redis-server and a
#                                     readiness check (sidecar tests)
#
# Both are cached as archives under ~/.cache/decap/images, so only the first
# run on a machine pays for debootstrap (~30 s) and the Redis build (~20 s).
#
#   tests/bed/podman.sh install   install Podman, runc, debootstrap; make the images
#   tests/bed/podman.sh start     start the API service; prints `export` lines
#                                 for DECAP_TEST_CONTAINER_SOCKET and the images
#   tests/bed/podman.sh stop      stop the service
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=podman
. "$HERE/lib.sh"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/podman"
IMAGES="$CACHE/images"
SUITE=bookworm
BASE="localhost/decap-debian:$SUITE"
REDIS="localhost/decap-redis:$SUITE"
CONF=/etc/containers/containers.conf

packages() {
    local missing=()
    for tool in podman:podman runc:runc debootstrap:debootstrap; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        say "needs ${missing[*]}: sudo apt-get install ${missing[*]}"
        exit 1
    fi
    say "installing ${missing[*]} from Debian's packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

# Podman 4.3 on these machines: runc refuses the default rlimits (above the
# hard limit), and crun refuses a hybrid cgroup hierarchy; runc with no
# default rlimits works.
configure() {
    [ "$(id -u)" = 0 ] || return 0
    if [ -f "$CONF" ]; then
        grep -q '^# decap test bed' "$CONF" \
            || say "$CONF exists: left as it is (Podman 4.3 here needs runtime = \"runc\" and default_ulimits = [])"
        return 0
    fi
    say "configuring $CONF (runc, no default rlimits)"
    mkdir -p "$(dirname "$CONF")"
    cat > "$CONF" <<'EOF'
# decap test bed: runc (crun refuses a hybrid cgroup hierarchy), and no
# default rlimits (runc refuses those above the hard limit).
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
}

# The Debian base image: debootstrap once, then an archive in the cache.
base_image() {
    podman image exists "$BASE" && return 0
    local archive="$IMAGES/debian-$SUITE-minbase.tar"
    if [ ! -f "$archive" ]; then
        say "making a Debian $SUITE root filesystem with debootstrap (once; cached in $IMAGES)"
        local root
        root=$(mktemp -d)
        debootstrap --variant=minbase "$SUITE" "$root" http://deb.debian.org/debian >&2
        # Lists and caches are of no use in a base image.
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        mkdir -p "$IMAGES"
        tar -C "$root" -cf "$archive.partial" .
        mv "$archive.partial" "$archive"
        rm -rf "$root"
    fi
    podman import --change 'CMD ["/bin/bash"]' "$archive" "$BASE" >/dev/null
}

# A service image for sidecar tests: Redis from Debian's packages, with a
# readiness check.
redis_image() {
    podman image exists "$REDIS" && return 0
    local archive="$IMAGES/decap-redis-$SUITE.tar"
    if [ ! -f "$archive" ]; then
        say "building $REDIS from $BASE (once; cached in $IMAGES)"
        local ctx
        ctx=$(mktemp -d)
        cat > "$ctx/Containerfile" <<EOF
FROM $BASE
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
CMD ["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"]
EOF
        podman build --network host -q -t "$REDIS" "$ctx" >/dev/null
        rm -rf "$ctx"
        mkdir -p "$IMAGES"
        podman save -o "$archive.partial" "$REDIS" >/dev/null
        mv "$archive.partial" "$archive"
        return 0
    fi
    podman load -i "$archive" >/dev/null
}

install() {
    packages
    configure
    base_image
    redis_image
}

start() {
    install
    rm -rf "$STATE"
    mkdir -p "$STATE"
    local socket="$STATE/podman.sock"
    podman system service --time=0 "unix://$socket" > "$STATE/podman.log" 2>&1 &
    echo $! > "$STATE/pid"
    wait_ready "curl -sf --unix-socket '$socket' http://d/_ping" \
        "DECAP_TEST_CONTAINER_SOCKET=$socket" \
        "DECAP_TEST_BUILD_IMAGE=$BASE" \
        "DECAP_TEST_REDIS_IMAGE=$REDIS"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
