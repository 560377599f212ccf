#!/usr/bin/env bash
# The container engine of the test bed: Podman from Debian's packages,
# serving the Docker Engine API on a socket of this run, with images made
# without a registry (none is reachable from the test machines):
#
#   localhost/decap-debian:bookworm   a Debian minbase root filesystem made
#                                     by debootstrap, `podman import`ed
#   localhost/decap-redis:bookworm    FROM it, with redis-server (sidecar tests)
#   localhost/decap-build-base        build-container/Dockerfile FROM it (the
#                                     image the shipped examples name)
#   localhost/decap-presets:bookworm  FROM it, with pytest, Node.js and npm, Go
#                                     and Cargo (the language presets' tests)
#
# The first three are cached as archives under ~/.cache/decap/images, the
# presets image (about 1.8 GB) in Podman's storage only, so only the first
# run on a machine pays for debootstrap (~30 s), the Redis build (~20 s) and
# the presets image (~2.5 min).
#
#   tests/bed/podman.sh install   install Podman, runc, debootstrap; make the images
#   tests/bed/podman.sh start     start the API service; prints `export` lines
#                                 for DECAP_TEST_CONTAINER_SOCKET and the images;
#                                 as root, also a rootless Podman of the user
#                                 decap-rootless (DECAP_TEST_ROOTLESS_USER,
#                                 DECAP_TEST_ROOTLESS_RUNTIME_DIR)
#   tests/bed/podman.sh stop      stop the service
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=podman
. "$HERE/lib.sh"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/podman"
IMAGES="$CACHE/images"
SUITE=bookworm
BASE="localhost/decap-debian:$SUITE"
REDIS="localhost/decap-redis:$SUITE"
# The project's own base build image (build-container/), which the shipped
# examples name.
BUILD_BASE="localhost/decap-build-base:latest"
# The toolchains of three language presets, for builds of them in containers.
PRESETS="localhost/decap-presets:$SUITE"
CONF=/etc/containers/containers.conf
# Images of an older bed (a label on each) are made again.
BED_VERSION=2

current() {
    [ "$(podman image inspect --format '{{index .Labels "decap.bed"}}' "$1" 2>/dev/null)" = "$BED_VERSION" ]
}

