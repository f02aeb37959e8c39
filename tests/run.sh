#!/usr/bin/env bash
# The README's test command: every test tier that exists, in order.
# Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage's start, in seconds since this script began.
stage() { echo "== $* (t+${SECONDS} s)"; }

# The VM tiers' downloads and kernel builds start now, in the background and niced, so that on a
# fresh machine they use the network and the cores the Rust tiers leave idle; the VM tiers start
# when it is done and find them cached (tests/vm/prepare.sh). VIOMMU_PREPARE=0: off.
prep_pid=""
prep_log="$(mktemp "${TMPDIR:-/tmp}/viommu-prepare.XXXXXX")"
finish() {
    # Its own session: stopping it stops the make or apt it runs.
    [ -z "$prep_pid" ] || kill -TERM -- "-${prep_pid}" 2>/dev/null || true
    rm -f "$prep_log"
}
trap finish EXIT
if [ "${VIOMMU_PREPARE:-1}" != 0 ]; then
    setsid -w nice -n 10 bash tests/vm/prepare.sh >/dev/null 2>"$prep_log" </dev/null &
    prep_pid=$!
fi

stage "style: cargo fmt --check, cargo clippy -D warnings"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --all-features -- -D warnings

stage "tiers 1 and 2: unit tests and socket tests (our binary on a real unix socket)"
cargo test

stage "page-request soak: 100 000 page requests, every completion counted (release build)"
cargo test --release --features soak --test page_request_soak -- --nocapture

# The cost benches count instructions under valgrind (callgrind) and system calls (valgrind's
# trace, strace as a cross-check); a fresh machine gets both here (without them the benches print
# SKIPPED).
# vm_need_pkgs waits for dpkg's lock (prepare.sh may be installing in the background).
( . tests/vm/lib.sh && vm_need_pkgs valgrind strace ) ||
    echo "!! could not install valgrind/strace: the cost benches will say SKIPPED"

stage "benchmark smoke: the request-path benchmark at small sizes, and its request-cost line (figures: cargo bench)"
cargo bench --bench request_path -- --quick

stage "fault-cost: instructions and system calls per page request relayed, batch 1 and 64"
cargo bench --bench fault_cost -- --quick

stage "fuzzing: each libFuzzer target for 30 s from its seed corpus (long runs: bash fuzz/run.sh 3600)"
bash fuzz/run.sh 30

# The VM tiers measure their benchmarks in TCG guests: nothing else may run meanwhile.
stage "VM tiers: waiting for tests/vm/prepare.sh (fetches and kernel builds)"
if [ -n "$prep_pid" ]; then
    wait "$prep_pid" || echo "tests/vm/prepare.sh failed; each tier retries what it needs"
    prep_pid=""
    grep -a '^\[vm\] prepare:' "$prep_log" || true
fi

stage "tier 3a: kernel tier (test kernels 7.x and 6.12 under QEMU/TCG, real /dev/iommu)"
# First run on a machine: fetches Debian's linux-source packages and builds
# two kernels (about 15 min on 2 cores); cached after that.
bash tests/vm/kernel-tier.sh

stage "tier 3a (arm64): SMMUv3 nesting in an aarch64 guest (QEMU/TCG, emulated SMMUv3, real iommufd)"
# First run on a machine: the cross toolchain, qemu-system-arm, an arm64 kernel build (about
# 10 min on 2 cores) and a cross build of the backend and its socket tests; cached after that.
bash tests/vm/arm64-tier.sh

stage "tier 3b: guest tier (QEMU 11 frontend, the test kernel's virtio-iommu driver on our device)"
bash tests/vm/guest-tier.sh
stage "all tiers done"
