#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 60) from its seed corpus.
#
#   bash fuzz/run.sh [SECONDS]
#
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# The seeds in fuzz/corpus/<target>/ are copied to a scratch directory, so
# the generated corpus never lands in the repo. Per target one line:
#   fuzz <target>: <execs> execs in <s> s (<execs/s>/s), no crash
# A crash, leak, timeout (-timeout, 10 s per input: a hang) or OOM fails
# loudly: the artifact path is printed and the exit status is non-zero.
# Reproduce one with: cargo +nightly fuzz run <target> <artifact>
set -uo pipefail

SECONDS_PER_TARGET="${1:-60}"
case "$SECONDS_PER_TARGET" in
'' | *[!0-9]*)
	echo "usage: $0 [SECONDS]" >&2
	exit 2
	;;
esac
FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$FUZZ_DIR/.." || exit 2
TARGETS=(request_decode request_path eventq page_requests)
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/iommu-fuzz.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
	echo "!! fuzz: SKIPPED: no nightly toolchain on this machine (libFuzzer needs it)"
	exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz (once per machine)" >&2
	cargo install cargo-fuzz --locked >&2 || {
		echo "fuzz: cannot install cargo-fuzz" >&2
		exit 1
	}
fi

if ! cargo +nightly fuzz build --fuzz-dir "$FUZZ_DIR" >"$SCRATCH/build.log" 2>&1; then
	cat "$SCRATCH/build.log" >&2
	echo "fuzz: build failed" >&2
	exit 1
fi

status=0
for t in "${TARGETS[@]}"; do
	corpus="$SCRATCH/corpus-$t"
	mkdir -p "$corpus" "$FUZZ_DIR/artifacts/$t"
	cp "$FUZZ_DIR/corpus/$t/"* "$corpus/"
	log="$SCRATCH/$t.log"
	start=$(date +%s.%N)
	cargo +nightly fuzz run --fuzz-dir "$FUZZ_DIR" "$t" "$corpus" -- \
		-max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
		-print_final_stats=1 >"$log" 2>&1
	rc=$?
	end=$(date +%s.%N)
	# libFuzzer's own count and time ("Done N runs in S second(s)"); the
	# wall clock (build check and corpus loading included) if it is missing.
	done_line=$(grep -E "^Done [0-9]+ runs in [0-9]+ second" "$log" | tail -1)
	execs=$(echo "$done_line" | awk '{ print $2 }')
	secs=$(echo "$done_line" | awk '{ print $5 }')
	[ -n "$execs" ] || execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	[ -n "$secs" ] || secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
	artifact=$(grep -o "Test unit written to [^ ]*" "$log" | tail -1 | sed 's/Test unit written to //')
	if [ "$rc" -ne 0 ] || [ -n "$artifact" ]; then
		status=1
		echo "=== fuzz $t: FAILED (exit $rc) ===" >&2
		grep -E -A1 "panicked at" "$log" | head -4 >&2
		grep -E "ERROR: libFuzzer|SUMMARY" "$log" | head -4 >&2 ||
			tail -40 "$log" >&2
		tail -60 "$log" > "$FUZZ_DIR/artifacts/$t/last-failure.log"
		echo "fuzz $t: CRASH, input: ${artifact:-none written (see $FUZZ_DIR/artifacts/$t/last-failure.log)}" >&2
		continue
	fi
	rate=$(awk -v e="${execs:-0}" -v s="$secs" 'BEGIN { printf "%.0f", e / (s > 0 ? s : 1) }')
	echo "fuzz $t: ${execs:-0} execs in ${secs} s (${rate}/s), no crash"
done
exit "$status"
