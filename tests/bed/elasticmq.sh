#!/usr/bin/env bash
# The SQS of the test bed: ElasticMQ 1.7.1 from Maven Central (FIFO queues,
# in memory), cached outside the checkout.
#
#   tests/bed/elasticmq.sh install   fetch it unless cached (seconds)
#   tests/bed/elasticmq.sh start     start it in memory on loopback; prints
#                                   `export DECAP_TEST_SQS_ENDPOINT=…`
#   tests/bed/elasticmq.sh stop
#
# DECAP_TEST_SQS_PORT picks the port (default: a free one).
set -euo pipefail

VERSION="1.7.1"
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${DECAP_CACHE:-$HOME/.cache/decap}"
LIB="$CACHE/elasticmq-$VERSION/lib"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/elasticmq"

install() {
    if [ -f "$LIB/.complete" ]; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || { echo "tests/bed/elasticmq.sh: Maven is needed to fetch ElasticMQ" >&2; exit 1; }
    echo "tests/bed/elasticmq.sh: fetching ElasticMQ $VERSION (once; cached in $CACHE)" >&2
    rm -rf "$LIB"
    mvn -q -B -f "$HERE/elasticmq/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
        dependency:copy-dependencies -DoutputDirectory="$LIB" -DincludeScope=runtime >&2
    touch "$LIB/.complete"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    install
    command -v java >/dev/null 2>&1 || { echo "tests/bed/elasticmq.sh: Java is needed to run ElasticMQ" >&2; exit 1; }
    local port="${DECAP_TEST_SQS_PORT:-$(free_port)}"
    rm -rf "$STATE"
    mkdir -p "$STATE"
    cat > "$STATE/elasticmq.conf" <<CONF
include classpath("application.conf")
node-address { protocol = http, host = 127.0.0.1, port = $port, context-path = "" }
rest-sqs { enabled = true, bind-port = $port, bind-hostname = "127.0.0.1", sqs-limits = strict }
rest-stats { enabled = false }
generate-node-address = false
queues {}
CONF
    (cd "$STATE" && exec java -Xmx256m -Dconfig.file="$STATE/elasticmq.conf" -cp "$LIB/*" org.elasticmq.server.Main \
        > "$STATE/elasticmq.log" 2>&1) &
    echo $! > "$STATE/pid"
    for _ in $(seq 1 300); do
        if curl -fs -o /dev/null "http://127.0.0.1:$port/?Action=ListQueues"; then
            echo "export DECAP_TEST_SQS_ENDPOINT=http://127.0.0.1:$port"
            return 0
        fi
        if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
            echo "tests/bed/elasticmq.sh: ElasticMQ exited; its log:" >&2
            cat "$STATE/elasticmq.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "tests/bed/elasticmq.sh: ElasticMQ did not answer on port $port within 30 s" >&2
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
    *) echo "usage: tests/bed/elasticmq.sh install|start|stop" >&2; exit 2 ;;
esac
