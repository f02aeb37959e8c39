#!/usr/bin/env bash
# The README's test command: every test tier that exists, in order.
# Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== style: cargo fmt --check, cargo clippy -D warnings"
cargo fmt --check
cargo clippy --all-targets -- -D warnings

echo "== tiers 1 and 2: unit tests and socket tests (our binary on a real unix socket)"
cargo test

echo "== benchmark smoke: the request-path benchmark at small sizes (figures: cargo bench)"
cargo bench --bench request_path -- --quick

echo
echo "!! tier 3 (VM tests: kernel tier with iommufd, QEMU guest tier): SKIPPED"
echo "!!   they do not exist yet: issue 3 builds the kernel tier, issue 6 the guest tier."
