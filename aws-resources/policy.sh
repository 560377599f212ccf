#!/usr/bin/env bash
# Prints the IAM policy of least privilege for Decap's resources (see README.md).
# Flags are passed on: --aws-region, names, endpoints, as for decap serve.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v decap >/dev/null 2>&1; then
    exec decap aws-resources policy "$@"
fi
exec cargo run --quiet --bin decap -- aws-resources policy "$@"
