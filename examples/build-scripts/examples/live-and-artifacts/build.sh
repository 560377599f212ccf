#!/bin/sh
set -eu
green=$(printf '\033[32m')
reset=$(printf '\033[0m')
mkdir -p "${ARTIFACTS_DIR}/reports"
i=1
while [ "$i" -le "${STEPS}" ]; do
    echo "${green}step ${i} of ${STEPS}${reset}"
    echo "step ${i} passed" >> "${ARTIFACTS_DIR}/reports/steps.txt"
    sleep 1
    i=$((i + 1))
done
echo "stderr is captured too" >&2
date -u +%Y-%m-%dT%H:%M:%SZ > "${ARTIFACTS_DIR}/finished-at.txt"
