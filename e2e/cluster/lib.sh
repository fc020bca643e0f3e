# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for the local test cluster scripts
# (build, up, down, images, smoke). Sourced, not executed.

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$CLUSTER_DIR/../.." && pwd)
CACHE="${CLUSTERED_CACHE:-$HOME/.cache/clustered}"
# Everything the running cluster writes lives under STATE (removed by down)
# and RUN (sockets, containerd/runc state, tmpfs-backed; removed by down).
STATE="${CLUSTERED_STATE:-/var/lib/clustered}"
RUN="${CLUSTERED_RUN:-/run/clustered}"

NODE_NAME=clustered-node
DUMMY_IF=clustered0
NODE_IP=10.201.0.1               # on DUMMY_IF: apiserver advertise address, node InternalIP
POD_CIDR=10.88.0.0/16
POD_GW=10.88.0.1
BRIDGE=cni0                      # node 1's; node i's is cni<i-1>
BRIDGES=cni+                     # every node's (iptables interface match)
CNI_NET=clustered
SVC_CIDR=10.96.0.0/16
API_SVC_IP=10.96.0.1
API_PORT=6443
ETCD_CLIENT_PORT=12379
ETCD_PEER_PORT=12380
CHAIN=CLUSTERED                  # prefix of our own iptables chains
METRICS_PORT=4443                # metrics-server, on NODE_IP
# Image registries (CNCF distribution), plain HTTP on NODE_IP only: one
# anonymous, one behind htpasswd basic auth (distribution's auth is
# registry-wide, hence a second instance) for the pull-secret path.
REGISTRY_PORT=5000
REGISTRY_AUTH_PORT=5001
REGISTRY="$NODE_IP:$REGISTRY_PORT"
REGISTRY_AUTH="$NODE_IP:$REGISTRY_AUTH_PORT"
REGISTRY_AUTH_CREDENTIALS="$STATE/registry-auth/credentials"   # "user:password"

# Simulated nodes (e2e/cluster/kwok): their pods' addresses are on lo, so
# nothing sent to them leaves this machine; the nodes' own address too.
KWOK_CIDR=127.64.0.0/16
KWOK_NODE_IP=127.63.0.1

KUBECONFIG_PATH="$STATE/admin.kubeconfig"
CONTAINERD_SOCK="$RUN/containerd/containerd.sock"   # node 1's
LOGS="$STATE/logs"
PIDS="$STATE/pids"

# Several real nodes on this machine, each with its own containerd and
# kubelet. Node 1 keeps the single-node names and paths above; node i > 1
# gets its own address on DUMMY_IF, pod CIDR and bridge, state dir,
# containerd socket and kubelet cgroup root (see node_vars).
MAX_NODES=6
ZONES=(a b c d e f)
# The node count `up` starts: $NODES, else the running cluster's, else 3.
wanted_nodes() {
	local n=${NODES:-}
	if [[ -z $n && -f $STATE/nodes ]]; then n=$(<"$STATE/nodes"); fi
	n=${n:-3}
	[[ $n =~ ^[1-9]$ ]] && ((n <= MAX_NODES)) || die "NODES=$n: pick 1 to $MAX_NODES"
	echo "$n"
}

# node_vars I: set the N_* variables of node I (1-based).
node_vars() {
	local i=$1
	N_IP=10.201.0.$i
	N_CIDR=10.88.$((i - 1)).0/24
	N_GW=10.88.$((i - 1)).1
	N_BRIDGE=cni$((i - 1))
	N_ZONE=${ZONES[i - 1]}
	if ((i == 1)); then
		N_NAME=$NODE_NAME N_SUFFIX="" N_DIR=$STATE N_RUN=$RUN N_CNI_NET=$CNI_NET N_CGROOT=/
	else
		N_NAME=$NODE_NAME-$i N_SUFFIX=-$i N_DIR=$STATE/node$i N_RUN=$RUN/node$i N_CNI_NET=$CNI_NET-$i
		# Its own kubepods tree: the kubelets must not manage each other's cgroups.
		N_CGROOT=/$NODE_NAME-$i
	fi
	N_SOCK=$N_RUN/containerd/containerd.sock
	N_CONTAINERD=containerd$N_SUFFIX
	N_KUBELET=kubelet$N_SUFFIX
}

