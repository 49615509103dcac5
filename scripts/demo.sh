#!/usr/bin/env bash
# Runs the example VM job in a throwaway Nomad agent that loads this driver, then stops it.
#
# Steps: scripts/setup.sh (packages, test guests, Nomad, release build), a Nomad v1.6.5 agent
# (server and client) on 127.0.0.1 with free ports in a temporary directory, then
# examples/vm.nomad.hcl with the powering-off test guest. The script shows the allocation's
# status, resource usage and the guest's ready line, stops the job, prints how long the
# graceful stop took, and stops the agent. An EXIT trap removes everything it started.
#
# Usage: scripts/demo.sh [--no-setup] [--builtin]
#   --no-setup  skip scripts/setup.sh (everything it provides is already there)
#   --builtin   run the same job with Nomad's built-in qemu driver instead, for comparison

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly repo
readonly plugin_file="nomad-driver-qemu"
readonly ready_marker="QEMU-GUEST-READY"

run_setup=1
builtin=0
for arg in "$@"; do
    case "$arg" in
    --no-setup) run_setup=0 ;;
    --builtin) builtin=1 ;;
    *)
        echo "demo.sh: unknown argument '$arg' (expected --no-setup or --builtin)" >&2
        exit 2
        ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }
fail() {
    echo "demo.sh: $*" >&2
    exit 1
}

# Milliseconds since the epoch, for the stop timing.
now_ms() { date +%s%3N; }

if [[ $run_setup -eq 1 ]]; then
    [[ -x "$repo/scripts/setup.sh" ]] ||
        fail "scripts/setup.sh is missing or not executable; rerun with --no-setup if the host is ready"
    step "scripts/setup.sh"
    "$repo/scripts/setup.sh"
fi

nomad="$("$repo/scripts/install-nomad.sh" | tail -n 1)"
plugin="${NOMAD_DRIVER_QEMU_BIN:-$repo/target/release/nomad-driver-qemu}"
guest="$repo/fixtures/guest/guest.qcow2"
if [[ $builtin -eq 0 && ! -x "$plugin" ]]; then
    fail "plugin $plugin not found; run 'cargo build --release'"
fi
[[ -f "$guest" ]] || fail "test guest $guest not found; run fixtures/build-guests.sh"
command -v python3 >/dev/null || fail "python3 is missing (it picks free ports); run 'apt-get install python3'"

work="$(mktemp -d -t nomad-demo-XXXXXX)"
agent_pid=""
addr=""

# Prints the ids of the processes whose command line contains the work dir. Everything the
# agent started (plugins, executors, QEMU) has it there, even after it was re-parented.
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

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "$agent_pid" ]] && kill -0 "$agent_pid" 2>/dev/null; then
        # Stop the job first: a Nomad client leaves its tasks running when it exits.
        NOMAD_ADDR="$addr" "$nomad" job stop -detach vm >/dev/null 2>&1 || true
        sleep 1
        kill -INT "$agent_pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$agent_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$agent_pid" 2>/dev/null || true
    fi
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
# A private copy of the image: QEMU locks the disk image it runs.
cp "$guest" "$work/images/guest.qcow2"

if [[ $builtin -eq 1 ]]; then
    plugin_block="plugin \"qemu\" {
  config {
    image_paths = [\"$work/images\"]
  }
}"
else
    cp "$plugin" "$work/plugins/$plugin_file"
    plugin_block="plugin \"$plugin_file\" {
  config {
    image_paths = [\"$work/images\"]
  }
}"
fi

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

$plugin_block
EOF

step "starting Nomad $("$nomad" version | head -n 1) on $addr (log: $work/agent.log)"
setsid "$nomad" agent -config "$work/agent.hcl" >"$work/agent.log" 2>&1 &
agent_pid=$!

step "waiting for the node and the qemu driver to be ready"
for attempt in $(seq 1 300); do
    kill -0 "$agent_pid" 2>/dev/null || {
        tail -n 40 "$work/agent.log" >&2
        fail "the Nomad agent exited during start-up"
    }
    state="$("$nomad" node status -self -t '{{.Status}} {{with index .Drivers "qemu"}}{{.Healthy}}{{end}}' 2>/dev/null || true)"
    [[ "$state" == "ready true" ]] && break
    [[ $attempt -eq 300 ]] && {
        tail -n 40 "$work/agent.log" >&2
        fail "the node was not ready with a healthy qemu driver within 60 s (last state: '$state')"
    }
    sleep 0.2
done
"$nomad" node status -self -verbose | sed -n '/^Drivers/,/^$/p;/driver.qemu/p'

step "nomad job run examples/vm.nomad.hcl"
"$nomad" job run -detach -var "image_path=$work/images/guest.qcow2" "$repo/examples/vm.nomad.hcl"

alloc=""
for attempt in $(seq 1 600); do
    alloc="$("$nomad" job allocs -t '{{range .}}{{if eq .TaskStates.vm.State "running"}}{{.ID}}{{end}}{{end}}' vm 2>/dev/null || true)"
    [[ -n "$alloc" ]] && break
    [[ $attempt -eq 600 ]] && {
        "$nomad" job status vm >&2 || true
        fail "the VM task was not running within 60 s"
    }
    sleep 0.1
done

step "waiting for the guest's ready line"
for attempt in $(seq 1 600); do
    "$nomad" alloc logs -task vm "$alloc" 2>/dev/null | grep -q "$ready_marker" && break
    [[ $attempt -eq 600 ]] && fail "the guest printed no '$ready_marker' line within 60 s"
    sleep 0.1
done
"$nomad" alloc logs -task vm "$alloc" | tr -d '\r' | grep -a -o "$ready_marker.*"

step "nomad alloc status"
"$nomad" alloc status "$alloc"

step "nomad alloc status -stats (after 2 s of metrics)"
sleep 2
"$nomad" alloc status -stats "$alloc" | sed -n '/^Task Resources/,/^$/p'

step "nomad job stop vm (graceful: the guest powers off)"
start_ms="$(now_ms)"
"$nomad" job stop -detach vm >/dev/null
for attempt in $(seq 1 1200); do
    status="$("$nomad" alloc status -t '{{.ClientStatus}} {{.TaskStates.vm.State}}' "$alloc")"
    [[ "$status" == "complete dead" || "$status" == "failed dead" ]] && break
    [[ $attempt -eq 1200 ]] && fail "the VM did not stop within 60 s (status: $status)"
    sleep 0.05
done
stop_ms=$(($(now_ms) - start_ms))
"$nomad" alloc status "$alloc" | sed -n '/^Recent Events/,$p'
if "$nomad" alloc logs -task vm "$alloc" | grep -q "QEMU-GUEST-POWERBUTTON"; then
    echo "the guest saw the power button and powered off"
else
    echo "the guest never saw the power button"
fi
echo "nomad job stop to a dead task: ${stop_ms} ms (allocation client status: ${status%% *})"

step "stopping the agent"
kill -INT "$agent_pid"
for _ in $(seq 1 300); do
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.1
done
leftover="$(pids_in_work_dir | tr '\n' ' ')"
if [[ -n "$leftover" ]]; then
    echo "processes left after the agent stopped: $leftover" >&2
    exit 1
fi
echo "done"
