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
# shellcheck source-path=SCRIPTDIR source=lib/nomad-agent.sh
source "$repo/scripts/lib/nomad-agent.sh"

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

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "$agent_pid" ]] && kill -0 "$agent_pid" 2>/dev/null; then
        # Stop the job first: a Nomad client leaves its tasks running when it exits.
        NOMAD_ADDR="$addr" "$nomad" job stop -detach vm >/dev/null 2>&1 || true
        sleep 1
    fi
    nomad_agent_stop "$agent_pid"
    nomad_agent_remove_work_dir "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r http_port rpc_port serf_port < <(nomad_agent_free_ports)
addr="http://127.0.0.1:$http_port"
export NOMAD_ADDR="$addr"

mkdir -p "$work/plugins" "$work/images"
# A private copy of the image: QEMU locks the disk image it runs.
cp "$guest" "$work/images/guest.qcow2"

if [[ $builtin -eq 1 ]]; then
    plugin_name="qemu"
else
    cp "$plugin" "$work/plugins/$plugin_file"
    plugin_name="$plugin_file"
fi
# One task at a time, so Nomad's default gc_max_allocs of 50 is plenty.
{
    nomad_agent_config "$work" "$http_port" "$rpc_port" "$serf_port" 50
    echo
    nomad_agent_plugin_block "$plugin_name" "$work/images"
} >"$work/agent.hcl"

step "starting Nomad $("$nomad" version | head -n 1) on $addr (log: $work/agent.log)"
setsid "$nomad" agent -config "$work/agent.hcl" >"$work/agent.log" 2>&1 &
agent_pid=$!

step "waiting for the node and the qemu driver to be ready"
nomad_agent_wait_ready "$nomad" "$agent_pid" "$work/agent.log" qemu || exit 1
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
nomad_agent_interrupt "$agent_pid"
leftover="$(nomad_agent_pids_in_dir "$work" | tr '\n' ' ')"
if [[ -n "$leftover" ]]; then
    echo "processes left after the agent stopped: $leftover" >&2
    exit 1
fi
echo "done"
