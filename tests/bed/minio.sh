#!/usr/bin/env bash
# The S3 server of the test bed: MinIO, built from the Go module proxy at a
# pinned version and cached outside the checkout.
#
#   tests/bed/minio.sh install   build it unless cached (~4 min cold, 1.5 GB of RAM)
#   tests/bed/minio.sh start     start it on loopback; prints `export` lines
#                                for DECAP_TEST_S3_ENDPOINT and credentials
#   tests/bed/minio.sh stop      stop the one started from this environment
#
# DECAP_TEST_S3_PORT picks the port (default: a free one).
set -euo pipefail

MINIO_VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
CACHE="${DECAP_CACHE:-$HOME/.cache/decap}"
BIN="$CACHE/bin/minio-$MINIO_VERSION"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/minio"

install() {
    if [ -x "$BIN" ]; then
        return 0
    fi
    command -v go >/dev/null 2>&1 || { echo "tests/bed/minio.sh: Go is needed to build MinIO" >&2; exit 1; }
    echo "tests/bed/minio.sh: building MinIO $MINIO_VERSION (once; cached in $CACHE)" >&2
    local gobin
    gobin=$(mktemp -d)
    GOBIN="$gobin" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS="-buildvcs=false" \
        nice -n 10 go install "github.com/minio/minio@$MINIO_VERSION"
    mkdir -p "$(dirname "$BIN")"
    mv "$gobin/minio" "$BIN"
    rmdir "$gobin"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    install
    local port="${DECAP_TEST_S3_PORT:-$(free_port)}"
    local console
    console=$(free_port)
    rm -rf "$STATE"
    mkdir -p "$STATE/data"
    MINIO_ROOT_USER=decaptest MINIO_ROOT_PASSWORD=decaptestsecret MINIO_BROWSER=off MINIO_UPDATE=off \
        "$BIN" server "$STATE/data" --address "127.0.0.1:$port" --console-address "127.0.0.1:$console" --quiet \
        > "$STATE/minio.log" 2>&1 &
    echo $! > "$STATE/pid"
    for _ in $(seq 1 200); do
        if curl -fsS "http://127.0.0.1:$port/minio/health/live" >/dev/null 2>&1; then
            echo "export DECAP_TEST_S3_ENDPOINT=http://127.0.0.1:$port"
            echo "export DECAP_TEST_S3_ACCESS_KEY=decaptest"
            echo "export DECAP_TEST_S3_SECRET_KEY=decaptestsecret"
            return 0
        fi
        if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
            echo "tests/bed/minio.sh: MinIO exited; its log:" >&2
            cat "$STATE/minio.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "tests/bed/minio.sh: MinIO did not become healthy on port $port within 20 s" >&2
    stop
    exit 1
}

stop() {
    if [ -f "$STATE/pid" ]; then
        kill "$(cat "$STATE/pid")" 2>/dev/null || true
        rm -f "$STATE/pid"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: tests/bed/minio.sh install|start|stop" >&2; exit 2 ;;
esac
