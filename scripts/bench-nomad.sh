#!/usr/bin/env bash
# Compares this driver with Nomad's built-in qemu driver in one real Nomad agent, and prints
# one table with the ratio per row.
#
# The agent (server and client on 127.0.0.1, free ports, a temporary directory) loads both
# drivers: this plugin copied as plugin_dir/nomad-driver-qemu-qmp, so it reports `qemu-qmp`,
# and the built-in `qemu`. benches/nomad/side_by_side.py submits the same jobs to each
# (TCG guests from fixtures/guest/ as qcow2 overlays, at most two booting at once) and
# measures helper processes and memory per VM, driver-side CPU with 1 s allocation metrics,
# and the times of start, graceful stop, stop of a guest that ignores the power button and
# QEMU killed from outside, alternating the drivers run by run. After the agent stops,
# benches/nomad/scale.rs measures one plugin managing 10, 100 and 1000 QMP test doubles
# (examples/qmp_double.rs) over its gRPC socket, and benches/qmp_roundtrip.rs the QMP round
# trip. An EXIT trap removes everything it started.
#
# Usage: scripts/bench-nomad.sh [--quick] [--out FILE]
#   --quick     a smoke run: 2 timing runs, 1 and 4 VMs, a 10 s CPU window, up to 100 doubles
#   --out FILE  also write the table to FILE
#
# A full run takes about 20 minutes on 2 cores and needs about 5 GiB of free memory.

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly repo
readonly plugin_file="nomad-driver-qemu-qmp"

quick=0
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick) quick=1 ;;
    --out)
        [[ $# -ge 2 ]] || {
            echo "bench-nomad.sh: --out needs a file name" >&2
            exit 2
        }
        out="$2"
        shift
        ;;
    *)
        echo "bench-nomad.sh: unknown argument '$1' (expected --quick or --out FILE)" >&2
        exit 2
        ;;
    esac
    shift
done

if [[ $quick -eq 1 ]]; then
    runs=2 counts="1,4" cpu_window=10 scale_counts="10,100" scale_window=5
else
    runs=5 counts="1,10,20" cpu_window=60 scale_counts="10,100,1000" scale_window=20
fi

step() { printf '\n==> %s\n' "$*" >&2; }
fail() {
    echo "bench-nomad.sh: $*" >&2
    exit 1
}

command -v python3 >/dev/null || fail "python3 is missing; run 'apt-get install python3'"
command -v qemu-img >/dev/null || fail "qemu-img is missing; run 'apt-get install qemu-utils'"
command -v qemu-system-x86_64 >/dev/null ||
    fail "qemu-system-x86_64 is missing; run 'apt-get install qemu-system-x86'"
for guest in guest.qcow2 guest-ignore.qcow2; do
    [[ -f "$repo/fixtures/guest/$guest" ]] ||
        fail "test guest fixtures/guest/$guest not found; run fixtures/build-guests.sh"
done
nomad="$("$repo/scripts/install-nomad.sh" | tail -n 1)"

step "cargo build --release (plugin, QMP double, scale benchmark)"
(cd "$repo" && cargo build --release --bin nomad-driver-qemu --example qmp_double --example nomad_scale)
plugin="$repo/target/release/nomad-driver-qemu"

work="$(mktemp -d -t nomad-bench-XXXXXX)"
agent_pid=""
addr=""

# Prints the ids of the processes whose command line contains the work dir. Everything the
# agent started (plugins, executors, logmon, QEMU) has it there, even after re-parenting.
pids_in_work_dir() {
    local file pid
    for file in /proc/[0-9]*/cmdline; do
        pid="${file#/proc/}"
        pid="${pid%/cmdline}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        if tr '\0' ' ' 2>/dev/null <"$file" | grep -q -F -- "$work"; then
            echo "$pid"
        fi
    done
}

stop_agent() {
    [[ -n "$agent_pid" ]] || return 0
    if kill -0 "$agent_pid" 2>/dev/null; then
        kill -INT "$agent_pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$agent_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$agent_pid" 2>/dev/null || true
    fi
    agent_pid=""
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "$agent_pid" ]] && kill -0 "$agent_pid" 2>/dev/null; then
        # A Nomad client leaves its tasks running when it exits, so stop every job first.
        local job
        for job in $(NOMAD_ADDR="$addr" "$nomad" job status -short 2>/dev/null | awk 'NR > 1 { print $1 }'); do
            NOMAD_ADDR="$addr" "$nomad" job stop -purge -detach "$job" >/dev/null 2>&1 || true
        done
        sleep 2
    fi
    stop_agent
    local pid
    for pid in $(pids_in_work_dir); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # The Nomad client mounts a tmpfs per task that it removes only at garbage collection.
    grep -o -- "$work[^ ]*" /proc/self/mounts | sort -r | xargs -r -n 1 umount --lazy || true
    rm -rf -- "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r http_port rpc_port serf_port < <(python3 -c '
