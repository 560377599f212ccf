#!/usr/bin/env bash
# The Kubernetes API of the test bed: a real etcd and kube-apiserver, built
# from the Go module proxy at pinned versions and cached outside the checkout,
# with certificates made by openssl for this run.
#
#   tests/bed/kube.sh install   build both unless cached (~8 min cold, 1.8 GB of RAM)
#   tests/bed/kube.sh start     start both on loopback; prints `export` lines for
#                               DECAP_TEST_KUBECONFIG (a system:masters client
#                               certificate) and DECAP_TEST_KUBE_SERVER
#   tests/bed/kube.sh stop
#
# No scheduler, controller manager or kubelet runs here: most tests run their
# own test node (`decap-test-node`), which binds pods to itself and runs
# them; tests/bed/node.sh adds a real node, and then the rest of a cluster.
# The API server listens on every address and advertises the machine's
# first one, so that pods on the real node reach it through the
# `kubernetes` Service (10.0.0.1); clients here use loopback.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=kube
. "$HERE/lib.sh"
ETCD_VERSION="v3.6.16"
APISERVER="$CACHE/bin/kube-apiserver-$K8S_VERSION"
ETCD="$CACHE/bin/etcd-$ETCD_VERSION"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/kube"

install_etcd() {
    if [ -x "$ETCD" ]; then
        return 0
    fi
    say "building etcd $ETCD_VERSION (once; cached in $CACHE)"
    local dir
    dir=$(mktemp -d)
    (
        cd "$dir"
        k8s_goenv go mod init decap.test/etcd >/dev/null 2>&1
        k8s_goenv go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
        CGO_ENABLED=0 k8s_goenv nice -n 10 go build -trimpath -o etcd go.etcd.io/etcd/server/v3
    )
    mkdir -p "$(dirname "$ETCD")"
    mv "$dir/etcd" "$ETCD"
    rm -rf "$dir"
}

install_apiserver() {
    k8s_build kube-apiserver "$APISERVER"
}

install() {
    command -v go >/dev/null 2>&1 || { say "Go is needed to build etcd and kube-apiserver"; exit 1; }
    command -v openssl >/dev/null 2>&1 || { say "openssl is needed for the test certificates"; exit 1; }
    install_etcd
    install_apiserver
}

certs() {
    local d=$1
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=decap-test-ca" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    # X.509 v3 certificates (rustls refuses v1): extensions are always given.
    cert() { # cert NAME SUBJECT USAGE [SAN]
        openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
        {
            echo "basicConstraints=critical,CA:FALSE"
            echo "keyUsage=critical,digitalSignature,keyEncipherment"
            echo "extendedKeyUsage=$3"
            if [ -n "${4:-}" ]; then echo "subjectAltName=$4"; fi
        } > "$d/$1.ext"
        openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
            -days 2 -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
    }
    cert apiserver "/CN=kube-apiserver" serverAuth "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc,IP:$2"
    cert admin "/O=system:masters/CN=decap-test-admin" clientAuth
    openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

start() {
    install
    rm -rf "$STATE"
    mkdir -p "$STATE/etcd" "$STATE/pki"
    local ip
    ip=$(hostname -I | awk '{print $1}')
    certs "$STATE/pki" "$ip"
    local etcd_port peer_port port
    etcd_port=$(free_port)
    peer_port=$(free_port)
    port="${DECAP_TEST_KUBE_PORT:-$(free_port)}"
    "$ETCD" --data-dir "$STATE/etcd/data" --name decap-test \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "decap-test=http://127.0.0.1:$peer_port" --unsafe-no-fsync \
        --log-level warn > "$STATE/etcd.log" 2>&1 &
    echo $! > "$STATE/etcd.pid"
    local pki="$STATE/pki"
    "$APISERVER" --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 0.0.0.0 --advertise-address "$ip" --secure-port "$port" \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --client-ca-file "$pki/ca.crt" \
        --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
        --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
        --service-cluster-ip-range 10.0.0.0/24 --authorization-mode Node,RBAC \
        --enable-priority-and-fairness=false --profiling=false \
        --cert-dir "$STATE/pki" > "$STATE/kube-apiserver.log" 2>&1 &
    echo $! > "$STATE/pid"
    cat > "$STATE/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: decap-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority: $pki/ca.crt
users:
- name: decap-test-admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: decap-test
  context: {cluster: decap-test, user: decap-test-admin}
current-context: decap-test
EOF
    wait_ready "curl -fsS --cacert $pki/ca.crt --cert $pki/admin.crt --key $pki/admin.key https://127.0.0.1:$port/readyz" \
        "DECAP_TEST_KUBECONFIG=$STATE/admin.kubeconfig" \
        "DECAP_TEST_KUBE_SERVER=https://127.0.0.1:$port"
}

stop() {
    local f
    # The API server first (it drains for a few seconds), then etcd; each
    # waited for, and killed if it lingers, so that nothing of the run
    # outlives its stop.
    for f in "$STATE/pid" "$STATE/etcd.pid"; do
        if [ -f "$f" ]; then
            kill "$(cat "$f")" 2>/dev/null || true
            for _ in $(seq 1 100); do
                kill -0 "$(cat "$f")" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        fi
    done
}

dispatch "$@"
