#!/bin/sh
# Guest-side smoke test of the arm64 kernel tier (runs as /test.sh under /init, busybox sh), in
# QEMU `-M virt,iommu=smmuv3` with a pci-testdev. Prints `PASS name` / `FAIL name (reason)` per
# check (arm64-tier.sh counts them), then runs /bin/smmu3-check (SMMUv3 nesting through iommufd;
# it prints its own PASS/FAIL line per step), each program of /etc/viommu-tests (exit 0 = pass)
# and each libtest executable of /etc/viommu-cargo-tests (`--ignored --test-threads=1`, one
# check per `test ... ok|FAILED` line). Exit status: failures > 0.
passed=0 failed=0
# Our test programs start the backend binary from here (tests/support/process.rs).
export VIOMMU_BIN=/bin/vhost-device-iommu
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+ ($2)}"; failed=$((failed + 1)); }
# shellcheck source=libtest.sh
. /lib/viommu-libtest.sh
check() { # check NAME COMMAND...
    name="$1"
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}
# count_output FILE: add the PASS/FAIL lines a program printed to our counters
count_output() {
    p="$(grep -c '^PASS ' "$1")" f="$(grep -c '^FAIL ' "$1")"
    passed=$((passed + p)) failed=$((failed + f))
}

echo "smoke: kernel $(uname -r) $(uname -m), $(nproc) cpus"
echo "smoke: kernel command line: $(cat /proc/cmdline)"
dmesg | grep -E 'smmu|SMMU|iommu|ITS|vfio' | sed 's/^/smoke: dmesg: /'

# --- the SMMUv3 driver probed the virt machine's SMMU ---
# arm_smmu_device_probe() registers the IOMMU with iommu_device_sysfs_add(): /sys/class/iommu/smmu3.*
smmu_dev=""
for d in /sys/bus/platform/drivers/arm-smmu-v3/*; do
    [ -e "$d/driver" ] && smmu_dev="${d##*/}"
done
if [ -n "$smmu_dev" ]; then pass smmu3-driver-bound; else fail smmu3-driver-bound "no device bound to arm-smmu-v3"; fi
iommus="$(ls /sys/class/iommu 2>/dev/null)"
if [ -n "$iommus" ]; then
    echo "smoke: /sys/class/iommu: $iommus"
    pass smmu3-sysfs-class-iommu
else
    fail smmu3-sysfs-class-iommu "/sys/class/iommu is empty"
fi
if dmesg | grep -q -E 'arm-smmu-v3 .*oas [0-9]+-bit \(features'; then
    pass smmu3-dmesg-probe
else
    fail smmu3-dmesg-probe "no arm-smmu-v3 probe lines in dmesg"
fi
# iommufd core: /dev/iommu; VFIO's legacy container node
check dev-iommu-chardev test -c /dev/iommu
check vfio-container-chardev test -c /dev/vfio/vfio

# --- the pci-testdev (1b36:0005): behind the SMMU, bound to vfio-pci, with a VFIO cdev ---
testdev=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null)" = 0x1b36 ] && [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && testdev="$d"
done
if [ -z "$testdev" ]; then
    fail pci-testdev-present "no 1b36:0005 device on the PCI bus"
else
    pass pci-testdev-present
    bdf="${testdev##*/}"
    if [ -e "$testdev/iommu" ] && [ -e "$testdev/iommu_group" ]; then
        echo "smoke: $bdf iommu $(basename "$(readlink "$testdev/iommu")") group $(basename "$(readlink "$testdev/iommu_group")")"
        pass pci-testdev-iommu-group
    else
        fail pci-testdev-iommu-group "$bdf has no iommu/iommu_group link"
    fi
    echo vfio-pci >"$testdev/driver_override"
    [ -e "$testdev/driver" ] && echo "$bdf" >"$testdev/driver/unbind"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    drv="$(basename "$(readlink "$testdev/driver" 2>/dev/null)" 2>/dev/null)"
    if [ "$drv" = vfio-pci ]; then pass pci-testdev-vfio-pci; else fail pci-testdev-vfio-pci "driver is '${drv:-none}'"; fi
    cdev="$(ls "$testdev/vfio-dev/" 2>/dev/null | head -n 1)"
    if [ -n "$cdev" ] && [ -c "/dev/vfio/devices/$cdev" ]; then
        pass vfio-pci-cdev
        export VIOMMU_VFIO_CDEV="/dev/vfio/devices/$cdev"
        echo "smoke: VIOMMU_VFIO_CDEV=$VIOMMU_VFIO_CDEV"
    else
        fail vfio-pci-cdev "pci-testdev $bdf did not get a VFIO cdev"
    fi
