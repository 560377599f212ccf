#!/usr/bin/env bash
# A real Kubernetes node for the test bed's API server: kubelet (built from
# the Go module proxy at the API server's version and cached outside the
# checkout), containerd and runc and the CNI plugins from Debian's packages,
# images imported from Podman (no registry is reached).
#
#   tests/bed/node.sh install   build kubelet unless cached, install containerd,
#                               runc and the CNI plugins, make the pause image
#   tests/bed/node.sh start     needs the kube bed started (DECAP_TEST_KUBECONFIG)
#                               and Podman's base image; starts containerd and a
#                               kubelet, waits for its Node to be Ready; prints
#                               `export` lines for DECAP_TEST_REAL_NODE (the
#                               Node's name) and DECAP_TEST_NODE_IMAGE (an image
#                               the node has)
#   tests/bed/node.sh cluster   after start: the rest of a cluster for the
#                               node (kube-scheduler, kube-controller-manager,
#                               kube-proxy in iptables mode); prints `export`
#                               lines for KUBECTL and DECAP_TEST_NODE_IP. Kept
#                               apart from start: the other tests' stand-in
#                               nodes bind their pods themselves, and a
#                               scheduler would race them.
#   tests/bed/node.sh image DIR builds Decap's controller image from
#                               deploy/Dockerfile with the binaries in DIR
#                               (decap, bctool, decapctl) and imports it and
#                               the base build image into the node; prints
#                               `export` lines for DECAP_TEST_DECAP_IMAGE (and
#                               DECAP_TEST_DECAP_NEXT_IMAGE, the same image
#                               under another tag, for a rolling update) and
#                               DECAP_TEST_NODE_BUILD_IMAGE
#   tests/bed/node.sh stop      stops all and undoes what they changed
#
# Needs root. Settings that this kind of machine needs are explained where
# they are set.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NAME=node
. "$HERE/lib.sh"
KUBELET="$CACHE/bin/kubelet-$K8S_VERSION"
SCHEDULER="$CACHE/bin/kube-scheduler-$K8S_VERSION"
CONTROLLER_MANAGER="$CACHE/bin/kube-controller-manager-$K8S_VERSION"
PROXY="$CACHE/bin/kube-proxy-$K8S_VERSION"
KUBECTL="$CACHE/bin/kubectl-$K8S_VERSION"
DECAP_IMAGE="localhost/decap:test"
# The base build image under a tag that is not `latest` (which the kubelet
# would try to pull).
BUILD_IMAGE="localhost/decap-build-base:node"
PAUSE_IMAGE="localhost/decap-pause:1"
NODE_IMAGE="localhost/decap-debian:bookworm"
STATE="${DECAP_TEST_BED_DIR:-$CACHE/run}/node"

install_kubelet() {
    k8s_build kubelet "$KUBELET"
    k8s_build kube-scheduler "$SCHEDULER"
    k8s_build kube-controller-manager "$CONTROLLER_MANAGER"
    k8s_build kube-proxy "$PROXY"
    k8s_build kubectl "$KUBECTL"
}

install_packages() {
    local missing=()
    command -v containerd >/dev/null 2>&1 || missing+=(containerd)
    command -v runc >/dev/null 2>&1 || missing+=(runc)
    [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]} from Debian's packages"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Installing containerd starts its service on some systems: the bed runs
    # its own, with its own folders.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd 2>/dev/null; then
        systemctl stop containerd || true
    fi
}

# The pod sandbox's image: a static program that waits for a signal and
# reaps what is reparented to it, as Kubernetes' pause does.
install_pause() {
    if podman image exists "$PAUSE_IMAGE" 2>/dev/null; then
        return 0
    fi
    say "making the pause image $PAUSE_IMAGE"
    local dir
    dir=$(mktemp -d)
    cat > "$dir/pause.c" <<'C'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void done(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, done);
    signal(SIGTERM, done);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
C
    gcc -static -Os -o "$dir/pause" "$dir/pause.c"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' > "$dir/Containerfile"
    podman build -q -t "$PAUSE_IMAGE" -f "$dir/Containerfile" "$dir" >/dev/null
    rm -rf "$dir"
}

