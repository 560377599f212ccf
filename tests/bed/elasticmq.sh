#!/usr/bin/env bash
# The SQS of the test bed: ElasticMQ 1.7.1 from Maven Central (FIFO queues,
# in memory), cached outside the checkout.
#
#   tests/bed/elasticmq.sh install   fetch it unless cached (seconds)
#   tests/bed/elasticmq.sh start     start it on loopback; prints
#                                    `export DECAP_TEST_SQS_ENDPOINT=…`
#   tests/bed/elasticmq.sh stop
#
# DECAP_TEST_SQS_PORT picks the port (default: a free one).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=elasticmq
. "$HERE/lib.sh"
VERSION="1.7.1"
LIB="$CACHE/elasticmq-$VERSION/lib"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/elasticmq"

install() { mvn_fetch "$HERE/elasticmq/pom.xml" "$LIB"; }

start() {
    install
    command -v java >/dev/null 2>&1 || { say "Java is needed to run it"; exit 1; }
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
    wait_ready "curl -fs -o /dev/null 'http://127.0.0.1:$port/?Action=ListQueues'" "DECAP_TEST_SQS_ENDPOINT=http://127.0.0.1:$port"
}

dispatch "$@"
