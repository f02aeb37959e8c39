#!/bin/sh
# Guest-side smoke test of the kernel tier (runs as /test.sh under /init, busybox sh).
# Prints `PASS name` / `FAIL name` per check, then runs each program listed in /etc/viommu-tests
# (one absolute path per line; exit status 0 = pass) as one more test. Exit status: failures > 0.
passed=0 failed=0
# Our test programs start the backend binary from here (tests/support/process.rs).
export VIOMMU_BIN=/bin/vhost-device-iommu
# The README's passthrough launcher (tests/passthrough.rs runs it).
export VIOMMU_LAUNCHER=/bin/viommu-launch.sh
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+ ($2)}"; failed=$((failed + 1)); }
# shellcheck source=libtest.sh
. /lib/viommu-libtest.sh
check() { # check NAME COMMAND...
    name="$1"
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}
have_glob() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }

echo "smoke: kernel $(uname -r), $(nproc) cpus"
# iommufd core: the /dev/iommu character device (misc device registered by CONFIG_IOMMUFD)
check dev-iommu-chardev test -c /dev/iommu
# CONFIG_IOMMUFD_TEST: iommufd_test_init() in drivers/iommu/iommufd/selftest.c creates the
# fail_iommufd fault-injection debugfs dir, registers the iommufd_mock bus and the
# iommufd_selftest_iommu platform device. All three exist only on a selftest kernel.
check iommufd-selftest-debugfs test -d /sys/kernel/debug/fail_iommufd
check iommufd-selftest-mock-bus test -d /sys/bus/iommufd_mock
check iommufd-selftest-iommu-device have_glob /sys/bus/platform/devices/iommufd_selftest_iommu*
# VFIO (legacy container node; the cdev nodes appear per bound device under /dev/vfio/devices)
check vfio-container-chardev test -c /dev/vfio/vfio
# CONFIG_DMA_MAP_BENCHMARK registers a pci and a platform driver at boot; its debugfs file
# /sys/kernel/debug/dma_map_benchmark appears only once a device is bound to it
check dma-map-benchmark-driver test -d /sys/bus/pci/drivers/dma_map_benchmark
# the virtio-iommu guest driver is registered on the virtio bus
check virtio-iommu-driver test -d /sys/bus/virtio/drivers/virtio_iommu
# the kernel log: no BUG, Oops, WARNING or panic so far
bad="$(dmesg | grep -E 'BUG:|Oops|general protection fault|WARNING:|Call Trace:|Kernel panic|kernel BUG' || true)"
if [ -z "$bad" ]; then
    pass dmesg-no-bug-oops
else
    fail dmesg-no-bug-oops
    echo "$bad" | head -n 40
fi

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

# A real VFIO device for tests/vfio_endpoints.rs: the pci-testdev (1b36:0005) that kernel-tier.sh
# puts behind QEMU's virtio-iommu, bound to vfio-pci; its cdev is /dev/vfio/devices/vfioN.
testdev=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null)" = 0x1b36 ] && [ "$(cat "$d/device" 2>/dev/null)" = 0x0005 ] && testdev="$d"
done
if [ -n "$testdev" ]; then
    bdf="${testdev##*/}"
    echo vfio-pci >"$testdev/driver_override"
    [ -e "$testdev/driver" ] && echo "$bdf" >"$testdev/driver/unbind"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    cdev="$(ls "$testdev/vfio-dev/" 2>/dev/null | head -n 1)"
    if [ -n "$cdev" ] && [ -c "/dev/vfio/devices/$cdev" ]; then
        pass vfio-pci-cdev
        export VIOMMU_VFIO_CDEV="/dev/vfio/devices/$cdev"
    else
        fail vfio-pci-cdev "pci-testdev $bdf did not get a VFIO cdev"
    fi
fi

# QEMU's edu device (1234:11e8), a DMA engine behind the same IOMMU, for tests/dma_map.rs: bound
# to vfio-pci, its cdev in VIOMMU_EDU_CDEV.
if edu="$(vfio_bind_cdev 0x1234 0x11e8 '0000:00:*')"; then
    pass vfio-pci-edu-cdev
    export VIOMMU_EDU_CDEV="$edu"
else
    fail vfio-pci-edu-cdev "no edu device (1234:11e8) on bus 0 with a VFIO cdev"
fi
# A second edu alone behind a PCIe root port (kernel-tier.sh): it has a bus reset, which the one
# on the root bus lacks, so VFIO's reset works on it; tests/passthrough.rs runs the README's
# launcher on it and resets it as QEMU does. Its cdev in VIOMMU_EDU_RESET_CDEV.
if edu="$(vfio_bind_cdev 0x1234 0x11e8 '0000:0[1-9]:*')"; then
    pass vfio-pci-edu-reset-cdev
    export VIOMMU_EDU_RESET_CDEV="$edu"
else
    fail vfio-pci-edu-reset-cdev "no edu device (1234:11e8) behind a root port with a VFIO cdev"
fi

# Rust test binaries (cargo's libtest harness): each `test NAME ... ok|FAILED` line counts as one
# check. /etc/viommu-cargo-tests holds one absolute path per line; they run with --ignored (their
# tests need this kernel) and VIOMMU_BIN pointing at our backend binary.
if [ -f /etc/viommu-cargo-tests ]; then
    kmaj="$(uname -r | cut -d. -f1)" kmin="$(uname -r | cut -d. -f2)"
    while IFS= read -r t; do
        [ -n "$t" ] || continue
        name="$(basename "$t")"
        if { [ "$name" = vfio_endpoints ] || [ "$name" = passthrough ] || [ "$name" = dma_map ]; } && [ "$kmaj" -eq 6 ] && [ "$kmin" -lt 13 ]; then
            # Not our code: 6.12's virtio-iommu driver sizes a domain only when a device attaches,
            # after iommufd has fixed the IOAS aperture, so every iommufd domain of a device behind
            # it has usable IOVA [(0, 0)] (6.13 moved the driver to domain_alloc_paging).
            echo "SKIP $name (the test VM's IOMMU, virtio-iommu on $(uname -r), gives iommufd domains no usable IOVA)"
            continue
        fi
        run_libtest "$t"
    done </etc/viommu-cargo-tests
    # The kernel's fault path again, served through io_uring (--fault-io io-uring).
    while IFS= read -r t; do
        [ "$(basename "$t")" = selftest_faults ] || continue
        export VIOMMU_FAULT_IO=io-uring
        run_libtest "$t" "[io-uring]"
        unset VIOMMU_FAULT_IO
    done </etc/viommu-cargo-tests
fi

echo "smoke: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
