#!/usr/bin/env bash
# The DynamoDB of the test bed: DynamoDB Local 3.1.0 from Maven Central (its
# jar carries the sqlite4java native library), cached outside the checkout.
#
#   tests/bed/dynamodb.sh install   fetch it unless cached (seconds)
#   tests/bed/dynamodb.sh start     start it in memory on loopback; prints
#                                   `export DECAP_TEST_DYNAMODB_ENDPOINT=…`
#   tests/bed/dynamodb.sh stop
#
# DECAP_TEST_DYNAMODB_PORT picks the port (default: a free one).
set -euo pipefail

VERSION="3.1.0"
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${DECAP_CACHE:-$HOME/.cache/decap}"
LIB="$CACHE/dynamodb-local-$VERSION/lib"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/dynamodb"

install() {
    if [ -f "$LIB/.complete" ]; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || { echo "tests/bed/dynamodb.sh: Maven is needed to fetch DynamoDB Local" >&2; exit 1; }
    echo "tests/bed/dynamodb.sh: fetching DynamoDB Local $VERSION (once; cached in $CACHE)" >&2
    rm -rf "$LIB"
    mvn -q -B -f "$HERE/dynamodb/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
        dependency:copy-dependencies -DoutputDirectory="$LIB" -DincludeScope=runtime >&2
    touch "$LIB/.complete"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    install
    command -v java >/dev/null 2>&1 || { echo "tests/bed/dynamodb.sh: Java is needed to run DynamoDB Local" >&2; exit 1; }
    local port="${DECAP_TEST_DYNAMODB_PORT:-$(free_port)}"
    rm -rf "$STATE"
    mkdir -p "$STATE"
    # Run from the state folder: DynamoDB Local writes files into its working directory.
    (cd "$STATE" && exec java -Xmx512m -cp "$LIB/*" software.amazon.dynamodb.services.local.main.ServerRunner \
        -inMemory -disableTelemetry -port "$port" > "$STATE/dynamodb.log" 2>&1) &
    echo $! > "$STATE/pid"
    for _ in $(seq 1 300); do
        # Any HTTP answer means it listens (it refuses unsigned requests).
        if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
            echo "export DECAP_TEST_DYNAMODB_ENDPOINT=http://127.0.0.1:$port"
            return 0
        fi
        if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
            echo "tests/bed/dynamodb.sh: DynamoDB Local exited; its log:" >&2
            cat "$STATE/dynamodb.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "tests/bed/dynamodb.sh: DynamoDB Local did not answer on port $port within 30 s" >&2
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
    *) echo "usage: tests/bed/dynamodb.sh install|start|stop" >&2; exit 2 ;;
esac