fi

# --- QEMU's edu device (1234:11e8), a DMA engine behind the SMMU, for tests/dma_smmu3.rs ---
if edu="$(vfio_bind_cdev 0x1234 0x11e8)"; then
    pass vfio-pci-edu-cdev
    export VIOMMU_EDU_CDEV="$edu"
    echo "smoke: VIOMMU_EDU_CDEV=$VIOMMU_EDU_CDEV"
else
    fail vfio-pci-edu-cdev "no edu device (1234:11e8) with a VFIO cdev"
fi

# --- SMMUv3 nesting through iommufd (tests/vm/arm64/smmu3-check.c) ---
if [ -x /bin/smmu3-check ]; then
    if [ -n "${VIOMMU_VFIO_CDEV:-}" ]; then
        echo "smoke: running /bin/smmu3-check $VIOMMU_VFIO_CDEV"
        /bin/smmu3-check "$VIOMMU_VFIO_CDEV" </dev/null >/tmp/smmu3.out 2>&1
        rc=$?
        cat /tmp/smmu3.out
        count_output /tmp/smmu3.out
        if [ "$rc" -ne 0 ] && ! grep -q '^FAIL ' /tmp/smmu3.out; then fail smmu3-check "exit $rc"; fi
    else
        fail smmu3-check "no VFIO cdev to test with"
    fi
else
    fail smmu3-check "/bin/smmu3-check missing from the initramfs"
fi

# --- the SMMU driver logged no error or warning (CMDQ errors for our invalidations, events,
# GERROR, ...): log levels 0-4 (emerg..warning; `dmesg -r` prints <facility*8+level>) of lines
# naming arm-smmu-v3, vfio or iommufd ---
smmu_bad="$(dmesg -r | awk 'match($0, /^<[0-9]+>/) { if ((substr($0, 2, RLENGTH - 2) + 0) % 8 <= 4) print }' |
    grep -E 'arm-smmu-v3|vfio|iommufd' || true)"
if [ -z "$smmu_bad" ]; then
    pass smmu3-dmesg-no-errors
else
    fail smmu3-dmesg-no-errors "$(echo "$smmu_bad" | wc -l) error/warning line(s), below"
    echo "$smmu_bad" | head -n 40
fi

# --- our backend binary (static aarch64) at least starts ---
if [ -e /bin/vhost-device-iommu ]; then
    if out="$(/bin/vhost-device-iommu --version </dev/null 2>&1)"; then
        echo "smoke: $out"
        pass backend-version
    else
        fail backend-version "vhost-device-iommu --version: exit $?: $(echo "$out" | head -n 3)"
    fi
fi

# --- more static programs (VIOMMU_ARM64_TESTS): exit 0 = pass ---
if [ -f /etc/viommu-tests ]; then
    while IFS= read -r t; do
        [ -n "$t" ] || continue
        name="$(basename "$t")"
        echo "smoke: running $t"
        "$t" </dev/null
        rc=$?
        if [ "$rc" -eq 0 ]; then pass "$name"; else fail "$name" "exit $rc"; fi
    done </etc/viommu-tests
fi

# --- Rust test binaries (libtest): each `test NAME ... ok|FAILED` line counts as one check ---
if [ -f /etc/viommu-cargo-tests ]; then
    while IFS= read -r t; do
        [ -n "$t" ] || continue
        run_libtest "$t"
    done </etc/viommu-cargo-tests
fi

# --- the kernel log after all of the above: no BUG, Oops, WARNING or panic ---
bad="$(dmesg | grep -E 'BUG:|Oops|Internal error|WARNING:|Call trace:|Kernel panic|kernel BUG' || true)"
if [ -z "$bad" ]; then
    pass dmesg-no-bug-oops
else
    fail dmesg-no-bug-oops
    echo "$bad" | head -n 40
fi

echo "smoke: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
