#!/bin/sh
# Stage "deploy": runs only for main or master, once someone presses
# Promote on the project's page (or `decapctl pipeline approve RUN deploy`);
# the lock "production" lets one deploy run at a time, whatever the branch.
set -eu
echo "deploying: $(cat "${DECAP_INPUTS}/build/app.txt")"
echo "$(cat "${DECAP_INPUTS}/test/report.txt")"
echo "deployed"
