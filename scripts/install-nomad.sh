#!/usr/bin/env bash
# Puts a Nomad v1.6.5 binary into this project's cache and prints its path.
#
# The end-to-end tests, the benchmarks and scripts/demo.sh run Nomad v1.6.5, the last release
# under the MPL-2.0 (later releases are under the BUSL). They look for it at
#   $NOMAD_DRIVER_QEMU_CACHE_DIR/nomad-v1.6.5/bin/nomad
# where the cache directory defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/nomad-driver-qemu.
#
# A cached binary is reused as it is. Otherwise the script copies the binary that NOMAD_BIN
# names into the cache, after checking that it reports "Nomad v1.6.5".
#
# NOTE: the script does not build Nomad. The package registries this project may use do not
# serve the github.com/hashicorp/nomad module, and binaries from other sources are not used,
# so NOMAD_BIN must name a v1.6.5 binary built elsewhere from the v1.6.5 source.
#
# The last line on stdout is always the binary's absolute path.
#
# Usage: scripts/install-nomad.sh [--force]
#   --force   replace a cached binary with the one NOMAD_BIN names

set -euo pipefail

readonly NOMAD_VERSION="1.6.5"

force=0
case "${1:-}" in
"") ;;
--force) force=1 ;;
*)
    echo "install-nomad.sh: unknown argument '$1' (expected no argument or --force)" >&2
    exit 2
    ;;
esac

cache_root="${NOMAD_DRIVER_QEMU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nomad-driver-qemu}"
install_dir="$cache_root/nomad-v$NOMAD_VERSION"
bin="$install_dir/bin/nomad"

log() { echo "install-nomad: $*" >&2; }

# The stamp records the version the binary reported when it was cached, so a cache hit costs
# a `test` and a `read` instead of starting the 100 MB binary.
cached_version_ok() {
    [[ -x "$bin" && -f "$install_dir/VERSION" ]] || return 1
    local stamped
    read -r stamped <"$install_dir/VERSION" || return 1
    [[ "$stamped" == "$NOMAD_VERSION" ]]
}

if [[ $force -eq 0 ]] && cached_version_ok; then
    echo "$bin"
    exit 0
fi

if [[ -z "${NOMAD_BIN:-}" ]]; then
    log "Nomad v$NOMAD_VERSION is not cached at $bin"
    log "set NOMAD_BIN to a Nomad v$NOMAD_VERSION binary (built from the v$NOMAD_VERSION source tag) and rerun"
    exit 1
fi
if [[ ! -x "$NOMAD_BIN" ]]; then
    log "NOMAD_BIN=$NOMAD_BIN is not an executable file"
    exit 1
fi

reported="$("$NOMAD_BIN" version | head -n 1)"
if [[ "$reported" != "Nomad v$NOMAD_VERSION" ]]; then
    log "NOMAD_BIN=$NOMAD_BIN reports '$reported', expected 'Nomad v$NOMAD_VERSION'"
    exit 1
fi

mkdir -p "$install_dir/bin"
# Copy under a temporary name and rename, so a concurrent reader never sees half a binary.
tmp_bin="$install_dir/bin/.nomad.tmp.$$"
trap 'rm -f "$tmp_bin"' EXIT
cp "$NOMAD_BIN" "$tmp_bin"
chmod 0755 "$tmp_bin"
mv -f "$tmp_bin" "$bin"
echo "$NOMAD_VERSION" >"$install_dir/VERSION"
log "cached $reported from $NOMAD_BIN"
echo "$bin"
