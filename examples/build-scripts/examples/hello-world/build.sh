#!/bin/sh
# Every build sees these variables; the README (Build scripts) lists them all.
set -eu
echo "hello from build ${BUILD_ID}"
echo "project:  ${PROJECT_KEY}"
echo "branch:   ${BRANCH_TO_BUILD}"
echo "lock key: ${BUILD_LOCK_KEY}"
echo "commit:   ${COMMIT_SHA:-unknown}"
echo "built ${PROJECT_KEY} at ${BRANCH_TO_BUILD}" > "${ARTIFACTS_DIR}/summary.txt"
echo "done"