import socket
ports = []
sockets = []
while len(ports) < 3:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
    ports.append(s.getsockname()[1])
print(*ports)
')
addr="http://127.0.0.1:$http_port"
export NOMAD_ADDR="$addr"

mkdir -p "$work/plugins" "$work/images"
cp "$repo/fixtures/guest/guest.qcow2" "$repo/fixtures/guest/guest-ignore.qcow2" "$work/images/"
cp "$plugin" "$work/plugins/$plugin_file"

cat >"$work/agent.hcl" <<EOF
data_dir             = "$work/data"
plugin_dir           = "$work/plugins"
bind_addr            = "127.0.0.1"
log_level            = "INFO"
disable_update_check = true

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

ports {
  http = $http_port
  rpc  = $rpc_port
  serf = $serf_port
}

server {
  enabled          = true
  bootstrap_expect = 1
}

client {
  enabled           = true
  network_interface = "lo"
  gc_max_allocs     = 200
  options {
    # The cloud fingerprinters query link-local metadata addresses; Consul's polls port 8500.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean,consul"
  }
}

consul {
  auto_advertise   = false
  server_auto_join = false
  client_auto_join = false
}

telemetry {
  publish_allocation_metrics = true
  collection_interval        = "1s"
}

plugin "qemu" {
  config {
    image_paths = ["$work/images"]
  }
}

plugin "$plugin_file" {
  config {
    image_paths = ["$work/images"]
  }
}
EOF

nomad_version="$("$nomad" version | sed -n 1p)"
step "starting $nomad_version on $addr with the qemu and qemu-qmp drivers"
setsid "$nomad" agent -config "$work/agent.hcl" >"$work/agent.log" 2>&1 &
agent_pid=$!

for attempt in $(seq 1 300); do
    kill -0 "$agent_pid" 2>/dev/null || {
        tail -n 40 "$work/agent.log" >&2
        fail "the Nomad agent exited during start-up"
    }
    state="$("$nomad" node status -self -t '{{.Status}} {{with index .Drivers "qemu"}}{{.Healthy}}{{end}} {{with index .Drivers "qemu-qmp"}}{{.Healthy}}{{end}}' 2>/dev/null || true)"
    [[ "$state" == "ready true true" ]] && break
    [[ $attempt -eq 300 ]] && {
        tail -n 40 "$work/agent.log" >&2
        fail "the node was not ready with healthy qemu and qemu-qmp drivers within 60 s (last state: '$state')"
    }
    sleep 0.2
done

step "measuring both drivers ($runs runs per case, VM counts $counts, CPU window ${cpu_window} s)"
python3 "$repo/benches/nomad/side_by_side.py" measure \
    --addr "$addr" --data-dir "$work/data" --image-dir "$work/images" --nomad "$nomad" \
    --agent-pid "$agent_pid" --counts "$counts" --cpu-window "$cpu_window" --runs "$runs" \
    --out "$work/nomad.json"

step "stopping the agent"
stop_agent
leftover="$(pids_in_work_dir | tr '\n' ' ')"
[[ -z "$leftover" ]] || fail "processes left after the agent stopped: $leftover"

step "one plugin with $scale_counts QMP doubles over gRPC (${scale_window} s windows)"
"$repo/target/release/examples/nomad_scale" --plugin "$plugin" \
    --double "$repo/target/release/examples/qmp_double" \
    --counts "$scale_counts" --window "$scale_window" >"$work/scale.jsonl"

roundtrip_args=()
if [[ $quick -eq 0 ]]; then
    step "cargo bench --bench qmp_roundtrip"
    if (cd "$repo" && cargo bench --bench qmp_roundtrip) >"$work/roundtrip.txt"; then
        roundtrip_args=(--roundtrip "$work/roundtrip.txt")
    else
        echo "bench-nomad.sh: benches/qmp_roundtrip.rs failed; the table leaves row 8 out" >&2
    fi
fi

step "results"
{
    echo "Machine: $(nproc) cores ($(grep -m 1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM, $(uname -sr)"
    echo "QEMU: $(qemu-system-x86_64 --version | sed -n 1p); Nomad: $nomad_version; guests: TCG, 128 MiB"
    echo "Command: scripts/bench-nomad.sh$([[ $quick -eq 1 ]] && echo ' --quick')"
    echo
    python3 "$repo/benches/nomad/side_by_side.py" table --nomad "$work/nomad.json" \
        --scale "$work/scale.jsonl" "${roundtrip_args[@]}"
} | tee "${out:-/dev/null}"