install() {
    [ "$(id -u)" = 0 ] || { say "a real node needs root"; exit 1; }
    install_packages
    install_kubelet
    install_pause
}

# The run's containerd configuration: Debian's defaults with its folders
# under the run, the pause image imported here, no systemd cgroups, and
# `restrict_oom_score_adj`: root here lacks CAP_SYS_RESOURCE, and runc's
# attempt to set the sandbox's oom_score_adj to -998 fails every pod
# ("can't get final child's PID from pipe") without it.
containerd_config() {
    containerd config default | python3 -c '
import re, sys
state, pause = sys.argv[1], sys.argv[2]
c = sys.stdin.read()
def set_key(c, key, value):
    new, n = re.subn(r"(?m)^(\s*)" + re.escape(key) + r" = .*$", lambda m: m.group(1) + key + " = " + value, c)
    if n == 0:
        sys.exit("containerd config: no " + key)
    return new
c = set_key(c, "root", "\"%s/containerd/root\"" % state)
c = set_key(c, "state", "\"%s/containerd/state\"" % state)
c = re.sub(r"(?m)^(\[grpc\]\n(?:.*\n)*?\s*)address = .*$", lambda m: m.group(1) + "address = \"%s/containerd.sock\"" % state, c, count=1)
c = set_key(c, "sandbox_image", "\"%s\"" % pause)
c = set_key(c, "restrict_oom_score_adj", "true")
c = set_key(c, "SystemdCgroup", "false")
c = set_key(c, "bin_dir", "\"/usr/lib/cni\"")
c = set_key(c, "conf_dir", "\"%s/cni\"" % state)
c = set_key(c, "snapshotter", "\"overlayfs\"")
c = re.sub(r"(?m)^(\s*)Root = \"\"$", lambda m: m.group(1) + "Root = \"%s/runc\"" % state, c)
print(c)
' "$STATE" "$PAUSE_IMAGE"
}

# import_images IMAGE...: copies images from Podman into containerd's
# k8s.io namespace (no registry is reached).
import_images() {
    local img
    for img in "$@"; do
        podman save -q "$img" -o "$STATE/images/x.tar"
        ctr -a "$STATE/containerd.sock" -n k8s.io images import --no-unpack "$STATE/images/x.tar" >/dev/null
        rm -f "$STATE/images/x.tar"
    done
}

kube_curl() {
    local kc=$DECAP_TEST_KUBECONFIG pki
    pki=$(dirname "$kc")/pki
    curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$DECAP_TEST_KUBE_SERVER$1"
}

# What the kubelet changes on the host that outlives it, saved to be put back.
SYSCTLS="vm/overcommit_memory kernel/panic kernel/panic_on_oops"

