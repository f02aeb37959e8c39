# shellcheck shell=sh
# Sourced by the guest smoke scripts (x86 guest/smoke.sh, arm64/smoke.sh), which define
# pass NAME and fail NAME [REASON]. run_libtest PATH [SUFFIX]: run one Rust libtest executable with
# --ignored --test-threads=1 (VIOMMU_BIN pointing at our backend) and count each
# `test NAME ... ok|FAILED` line as one check; a run that fails without naming a test, or runs
# none, is one FAIL. SUFFIX is appended to the program's name in the check names (a second run
# of the same program in another mode).
run_libtest() {
    t="$1"
    name="$(basename "$t")${2:-}"
    echo "smoke: running $t --ignored --test-threads=1"
    VIOMMU_BIN=/bin/vhost-device-iommu RUST_LOG="${RUST_LOG:-info}" \
        "$t" --ignored --test-threads=1 </dev/null >/tmp/cargo-test.out 2>&1
    rc=$?
    cat /tmp/cargo-test.out
    n=0
    while IFS= read -r line; do
        case "$line" in
            "test "*" ... ok") tn="${line#test }"; pass "${name}::${tn% ... ok}"; n=$((n + 1)) ;;
            "test "*" ... FAILED") tn="${line#test }"; fail "${name}::${tn% ... FAILED}"; n=$((n + 1)) ;;
        esac
    done </tmp/cargo-test.out
    if [ "$rc" -ne 0 ] && ! grep -q ' \.\.\. FAILED$' /tmp/cargo-test.out; then
        fail "$name" "exit $rc"
    elif [ "$n" -eq 0 ]; then
        fail "$name" "no tests ran"
    fi
}
