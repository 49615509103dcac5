#!/usr/bin/env bash
# Prepare a Debian 12 machine to build and test this project.
#
# Installs the Debian packages (QEMU, protoc, the guest build tools, Python 3),
# the Python qemu.qmp library used by the benchmark comparison, builds the test
# guests, caches the Nomad binary and builds the release binary. Every step
# checks first and does nothing when its work is already done, so a second run
# takes a few seconds. Needs root for apt-get and the Rust and Go toolchains
# on PATH. Prints one line per step with its duration.
#
# Usage: scripts/setup.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

readonly QEMU_QMP_VERSION=0.0.6

# Debian packages this project needs, by the command or file that shows the
# package is present. qemu-utils is checked through qemu-img, so a newer
# qemu-img from bookworm-backports counts too.
declare -A package_probe=(
    [qemu-system-x86]=qemu-system-x86_64
    [qemu-utils]=qemu-img
    [protobuf-compiler]=protoc
    [libprotobuf-dev]=/usr/include/google/protobuf/timestamp.proto
    [python3]=python3
    [cpio]=cpio
    [mtools]=mcopy
    [dosfstools]=mkfs.fat
    [syslinux]=syslinux
    [syslinux-common]=/usr/lib/syslinux/mbr/mbr.bin
    [fdisk]=sfdisk
    [iproute2]=ip
)

export DEBIAN_FRONTEND=noninteractive
apt_get=(apt-get -o DPkg::Lock::Timeout=600 -y -qq)

log() {
    printf 'setup: %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# Run a step and print its name, outcome and duration on one line. The step
# prints its own detail through $step_note.
run_step() {
    local name=$1 started=$EPOCHREALTIME
    shift
    step_note=""
    "$@"
    local elapsed
    elapsed=$(awk -v start="$started" -v end="$EPOCHREALTIME" 'BEGIN { printf "%.1f", end - start }')
    printf 'setup: %-10s %6s s  %s\n' "$name" "$elapsed" "$step_note"
}

package_present() {
    local probe=$1
    if [[ $probe == /* ]]; then
        [ -e "$probe" ]
    else
        command -v "$probe" >/dev/null
    fi
}

# Print the URI of the main Debian archive from the apt sources, for the
# backports entry.
debian_archive_uri() {
    {
        sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null
        awk '$1 == "deb" && $3 ~ /^bookworm/ { print $2 }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -v -- '-security' | grep -m 1 '/debian/\?$'
}

# qemu-utils 10.0 from bookworm-backports declares Breaks: qemu-system-common
# (<< 1:8.0), so installing bookworm's qemu-system-x86 7.2 next to it would
# remove it. On such a host install QEMU from bookworm-backports as well.
install_qemu_from_backports() {
    if ! apt-cache policy 2>/dev/null | grep -q 'a=bookworm-backports\|n=bookworm-backports'; then
        local uri
        uri=$(debian_archive_uri) || die "no Debian archive in the apt sources to add bookworm-backports from; add it to /etc/apt/sources.list.d/ and rerun"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
            >/etc/apt/sources.list.d/bookworm-backports.sources
    fi
    "${apt_get[@]}" update
    "${apt_get[@]}" install --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
}

install_packages() {
    local missing=() package
    for package in "${!package_probe[@]}"; do
        package_present "${package_probe[$package]}" || missing+=("$package")
    done
    if [ "${#missing[@]}" = 0 ]; then
        step_note="all present"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"

    local qemu_utils_version
    qemu_utils_version=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* && $qemu_utils_version == *bpo12* ]]; then
        log "qemu-utils $qemu_utils_version is from bookworm-backports; installing qemu-system-x86 from there too"
        install_qemu_from_backports
        local rest=()
        for package in "${missing[@]}"; do
            [[ $package == qemu-system-x86 || $package == qemu-utils ]] || rest+=("$package")
        done
        step_note="installed qemu-system-x86 qemu-utils from bookworm-backports"
        missing=("${rest[@]}")
        [ "${#missing[@]}" = 0 ] && return 0
    fi

    # Update the package lists only when an install needs it (missing or
    # stale lists).
    if ! "${apt_get[@]}" install --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        "${apt_get[@]}" update
        "${apt_get[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
    fi
    step_note="${step_note:+$step_note, }installed ${missing[*]}"
}

qemu_qmp_version() {
    python3 -c 'import importlib.metadata as metadata, qemu.qmp; print(metadata.version("qemu.qmp"))' 2>/dev/null
}

install_qemu_qmp() {
    if [ "$(qemu_qmp_version)" = "$QEMU_QMP_VERSION" ]; then
        step_note="qemu.qmp $QEMU_QMP_VERSION present"
        return 0
    fi
    local pip=(python3 -m pip install --quiet --disable-pip-version-check "qemu.qmp==$QEMU_QMP_VERSION")
    if ! python3 -m pip --version >/dev/null 2>&1; then
        "${apt_get[@]}" install --no-install-recommends python3-pip >/dev/null
    fi
    local output
    if ! output=$("${pip[@]}" 2>&1); then
        # Debian's own python3 marks its environment as externally managed
        # (PEP 668); this is a test machine, so install into it anyway.
        if [[ $output == *externally-managed-environment* ]]; then
            "${pip[@]}" --break-system-packages
        else
            printf '%s\n' "$output" >&2
            die "pip install qemu.qmp==$QEMU_QMP_VERSION failed"
        fi
    fi
    [ "$(qemu_qmp_version)" = "$QEMU_QMP_VERSION" ] || die "qemu.qmp $QEMU_QMP_VERSION installed, but python3 cannot import it"
    step_note="installed qemu.qmp $QEMU_QMP_VERSION"
}

build_guests() {
    local output
    output=$(fixtures/build-guests.sh 2>&1) || {
        printf '%s\n' "$output" >&2
        die "fixtures/build-guests.sh failed"
    }
    step_note=$(printf '%s\n' "$output" | tail -n 1 | sed 's/^build-guests: //')
}

install_nomad() {
    # NOTE: install-nomad.sh only caches a Nomad v1.6.5 binary named by
    # NOMAD_BIN and fails without one. Setup goes on, so every other test
    # still runs, and the end-to-end tests report the missing binary.
    local output
    if output=$(scripts/install-nomad.sh 2>&1); then
        step_note="nomad at $(printf '%s\n' "$output" | tail -n 1)"
    else
        printf '%s\n' "$output" >&2
        step_note="UNAVAILABLE: scripts/install-nomad.sh failed (see above); the Nomad end-to-end tests will fail"
    fi
}

build_release() {
    command -v cargo >/dev/null || die "cargo not found; install the Rust toolchain (rustup) and put cargo on PATH"
    cargo build --release --locked --quiet
    step_note="target/release/nomad-driver-qemu"
}

main() {
    local started=$SECONDS
    run_step packages install_packages
    run_step qemu.qmp install_qemu_qmp
    run_step guests build_guests
    if [ -x scripts/install-nomad.sh ]; then
        run_step nomad install_nomad
    fi
    run_step release build_release
    log "done in $((SECONDS - started)) s"
}

main "$@"