start() {
    install
    : "${DECAP_TEST_KUBECONFIG:?start the kube bed first (tests/bed/kube.sh start)}"
    : "${DECAP_TEST_KUBE_SERVER:?start the kube bed first}"
    podman image exists "$NODE_IMAGE" || { say "$NODE_IMAGE is missing: run tests/bed/podman.sh install"; exit 1; }
    rm -rf "$STATE"
    mkdir -p "$STATE/cni" "$STATE/cni-data" "$STATE/kubelet" "$STATE/pods" "$STATE/images"
    local s
    for s in $SYSCTLS; do
        echo "$s $(cat /proc/sys/$s)" >> "$STATE/sysctls"
    done
    containerd_config > "$STATE/containerd.toml"
    local node ip
    node=$(hostname)
    ip=$(hostname -I | awk '{print $1}')
    # A bridge of the bed's own, no iptables rules (ipMasq off): pods reach
    # the node and each other, which is all the tests need.
    cat > "$STATE/cni/10-decap-test.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "decap-test",
  "plugins": [
    {"type": "bridge", "bridge": "decaptest0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$STATE/cni-data", "ranges": [[{"subnet": "10.244.0.0/24"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
JSON
    containerd --config "$STATE/containerd.toml" > "$STATE/containerd.log" 2>&1 &
    echo $! > "$STATE/containerd.pid"
    for _ in $(seq 1 100); do
        [ -S "$STATE/containerd.sock" ] && break
        sleep 0.1
    done
    import_images "$PAUSE_IMAGE" "$NODE_IMAGE"
    cat > "$STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: true
failSwapOn: false
failCgroupV1: false
address: 127.0.0.1
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
containerRuntimeEndpoint: unix://$STATE/containerd.sock
imageServiceEndpoint: unix://$STATE/containerd.sock
podLogsDir: $STATE/pods
makeIPTablesUtilChains: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
YAML
    # The API server reaches the kubelet at hostname:10250 (the hostname
    # maps to loopback in /etc/hosts), where it listens; --node-ip cannot
    # be a loopback address, and with no address `kubectl logs` fails.
    "$KUBELET" --config "$STATE/kubelet.yaml" --kubeconfig "$DECAP_TEST_KUBECONFIG" \
        --root-dir "$STATE/kubelet" --cert-dir "$STATE/kubelet/pki" \
        --hostname-override "$node" --node-ip "$ip" \
        > "$STATE/kubelet.log" 2>&1 &
    echo $! > "$STATE/pid"
    wait_ready "kube_curl /api/v1/nodes/$node | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c[\"type\"]==\"Ready\" and c[\"status\"]==\"True\" for c in n[\"status\"][\"conditions\"]) else 1)'" \
        "DECAP_TEST_REAL_NODE=$node" \
        "DECAP_TEST_NODE_IMAGE=$NODE_IMAGE"
}

# The rest of a cluster, all with the admin's credentials (a test bed):
# pods of Deployments are made and scheduled, Services reach their pods
# (the API server's own too, from pods), namespaces are emptied when
# deleted. kube-proxy's masquerading of all Service traffic lets a pod
# reach a Service whose endpoint is on its own bridge without the
# br_netfilter module.
cluster() {
    [ -f "$STATE/pid" ] || { say "start the node first"; exit 1; }
    local kc=$DECAP_TEST_KUBECONFIG pki node ip
    pki=$(dirname "$kc")/pki
    node=$(hostname)
    ip=$(hostname -I | awk '{print $1}')
    "$SCHEDULER" --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
        --leader-elect=false --secure-port 0 > "$STATE/kube-scheduler.log" 2>&1 &
    echo $! > "$STATE/scheduler.pid"
    "$CONTROLLER_MANAGER" --kubeconfig "$kc" --leader-elect=false --secure-port 0 \
        --root-ca-file "$pki/ca.crt" --service-account-private-key-file "$pki/sa.key" \
        --use-service-account-credentials=false --controllers '*,-nodeipam,-cloud-node-lifecycle' \
        > "$STATE/kube-controller-manager.log" 2>&1 &
    echo $! > "$STATE/controller-manager.pid"
    echo "net/ipv4/conf/all/route_localnet $(cat /proc/sys/net/ipv4/conf/all/route_localnet)" >> "$STATE/sysctls"
    "$PROXY" --kubeconfig "$kc" --hostname-override "$node" --proxy-mode iptables --masquerade-all \
        --cluster-cidr 10.244.0.0/24 --conntrack-max-per-core 0 --iptables-localhost-nodeports=false \
        --nodeport-addresses primary \
        --healthz-bind-address "127.0.0.1:$(free_port)" --metrics-bind-address "127.0.0.1:$(free_port)" \
        > "$STATE/kube-proxy.log" 2>&1 &
    echo $! > "$STATE/proxy.pid"
    # Ready once the API server's own Service is forwarded.
    for _ in $(seq 1 300); do
        if iptables -t nat -S KUBE-SERVICES 2>/dev/null | grep -q 10.0.0.1/32; then
            printf 'export %s\n' "KUBECTL=$KUBECTL" "DECAP_TEST_NODE_IP=$ip"
            return 0
        fi
        sleep 0.1
    done
    say "kube-proxy did not forward the kubernetes Service in 30 s"
    tail -n 30 "$STATE/kube-proxy.log" >&2
    exit 1
}

# Decap's controller image as a user builds it, with binaries made here
# instead of by the Rust image's compiler (no registry is reached): the
# runtime is the debootstrap base (Debian bookworm, so the host's glibc
# binaries run in it); stripped, as a release's would be.
image() {
    local bins=${1:?usage: node.sh image DIR}
    [ -S "$STATE/containerd.sock" ] || { say "start the node first"; exit 1; }
    local ctx
    ctx=$(mktemp -d)
    mkdir "$ctx/dist"
    local b
    for b in decap bctool decapctl; do
        strip -o "$ctx/dist/$b" "$bins/$b"
    done
    podman build -q --network host -f "$HERE/../../deploy/Dockerfile" \
        --build-arg BINARIES=prebuilt --build-arg BASE="$NODE_IMAGE" \
        --build-arg DECAP_GIT_COMMIT="$(git -C "$HERE" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
        -t "$DECAP_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
    podman tag localhost/decap-build-base:latest "$BUILD_IMAGE"
    import_images "$DECAP_IMAGE" "$BUILD_IMAGE"
    # The same image under a second name: what a rolling update changes
    # the Deployment to.
    ctr -a "$STATE/containerd.sock" -n k8s.io images tag --force "$DECAP_IMAGE" "$DECAP_IMAGE-next" >/dev/null
    printf 'export %s\n' "DECAP_TEST_DECAP_IMAGE=$DECAP_IMAGE" "DECAP_TEST_DECAP_NEXT_IMAGE=$DECAP_IMAGE-next" \
        "DECAP_TEST_NODE_BUILD_IMAGE=$BUILD_IMAGE"
}

stop() {
    [ -d "$STATE" ] || return 0
    local f
    for f in "$STATE/proxy.pid" "$STATE/controller-manager.pid" "$STATE/scheduler.pid"; do
        if [ -f "$f" ]; then
            kill "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        fi
    done
    if [ -f "$STATE/kube-proxy.log" ]; then
        "$PROXY" --cleanup > /dev/null 2>&1 || true
    fi
    for f in "$STATE/pid" "$STATE/containerd.pid"; do
        if [ -f "$f" ]; then
            kill "$(cat "$f")" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "$(cat "$f")" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        fi
    done
    # The pods' containers: their shims outlive containerd.
    if [ -d "$STATE/runc" ]; then
        local ns id
        for ns in "$STATE"/runc/*; do
            [ -d "$ns" ] || continue
            for id in $(runc --root "$ns" list -q 2>/dev/null); do
                runc --root "$ns" kill "$id" KILL 2>/dev/null || true
                runc --root "$ns" delete -f "$id" 2>/dev/null || true
            done
        done
    fi
    pkill -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $STATE/containerd.sock" 2>/dev/null || true
    # Mounts under the run's folder (the kubelet binds its root onto itself;
    # pods' volumes, sandboxes' shm, overlay snapshots), deepest first.
    grep -o " $STATE[^ ]*" /proc/self/mountinfo | sort -r | uniq | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    if [ -f "$STATE/sysctls" ]; then
        while read -r name value; do
            echo "$value" > "/proc/sys/$name" || true
        done < "$STATE/sysctls"
    fi
    ip link del decaptest0 2>/dev/null || true
    find /sys/fs/cgroup/*/kubepods -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rm -f /var/lib/kubelet/device-plugins/kubelet.sock
    # Links to the pods' logs, and the folders kubelet, containerd and the
    # CNI plugins make at fixed paths: removed when left empty.
    find /var/log/containers -maxdepth 1 -type l -lname "$STATE/*" -delete 2>/dev/null || true
    find /var/lib/cni/results -maxdepth 1 -name 'decap-test-*' -delete 2>/dev/null || true
    local d
    for d in /run/containerd/s /run/containerd/fifo /run/containerd/runc /run/containerd \
        /var/lib/cni/results /var/lib/cni/networks /var/lib/cni /var/lib/kubelet/device-plugins \
        /var/lib/kubelet /var/log/containers /var/log/pods; do
        rmdir "$d" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

case "${1:-}" in
    cluster) cluster ;;
    image) shift; image "$@" ;;
    *) dispatch "$@" ;;
esac
