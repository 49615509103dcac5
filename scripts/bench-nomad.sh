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
# shellcheck source-path=SCRIPTDIR source=lib/nomad-agent.sh
source "$repo/scripts/lib/nomad-agent.sh"

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

stop_agent() {
    nomad_agent_stop "$agent_pid"
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
    nomad_agent_remove_work_dir "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r http_port rpc_port serf_port < <(nomad_agent_free_ports)
addr="http://127.0.0.1:$http_port"
export NOMAD_ADDR="$addr"

mkdir -p "$work/plugins" "$work/images"
cp "$repo/fixtures/guest/guest.qcow2" "$repo/fixtures/guest/guest-ignore.qcow2" "$work/images/"
cp "$plugin" "$work/plugins/$plugin_file"

# Every timing run leaves a stopped allocation, more than Nomad's default gc_max_allocs of 50
# in a full run.
{
    nomad_agent_config "$work" "$http_port" "$rpc_port" "$serf_port" 200
    echo
    nomad_agent_plugin_block qemu "$work/images"
    echo
    nomad_agent_plugin_block "$plugin_file" "$work/images"
} >"$work/agent.hcl"

nomad_version="$("$nomad" version | sed -n 1p)"
step "starting $nomad_version on $addr with the qemu and qemu-qmp drivers"
setsid "$nomad" agent -config "$work/agent.hcl" >"$work/agent.log" 2>&1 &
agent_pid=$!
nomad_agent_wait_ready "$nomad" "$agent_pid" "$work/agent.log" qemu qemu-qmp || exit 1

step "measuring both drivers ($runs runs per case, VM counts $counts, CPU window ${cpu_window} s)"
python3 "$repo/benches/nomad/side_by_side.py" measure \
    --addr "$addr" --data-dir "$work/data" --image-dir "$work/images" --nomad "$nomad" \
    --agent-pid "$agent_pid" --counts "$counts" --cpu-window "$cpu_window" --runs "$runs" \
    --out "$work/nomad.json"

step "stopping the agent"
stop_agent
leftover="$(nomad_agent_pids_in_dir "$work" | tr '\n' ' ')"
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
