# Shared by the test-bed scripts: sourced, not run.
# Each script sets NAME (for messages) and STATE (its state folder) first.

CACHE="${DECAP_CACHE:-$HOME/.cache/decap}"

say() { echo "tests/bed/$NAME.sh: $*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# mvn_fetch POM LIB: copies a pom's runtime dependencies from Maven Central into LIB, once.
mvn_fetch() {
    local pom=$1 lib=$2
    if [ -f "$lib/.complete" ]; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || { say "Maven is needed to fetch it"; exit 1; }
    say "fetching it from Maven Central (once; cached in $CACHE)"
    rm -rf "$lib"
    mvn -q -B -f "$pom" -Dmaven.repo.local="$CACHE/m2" \
        dependency:copy-dependencies -DoutputDirectory="$lib" -DincludeScope=runtime >&2
    touch "$lib/.complete"
}

# go_install WHAT MODULE@VERSION COMMAND BIN: builds COMMAND (the last part
# of the module path) with `go install` into BIN, once; the module cache and
# build cache stay in the cache folder.
go_install() {
    local what=$1 module=$2 command=$3 bin=$4
    if [ -x "$bin" ]; then
        return 0
    fi
    command -v go >/dev/null 2>&1 || { say "Go is needed to build $what"; exit 1; }
    say "building $what ($module, once; cached in $CACHE)"
    local gobin
    gobin=$(mktemp -d)
    GOBIN="$gobin" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS="-buildvcs=false" \
        nice -n 10 go install "$module"
    mkdir -p "$(dirname "$bin")"
    mv "$gobin/$command" "$bin"
    rmdir "$gobin"
}

# The Kubernetes release the bed's API server and node are built at.
K8S_VERSION="v1.34.4"
K8S_STAGING_VERSION="v0.34.4"

k8s_goenv() {
    env GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS="-buildvcs=false" GOTOOLCHAIN=local "$@"
}

# k8s_build COMMAND BIN: builds k8s.io/kubernetes/cmd/COMMAND at
# $K8S_VERSION into BIN, once. k8s.io/kubernetes cannot be `go install`ed:
# its go.mod replaces each staging module with a folder of its own tree. A
# wrapper module replaces each with its published release instead.
k8s_build() {
    local command=$1 bin=$2
    if [ -x "$bin" ]; then
        return 0
    fi
    command -v go >/dev/null 2>&1 || { say "Go is needed to build $command"; exit 1; }
    say "building $command $K8S_VERSION (once; cached in $CACHE)"
    local dir gomod
    dir=$(mktemp -d)
    gomod=$(k8s_goenv go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
        echo "module decap.test/$command"
        grep -E '^(go|godebug) ' "$gomod"
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo "tool k8s.io/kubernetes/cmd/$command"
        # "k8s.io/api => ./staging/src/k8s.io/api" becomes "k8s.io/api => k8s.io/api v0.N.P"
        sed -n '/^replace (/,/^)/p' "$gomod" | grep -E '=> \./staging/' |
            awk -v v="$K8S_STAGING_VERSION" '{ print "replace " $1 " => " $1 " " v }'
    } > "$dir/go.mod"
    (
        cd "$dir"
        k8s_goenv go mod tidy >&2
        CGO_ENABLED=0 k8s_goenv nice -n 10 go build -trimpath \
            -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34" \
            -o "$command" "k8s.io/kubernetes/cmd/$command"
    )
    mkdir -p "$(dirname "$bin")"
    mv "$dir/$command" "$bin"
    rm -rf "$dir"
}

# wait_ready "CHECK COMMAND" EXPORTS...: waits up to 30 s for the server
# started with its pid in $STATE/pid to pass the check, then prints the
# export lines; shows the server's log and fails otherwise.
wait_ready() {
    local check=$1
    shift
    for _ in $(seq 1 300); do
        if eval "$check" >/dev/null 2>&1; then
            printf 'export %s\n' "$@"
            return 0
        fi
        if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
            say "it exited; its log:"
            cat "$STATE"/*.log >&2
            exit 1
        fi
        sleep 0.1
    done
    say "it did not become ready within 30 s; its log:"
    cat "$STATE"/*.log >&2
    stop
    exit 1
}

stop() {
    if [ -f "$STATE/pid" ]; then
        kill "$(cat "$STATE/pid")" 2>/dev/null || true
        rm -f "$STATE/pid"
    fi
}

# dispatch "$@": runs install, start or stop.
dispatch() {
    case "${1:-}" in
        install) install ;;
        start) start ;;
        stop) stop ;;
        *) echo "usage: tests/bed/$NAME.sh install|start|stop" >&2; exit 2 ;;
    esac
}
