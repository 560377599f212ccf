#!/bin/sh
# Stage "test": gets build's artifacts under $DECAP_INPUTS/build/.
set -eu
echo "stage ${DECAP_STAGE}, attempt ${DECAP_ATTEMPT}"
echo "testing: $(cat "${DECAP_INPUTS}/build/app.txt")"
grep -q "^app of " "${DECAP_INPUTS}/build/app.txt"
echo "tests passed" | tee "${ARTIFACTS_DIR}/report.txt"
