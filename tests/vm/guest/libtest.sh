# shellcheck shell=sh
# Sourced by the guest smoke scripts (x86 guest/smoke.sh, arm64/smoke.sh), which define
# pass NAME and fail NAME [REASON]. run_libtest PATH [SUFFIX]: run one Rust libtest executable with
# --ignored --test-threads=1 (VIOMMU_BIN pointing at our backend; VIOMMU_TEST_NOTES naming a file
# for lines the tests want in the log, printed after the run) and count each
# `test NAME ... ok|FAILED` line as one check; a run that fails without naming a test, or runs
# none, is one FAIL. SUFFIX is appended to the program's name in the check names (a second run
# of the same program in another mode).
run_libtest() {
    t="$1"
    name="$(basename "$t")${2:-}"
    echo "smoke: running $t --ignored --test-threads=1"
    rm -f /tmp/cargo-test.notes
    VIOMMU_BIN=/bin/vhost-device-iommu RUST_LOG="${RUST_LOG:-info}" VIOMMU_TEST_NOTES=/tmp/cargo-test.notes \
        "$t" --ignored --test-threads=1 </dev/null >/tmp/cargo-test.out 2>&1
    rc=$?
    cat /tmp/cargo-test.out
    # What the tests noted for the log (support::edu::note), whether they passed or not.
    [ -f /tmp/cargo-test.notes ] && cat /tmp/cargo-test.notes
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

# vfio_bind_cdev VENDOR DEVICE [BDF-GLOB]: bind the (last) PCI function with these IDs (0x-hex, as
# sysfs prints them) whose address matches BDF-GLOB (default any) to vfio-pci and print its VFIO
# cdev path; status 1 and nothing printed if there is no such function or it got no cdev.
vfio_bind_cdev() {
    dev=""
    for d in /sys/bus/pci/devices/${3:-*}; do
        [ "$(cat "$d/vendor" 2>/dev/null)" = "$1" ] && [ "$(cat "$d/device" 2>/dev/null)" = "$2" ] && dev="$d"
    done
    [ -n "$dev" ] || return 1
    bdf="${dev##*/}"
    echo vfio-pci >"$dev/driver_override"
    [ -e "$dev/driver" ] && echo "$bdf" >"$dev/driver/unbind"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    cdev="$(ls "$dev/vfio-dev/" 2>/dev/null | head -n 1)"
    [ -n "$cdev" ] && [ -c "/dev/vfio/devices/$cdev" ] || return 1
    echo "/dev/vfio/devices/$cdev"
}
