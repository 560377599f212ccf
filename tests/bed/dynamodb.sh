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
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=dynamodb
. "$HERE/lib.sh"
VERSION="3.1.0"
LIB="$CACHE/dynamodb-local-$VERSION/lib"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/dynamodb"

install() { mvn_fetch "$HERE/dynamodb/pom.xml" "$LIB"; }

start() {
    install
    command -v java >/dev/null 2>&1 || { say "Java is needed to run it"; exit 1; }
    local port="${DECAP_TEST_DYNAMODB_PORT:-$(free_port)}"
    rm -rf "$STATE"
    mkdir -p "$STATE"
    # Run from the state folder: DynamoDB Local writes files into its working directory.
    (cd "$STATE" && exec java -Xmx512m -cp "$LIB/*" software.amazon.dynamodb.services.local.main.ServerRunner \
        -inMemory -disableTelemetry -port "$port" > "$STATE/dynamodb.log" 2>&1) &
    echo $! > "$STATE/pid"
    # Any HTTP answer means it listens (it refuses unsigned requests).
    wait_ready "curl -s -o /dev/null http://127.0.0.1:$port/" "DECAP_TEST_DYNAMODB_ENDPOINT=http://127.0.0.1:$port"
}

dispatch "$@"
