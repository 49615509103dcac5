#!/usr/bin/env bash
# Run the benchmarks against real QEMU and print their tables (Markdown).
#
# 1. qmp_roundtrip: query-status round trip of this client next to a blocking
#    floor, a tokio floor and Python's qemu.qmp, interleaved batch by batch.
# 2. vm_lifecycle: Vm::start and Vm::stop on the test guest next to a raw spawn
#    and a raw system_powerdown, one guest at a time.
#
# Prints the machine and QEMU version first, so a table can be read with the
# load it was taken under. Needs qemu-system-x86_64, python3 with qemu.qmp and
# the test guests (scripts/setup.sh installs and builds all three).
#
# Usage: scripts/bench.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found: run scripts/setup.sh (or apt-get install -y qemu-system-x86)"
python3 -c 'import qemu.qmp' 2>/dev/null ||
    die "the Python package qemu.qmp is missing: run pip install qemu.qmp==0.0.6"
[[ -f fixtures/guest/vmlinuz && -f fixtures/guest/initramfs.cpio.gz ]] ||
    die "the test guests are missing: run fixtures/build-guests.sh"

kvm_state="absent"
if [[ -e /dev/kvm ]]; then
    kvm_state="present (the benchmarks use TCG)"
fi

echo "## Machine"
echo
echo "- CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "- Memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
echo "- Kernel: $(uname -sr)"
echo "- /dev/kvm: $kvm_state"
echo "- QEMU: $(qemu-system-x86_64 --version | head -n1)"
echo "- Load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

echo "## QMP round trip"
echo
cargo bench --quiet --bench qmp_roundtrip
echo
echo "## VM start and graceful stop"
echo
cargo bench --quiet --bench vm_lifecycle
echo
echo "Load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
