#!/bin/sh
# Stage "build": what it leaves in $ARTIFACTS_DIR is the input of the
# stages that need it.
set -eu
echo "stage ${DECAP_STAGE}, attempt ${DECAP_ATTEMPT}, run ${DECAP_PIPELINE_RUN_ID}"
echo "app of ${BRANCH_TO_BUILD} at ${COMMIT_SHA:-an unknown commit}" > "${ARTIFACTS_DIR}/app.txt"
echo "built app.txt"
