#!/bin/sh
# Builds a real git repository: clones the branch asked for (and the commit,
# when the build names one), runs the repository's own tests and keeps what
# it made as an artifact.
#
# The repository ships beside this script as a git bundle
# (greeter.bundle: branches main, feature/shout and feature/typo), so the
# example works offline and in the sandbox, which sees no host folder. A
# project of yours clones from its own remote instead:
#
#     git clone --branch "$BRANCH_TO_BUILD" https://github.com/you/yours.git repo
set -eu
git clone --quiet --branch "${BRANCH_TO_BUILD}" "${DECAP_BUILD_SCRIPTS}/greeter.bundle" repo
cd repo
if [ -n "${COMMIT_SHA:-}" ]; then
    git -c advice.detachedHead=false checkout --quiet "${COMMIT_SHA}"
fi
echo "building ${BRANCH_TO_BUILD} at $(git log -1 --format='%h: %s')"
sh ./test.sh
cp greet.sh "${ARTIFACTS_DIR}/"
echo "the greeter says: $(sh ./greet.sh Decap)"
