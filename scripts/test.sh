#!/usr/bin/env bash
# Set up the machine (scripts/setup.sh), then run the whole test suite.
#
# Phases, all in the release profile:
#   build        cargo test --all-targets --no-run (a compile error stops here)
#   unit         unit tests of the library, binary and examples (benchmarks are
#                built in the build phase and run by scripts/bench.sh)
#   integration  every tests/ target with --test-threads=2, because each test
#                may boot a QEMU guest and two cores fit at most two at once
#   doc          documentation tests
# Every phase runs even after an earlier one failed, then a summary prints the
# totals. Exits non-zero when setup, a build or any test failed.
#
# Usage: scripts/test.sh [-- extra arguments for every test binary]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

test_args=()
if [ "${1:-}" = "--" ]; then
    shift
    test_args=("$@")
elif [ "$#" -gt 0 ]; then
    echo "test.sh: unexpected argument '$1'; usage: scripts/test.sh [-- TEST-BINARY-ARGS...]" >&2
    exit 2
fi

scripts/setup.sh

log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT

phases=()
failures=0

# Run one phase, keep its output for the summary, and record its outcome.
run_phase() {
    local name=$1 started=$SECONDS status=0
    shift
    printf '\n==> %s: %s\n' "$name" "$*"
    "$@" 2>&1 | tee "$log_dir/$name.log" || status=$?
    phases+=("$(printf '%-12s %-6s %4d s' "$name" "$([ "$status" = 0 ] && echo ok || echo FAILED)" $((SECONDS - started)))")
    if [ "$status" != 0 ]; then
        failures=$((failures + 1))
    fi
}

run_phase build cargo test --release --all-targets --no-run
run_phase unit cargo test --release --lib --bins --examples -- "${test_args[@]}"
run_phase integration cargo test --release --test '*' -- --test-threads=2 "${test_args[@]}"
run_phase doc cargo test --release --doc -- "${test_args[@]}"

# Add up libtest's "test result: ok. 3 passed; 0 failed; 1 ignored; ..." lines.
read -r passed failed ignored < <(
    cat "$log_dir"/*.log | awk '
        /^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i + 1) ~ /^passed;?$/) passed += $i
                if ($(i + 1) ~ /^failed;?$/) failed += $i
                if ($(i + 1) ~ /^ignored;?$/) ignored += $i
            }
        }
        END { print passed + 0, failed + 0, ignored + 0 }'
)

printf '\n==> summary\n'
printf '%s\n' "${phases[@]}"
if [ "$ignored" != 0 ]; then
    echo "ignored tests: $ignored"
fi
echo "$passed passed, $failed failed"

if [ "$failures" != 0 ] || [ "$failed" != 0 ]; then
    exit 1
fi
