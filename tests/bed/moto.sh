#!/usr/bin/env bash
# The IAM (and STS) of the test bed: moto's server 5.2.5 from PyPI, in a
# virtualenv cached outside the checkout. No local server implements IAM;
# moto answers its API as AWS does, enough to create and delete users, roles
# and their inline policies.
#
#   tests/bed/moto.sh install   install it unless cached (~40 s cold)
#   tests/bed/moto.sh start     start it on loopback; prints
#                               `export DECAP_TEST_IAM_ENDPOINT=…`
#   tests/bed/moto.sh stop
#
# DECAP_TEST_IAM_PORT picks the port (default: a free one).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=moto
. "$HERE/lib.sh"
VERSION="5.2.5"
VENV="$CACHE/moto-$VERSION"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/moto"

install() {
    if [ -f "$VENV/.complete" ]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || { say "Python 3 is needed to install moto"; exit 1; }
    say "installing moto $VERSION from PyPI (once; cached in $CACHE)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$VERSION" >&2
    touch "$VENV/.complete"
}

start() {
    install
    local port="${DECAP_TEST_IAM_PORT:-$(free_port)}"
    rm -rf "$STATE"
    mkdir -p "$STATE"
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" > "$STATE/moto.log" 2>&1 &
    echo $! > "$STATE/pid"
    wait_ready "curl -fsS http://127.0.0.1:$port/moto-api/" \
        "DECAP_TEST_IAM_ENDPOINT=http://127.0.0.1:$port"
}

dispatch "$@"