# node_socks: the containerd sockets of the nodes that have one.
node_socks() {
	local i
	for ((i = 1; i <= MAX_NODES; i++)); do
		node_vars "$i"
		[[ -S $N_SOCK ]] && echo "$N_SOCK"
	done
	return 0
}

# Control-plane components in start order (each node adds its containerd
# and kubelet).
COMPONENTS=(etcd kube-apiserver registry registry-auth kube-controller-manager kube-scheduler kube-proxy metrics-server)

log() { printf '[%s %s] %s\n' "${0##*/}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# cluster_lock: serialize up/down (fd 9, released on exit). The lock file
# lives in the cache dir, which down keeps anyway.
cluster_lock() {
	mkdir -p "$CACHE"
	exec 9>"$CACHE/.cluster.lock"
	flock -w 900 9 || die "another up/down is running (lock $CACHE/.cluster.lock)"
}

# bin_dir: the cached binaries' dir, building them if needed.
bin_dir() { "$CLUSTER_DIR/build" | tail -n 1; }

# pid_of NAME: print the pid of a running component we started, or fail.
pid_of() {
	local f="$PIDS/$1.pid" pid exe p
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	exe=$(<"$PIDS/$1.exe")
	# Guard against pid reuse: the process must still be our binary.
	if ! [[ -n $pid && -d /proc/$pid ]] || ! grep -qa -- "$exe" "/proc/$pid/cmdline" 2>/dev/null; then
		# setsid(1) forks when it starts as a process group leader, and the
		# component then runs under the child's pid: adopt the process of
		# that binary whose stdout is this component's log.
		pid=
		for p in $(pgrep -f -- "$exe"); do
			[[ $(readlink "/proc/$p/fd/1" 2>/dev/null) == "$LOGS/$1.log" ]] && pid=$p && break
		done
		[[ -n $pid ]] || return 1
		echo "$pid" >"$f"
	fi
	echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

# stop NAME: SIGTERM a component we started, SIGKILL after 15s.
stop() {
	local pid i
	pid=$(pid_of "$1") || { rm -f "$PIDS/$1.pid"; return 0; }
	log "stopping $1 (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 150; i++)); do
		[[ -d /proc/$pid ]] || break
		sleep 0.1
	done
	if [[ -d /proc/$pid ]]; then
		log "$1 did not exit, killing"
		kill -KILL "$pid" 2>/dev/null || true
		sleep 0.5
	fi
	rm -f "$PIDS/$1.pid"
}

# start_bg NAME EXE ARGS...: run EXE in its own session, log to $LOGS/NAME.log.
start_bg() {
	local name=$1
	shift
	mkdir -p "$LOGS" "$PIDS"
	printf '\n==== %s starting %s\n' "$(date -Is)" "$name" >>"$LOGS/$name.log"
	# Daemons inherit no descriptor beyond stdio: fds 8/9 hold our build and
	# cluster locks, and a caller's `flock LOCK e2e/cluster/up` holds its
	# lock on fd 3; a daemon keeping either would hold it for ever.
	setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
	local pid=$! i
	printf '%s' "$1" >"$PIDS/$name.exe"
	echo "$pid" >"$PIDS/$name.pid"
	# Until the forked shell has exec'd, its cmdline is not yet the
	# component's and pid_of would call it dead: wait for the exec.
	for ((i = 0; i < 100; i++)); do
		grep -qa -- "$1" "/proc/$pid/cmdline" 2>/dev/null && return 0
		[[ -d /proc/$pid ]] || return 0
		sleep 0.05
	done
}

# fail_component NAME MSG: print the error and the tail of NAME's log, exit 1.
fail_component() {
	log "ERROR: component $1: $2"
	if [[ -f $LOGS/$1.log ]]; then
		echo "---- last 40 lines of $LOGS/$1.log ----" >&2
		tail -n 40 "$LOGS/$1.log" >&2
		echo "----" >&2
	fi
	exit 1
}

# wait_for NAME TIMEOUT_S CMD...: poll CMD until it succeeds; fail NAME if the
# process died or the timeout passed.
wait_for() {
	local name=$1 timeout=$2 start=$SECONDS
	shift 2
	until "$@" >/dev/null 2>&1; do
		if ! running "$name"; then
			fail_component "$name" "process exited during start-up"
		fi
		if ((SECONDS - start >= timeout)); then
			fail_component "$name" "not healthy after ${timeout}s (check: $*)"
		fi
		sleep 1
	done
}
