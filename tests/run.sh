#!/usr/bin/env bash
# The README's test command: every test tier that exists, in order.
# Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== style: cargo fmt --check, cargo clippy -D warnings"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --all-features -- -D warnings

echo "== tiers 1 and 2: unit tests and socket tests (our binary on a real unix socket)"
cargo test

echo "== page-request soak: 100 000 page requests, every completion counted (release build)"
cargo test --release --features soak --test page_request_soak -- --nocapture

echo "== benchmark smoke: the request-path benchmark at small sizes (figures: cargo bench)"
cargo bench --bench request_path -- --quick

echo "== fuzzing: each libFuzzer target for 30 s from its seed corpus (long runs: bash fuzz/run.sh 3600)"
bash fuzz/run.sh 30

echo "== tier 3a: kernel tier (test kernels 7.x and 6.12 under QEMU/TCG, real /dev/iommu)"
# First run on a machine: fetches Debian's linux-source packages and builds
# two kernels (about 15 min on 2 cores); cached after that.
bash tests/vm/kernel-tier.sh

echo "== tier 3a (arm64): SMMUv3 nesting in an aarch64 guest (QEMU/TCG, emulated SMMUv3, real iommufd)"
# First run on a machine: the cross toolchain, qemu-system-arm, an arm64 kernel build (about
# 10 min on 2 cores) and a cross build of the backend and its socket tests; cached after that.
bash tests/vm/arm64-tier.sh

echo "== tier 3b: guest tier (QEMU 11 frontend, the test kernel's virtio-iommu driver on our device)"
bash tests/vm/guest-tier.sh