packages() {
    local missing=()
    # catatonit (the init builds run under) and uidmap (rootless Podman) are
    # only recommended by Debian's podman: asked for by name.
    for tool in podman:podman runc:runc debootstrap:debootstrap catatonit:catatonit newuidmap:uidmap; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        say "needs ${missing[*]}: sudo apt-get install ${missing[*]}"
        exit 1
    fi
    say "installing ${missing[*]} from Debian's packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Podman 4.3 on these machines: runc refuses the default rlimits (above the
# hard limit), and crun refuses a hybrid cgroup hierarchy; runc with no
# default rlimits works.
configure() {
    [ "$(id -u)" = 0 ] || return 0
    if [ -f "$CONF" ]; then
        grep -q '^# decap test bed' "$CONF" \
            || say "$CONF exists: left as it is (Podman 4.3 here needs runtime = \"runc\" and default_ulimits = [])"
        return 0
    fi
    say "configuring $CONF (runc, no default rlimits)"
    mkdir -p "$(dirname "$CONF")"
    cat > "$CONF" <<'EOF'
# decap test bed: runc (crun refuses a hybrid cgroup hierarchy), and no
# default rlimits (runc refuses those above the hard limit).
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
}

# The Debian base image: debootstrap once, then an archive in the cache.
base_image() {
    current "$BASE" && return 0
    local archive="$IMAGES/debian-$SUITE-minbase-2.tar"
    if [ ! -f "$archive" ]; then
        say "making a Debian $SUITE root filesystem with debootstrap (once; cached in $IMAGES)"
        local root
        root=$(mktemp -d)
        if ! debootstrap --variant=minbase "$SUITE" "$root" http://deb.debian.org/debian > "$root.log" 2>&1; then
            tail -20 "$root.log" >&2
            say "debootstrap failed (its log: $root.log)"
            exit 1
        fi
        rm -f "$root.log"
        # Lists and caches are of no use in a base image. The root folder
        # is mktemp's (0700): as the image's `/`, it would lock out every
        # user but root (rootless Podman shows it as it is).
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        chmod 0755 "$root"
        mkdir -p "$IMAGES"
        tar -C "$root" -cf "$archive.partial" .
        mv "$archive.partial" "$archive"
        rm -rf "$root"
    fi
    podman import -q --change 'CMD ["/bin/bash"]' --change "LABEL decap.bed=$BED_VERSION" "$archive" "$BASE" >/dev/null
}

# An image FROM the Debian base, its Containerfile on standard input, made
# once and kept in Podman's storage; with ARCHIVE, also cached as an archive
# (loaded into a fresh storage): derived_image TAG [ARCHIVE].
derived_image() {
    local tag=$1 archive=${2:-}
    if current "$tag"; then
        cat >/dev/null
        return 0
    fi
    if [ -n "$archive" ] && [ -f "$archive" ]; then
        cat >/dev/null
        podman load -i "$archive" >/dev/null 2>&1
        return 0
    fi
    say "building $tag from $BASE (once; cached in $IMAGES)"
    local ctx
    ctx=$(mktemp -d)
    cat > "$ctx/Containerfile"
    podman build --network host -q -t "$tag" "$ctx" >/dev/null 2>"$ctx.log" \
        || { tail -20 "$ctx.log" >&2; say "building $tag failed"; exit 1; }
    rm -f "$ctx.log"
    rm -rf "$ctx"
    [ -n "$archive" ] || return 0
    mkdir -p "$IMAGES"
    podman save -o "$archive.partial" "$tag" >/dev/null 2>&1
    mv "$archive.partial" "$archive"
}

# A service image for sidecar tests: Redis from Debian's packages.
redis_image() {
    derived_image "$REDIS" "$IMAGES/decap-redis-$SUITE-2.tar" <<EOF
FROM $BASE
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
CMD ["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"]
EOF
}

# The language presets' image: Debian's pytest, Node.js with npm, Go and Cargo,
# for preset builds in containers (the presets' own images are in
# registries these machines cannot reach). 1.8 GB: kept in Podman's storage
# only, not archived as well.
presets_image() {
    derived_image "$PRESETS" <<EOF
FROM $BASE
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-pytest nodejs npm golang-go cargo ca-certificates \
 && rm -rf /var/lib/apt/lists/*
EOF
}

# build-container/Dockerfile, built from the Debian base image; cached by
# the Dockerfile's hash.
build_base_image() {
    local file="$HERE/../../build-container/Dockerfile" sum archive
    sum=$( (cat "$file"; echo "$BED_VERSION") | sha256sum | cut -c1-16)
    archive="$IMAGES/decap-build-base-$sum.tar"
    if podman image exists "$BUILD_BASE" \
        && [ "$(podman image inspect --format '{{index .Labels "decap.dockerfile"}}' "$BUILD_BASE" 2>/dev/null)" = "$sum" ]; then
        return 0
    fi
    if [ -f "$archive" ]; then
        podman load -i "$archive" >/dev/null 2>&1
        return 0
    fi
    say "building $BUILD_BASE from build-container/Dockerfile (once per change of it; cached in $IMAGES)"
    local log
    log=$(mktemp)
    podman build --network host --build-arg "BASE=$BASE" --label "decap.dockerfile=$sum" \
        -q -t "$BUILD_BASE" -f "$file" "$(dirname "$file")" >/dev/null 2>"$log" \
        || { tail -20 "$log" >&2; say "building $BUILD_BASE failed"; exit 1; }
    rm -f "$log"
    mkdir -p "$IMAGES"
    rm -f "$IMAGES"/decap-build-base-*.tar
    podman save -o "$archive.partial" "$BUILD_BASE" >/dev/null 2>&1
    mv "$archive.partial" "$archive"
}

install() {
    packages
    configure
    base_image
    redis_image
    build_base_image
    presets_image
}

# Rootless Podman beside the rootful one (as root only): a user of the
# bed's own with the images loaded into its storage, and its API service at
# the socket rootless clients look for ($XDG_RUNTIME_DIR/podman/podman.sock).
ROOTLESS_USER=decap-rootless

rootless_start() {
    [ "$(id -u)" = 0 ] || return 0
    command -v setpriv >/dev/null 2>&1 || return 0
    if ! id "$ROOTLESS_USER" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash "$ROOTLESS_USER"
    fi
    grep -q "^$ROOTLESS_USER:" /etc/subuid \
        || usermod --add-subuids 300000-365535 --add-subgids 300000-365535 "$ROOTLESS_USER"
    local uid gid home run
    uid=$(id -u "$ROOTLESS_USER")
    gid=$(id -g "$ROOTLESS_USER")
    home=$(getent passwd "$ROOTLESS_USER" | cut -d: -f6)
    # Its runtime folder must be its own and reachable: not under the bed's
    # folder (root's, 0700).
    run=$(mktemp -d /tmp/decap-rootless.XXXXXX)
    echo "$run" > "$STATE/rootless-dir"
    mkdir -p "$run/podman"
    chown -R "$uid:$gid" "$run"
    as_user() {
        setpriv --reuid="$uid" --regid="$gid" --init-groups \
            env -i HOME="$home" USER="$ROOTLESS_USER" XDG_RUNTIME_DIR="$run" PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
    }
    # Images from the root's cache, through standard input.
    if [ "$(as_user podman image inspect --format '{{index .Labels "decap.bed"}}' "$BASE" 2>/dev/null)" != "$BED_VERSION" ]; then
        as_user podman import -q --change 'CMD ["/bin/bash"]' --change "LABEL decap.bed=$BED_VERSION" - "$BASE" \
            < "$IMAGES/debian-$SUITE-minbase-2.tar" >/dev/null
    fi
    if [ "$(as_user podman image inspect --format '{{index .Labels "decap.bed"}}' "$REDIS" 2>/dev/null)" != "$BED_VERSION" ]; then
        as_user podman load -q < "$IMAGES/decap-redis-$SUITE-2.tar" >/dev/null 2>&1
    fi
    # Started directly (not through the function), so that its pid is
    # podman's own and stop reaches it.
    setpriv --reuid="$uid" --regid="$gid" --init-groups \
        env -i HOME="$home" USER="$ROOTLESS_USER" XDG_RUNTIME_DIR="$run" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        podman system service --time=0 "unix://$run/podman/podman.sock" > "$STATE/rootless.log" 2>&1 &
    echo $! > "$STATE/rootless-pid"
    for _ in $(seq 1 300); do
        if as_user curl -sf --unix-socket "$run/podman/podman.sock" http://d/_ping >/dev/null 2>&1; then
            printf 'export %s\n' "DECAP_TEST_ROOTLESS_USER=$ROOTLESS_USER" "DECAP_TEST_ROOTLESS_RUNTIME_DIR=$run"
            return 0
        fi
        sleep 0.1
    done
    say "rootless Podman did not start; its log:"
    cat "$STATE/rootless.log" >&2
}

rootless_stop() {
    if [ -f "$STATE/rootless-pid" ]; then
        kill "$(cat "$STATE/rootless-pid")" 2>/dev/null || true
        rm -f "$STATE/rootless-pid"
    fi
    if [ -f "$STATE/rootless-dir" ]; then
        rm -rf "$(cat "$STATE/rootless-dir")"
        rm -f "$STATE/rootless-dir"
    fi
}

start() {
    install
    rm -rf "$STATE"
    mkdir -p "$STATE"
    local socket="$STATE/podman.sock"
    podman system service --time=0 "unix://$socket" > "$STATE/podman.log" 2>&1 &
    echo $! > "$STATE/pid"
    wait_ready "curl -sf --unix-socket '$socket' http://d/_ping" \
        "DECAP_TEST_CONTAINER_SOCKET=$socket" \
        "DECAP_TEST_BUILD_IMAGE=$BASE" \
        "DECAP_TEST_REDIS_IMAGE=$REDIS" \
        "DECAP_TEST_PRESETS_IMAGE=$PRESETS" \
        "DECAP_TEST_BUILD_BASE_IMAGE=$BUILD_BASE"
    rootless_start
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop; rootless_stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
