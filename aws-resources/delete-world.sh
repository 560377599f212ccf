#!/usr/bin/env bash
# Deletes everything Decap keeps in AWS, objects included (see README.md).
# Flags are passed on: --aws-region, names, endpoints, as for decap serve.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v decap >/dev/null 2>&1; then
    exec decap aws-resources delete "$@"
fi
exec cargo run --quiet --bin decap -- aws-resources delete "$@"
