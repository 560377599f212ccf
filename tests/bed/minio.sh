#!/usr/bin/env bash
# The S3 server of the test bed: MinIO, built from the Go module proxy at a
# pinned version and cached outside the checkout.
#
#   tests/bed/minio.sh install   build it unless cached (~4 min cold, 1.5 GB of RAM)
#   tests/bed/minio.sh start     start it on loopback; prints `export` lines
#                                for DECAP_TEST_S3_ENDPOINT and credentials
#   tests/bed/minio.sh stop
#
# DECAP_TEST_S3_PORT picks the port (default: a free one).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=minio
. "$HERE/lib.sh"
MINIO_VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
BIN="$CACHE/bin/minio-$MINIO_VERSION"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/minio"

install() {
    go_install MinIO "github.com/minio/minio@$MINIO_VERSION" minio "$BIN"
}

start() {
    install
    local port="${DECAP_TEST_S3_PORT:-$(free_port)}" console
    console=$(free_port)
    rm -rf "$STATE"
    mkdir -p "$STATE/data"
    # One key pair for every server of the bed: DynamoDB Local takes letters and digits only.
    MINIO_ROOT_USER=decaptest MINIO_ROOT_PASSWORD=decaptestsecret MINIO_BROWSER=off MINIO_UPDATE=off \
        "$BIN" server "$STATE/data" --address "127.0.0.1:$port" --console-address "127.0.0.1:$console" --quiet \
        > "$STATE/minio.log" 2>&1 &
    echo $! > "$STATE/pid"
    wait_ready "curl -fsS http://127.0.0.1:$port/minio/health/live" \
        "DECAP_TEST_S3_ENDPOINT=http://127.0.0.1:$port" \
        "DECAP_TEST_S3_ACCESS_KEY=decaptest" \
        "DECAP_TEST_S3_SECRET_KEY=decaptestsecret"
}

dispatch "$@"
