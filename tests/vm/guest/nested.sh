#!/bin/sh
# The kernel tier's nested boot (x86 7.x; /nested.sh from mknested.sh's archive, busybox sh):
# a real QEMU 11 (/opt/qemu) inside this TCG guest.
#  1. tests/passthrough_qemu.rs: the README's launcher starts our backend and that QEMU with
#     -device vfio-pci of the edu behind the root port on the shared iommufd; edu DMA follows
#     our tables after QEMU's realize and QEMU's system_reset, and faults after our UNMAP: driven
#     by the test, then by a second-level guest QEMU boots (QEMU our vhost-user frontend). It
#     notes how long QEMU took to reach QMP ready (realize_s).
#  2. (VIOMMU_NESTED_BOOT_S=N on the kernel command line as viommu.args=N, default 0 = not run)
#     the time QEMU takes to boot this kernel with a tiny initramfs to its marker (boot_s), or
#     `timeout` after N s.
# Prints PASS/FAIL/SKIP lines (counted by kernel-tier.sh) and
#   nested-qemu realize_s=<x|none> boot_s=<x|timeout|not-run>
passed=0 failed=0
export VIOMMU_BIN=/bin/vhost-device-iommu VIOMMU_LAUNCHER=/bin/viommu-launch.sh
export VIOMMU_NESTED_QEMU=/opt/qemu/qemu-system-x86_64
export VIOMMU_NESTED_KERNEL=/opt/nested/bzImage VIOMMU_NESTED_INITRD=/opt/nested/initramfs.cpio.gz
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+ ($2)}"; failed=$((failed + 1)); }
# shellcheck source=libtest.sh
. /lib/viommu-libtest.sh
boot_tmo="${1:-0}"
up() { cut -d' ' -f1 /proc/uptime; }

echo "nested: kernel $(uname -r), $(nproc) cpus; QEMU: $($VIOMMU_NESTED_QEMU -version 2>&1 | head -n 1)"
if ! "$VIOMMU_NESTED_QEMU" -version >/dev/null 2>&1; then
    fail nested-qemu-runs "$($VIOMMU_NESTED_QEMU -version 2>&1 | tail -n 3 | tr '\n' ' ')"
    echo "nested-qemu realize_s=none boot_s=not-run"
    echo "nested: ${passed} passed, ${failed} failed"
    exit 1
fi
pass nested-qemu-runs

# The edu alone behind the root port (kernel-tier.sh), bound to vfio-pci as in smoke.sh.
realize=none
if edu="$(vfio_bind_cdev 0x1234 0x11e8 '0000:0[1-9]:*')"; then
    pass vfio-pci-edu-reset-cdev
    export VIOMMU_EDU_RESET_CDEV="$edu"
    run_libtest /bin/passthrough_qemu
    r="$(sed -n 's/.*nested-qemu-realize_s=\([0-9.]*\).*/\1/p' /tmp/cargo-test.notes 2>/dev/null | head -n 1)"
    [ -z "$r" ] || realize="$r"
else
    fail vfio-pci-edu-reset-cdev "no edu device (1234:11e8) behind a root port with a VFIO cdev"
fi

boot=not-run
if [ "$boot_tmo" -gt 0 ]; then
    # The same kernel, a tiny initramfs that prints NESTED-L2-UP and powers off; -m small.
    echo "nested: booting a second-level guest (timeout ${boot_tmo} s)"
    t0="$(up)"
    timeout "$boot_tmo" "$VIOMMU_NESTED_QEMU" -M q35 -accel tcg -cpu max -m 128M -nodefaults \
        -display none -no-reboot -serial file:/tmp/l2.log -monitor none \
        -kernel /opt/nested/bzImage -initrd /opt/nested/initramfs.cpio.gz \
        -append "console=ttyS0 panic=-1 quiet" </dev/null >/tmp/l2.qemu 2>&1
    rc=$?
    t1="$(up)"
    if grep -q NESTED-L2-UP /tmp/l2.log 2>/dev/null; then
        boot="$(echo "$t1 $t0" | awk '{ printf "%.1f", $1 - $2 }')"
        pass nested-qemu-boots-l2
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 143 ]; then
        boot=timeout
        echo "nested: the second-level guest did not finish in ${boot_tmo} s; its console:"
        tail -n 5 /tmp/l2.log 2>/dev/null
    else
        boot=error
        fail nested-qemu-boots-l2 "QEMU exit $rc: $(tail -n 3 /tmp/l2.qemu | tr '\n' ' ')"
    fi
fi
echo "nested-qemu realize_s=${realize} boot_s=${boot}$([ "$boot" = timeout ] && echo " (did not finish in ${boot_tmo} s)")"
echo "nested: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
