#!/usr/bin/env bash
# An image registry for the test bed (none is reachable from the test
# machines): the CNCF Distribution registry, built from the Go module proxy
# at a pinned version and cached outside the checkout. Podman is told it
# speaks plain HTTP (a drop-in in /etc/containers/registries.conf.d, as
# root, removed at stop), so builds can pull from it.
#
#   tests/bed/registry.sh install   build it unless cached (~2 min cold)
#   tests/bed/registry.sh start     start it on loopback; prints `export` lines
#                                   for DECAP_TEST_REGISTRY (host:port)
#   tests/bed/registry.sh stop
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=registry
. "$HERE/lib.sh"
REGISTRY_VERSION="v3.1.2"
BIN="$CACHE/bin/registry-$REGISTRY_VERSION"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/registry"
DROPIN=/etc/containers/registries.conf.d/decap-test-registry.conf

install() {
    go_install "the Distribution registry" \
        "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" registry "$BIN"
}

start() {
    install
    local port="${DECAP_TEST_REGISTRY_PORT:-$(free_port)}"
    rm -rf "$STATE"
    mkdir -p "$STATE/data"
    cat > "$STATE/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YAML
    if [ "$(id -u)" = 0 ]; then
        mkdir -p "$(dirname "$DROPIN")"
        printf '[[registry]]\nlocation = "127.0.0.1:%s"\ninsecure = true\n' "$port" > "$DROPIN"
    fi
    OTEL_TRACES_EXPORTER=none "$BIN" serve "$STATE/config.yml" > "$STATE/registry.log" 2>&1 &
    echo $! > "$STATE/pid"
    wait_ready "curl -fsS http://127.0.0.1:$port/v2/" "DECAP_TEST_REGISTRY=127.0.0.1:$port"
}

stop_registry() {
    stop
    if [ "$(id -u)" = 0 ]; then
        rm -f "$DROPIN"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop_registry ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
