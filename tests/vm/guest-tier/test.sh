#!/bin/sh
# Guest side of tests/vm/guest-tier.sh (runs as /test.sh under /init, busybox sh).
# Our vhost-user virtio-iommu is at 00:03.0, the VIOT puts pci-testdev 00:04.0 and 00:05.0 behind it.
# Prints `PASS name` / `FAIL name` per check; exit status: failures > 0.
passed=0 failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+ ($2)}"; failed=$((failed + 1)); }
have_glob() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
ep=0000:00:04.0
# viommu.mode= on the kernel command line: ours (our device, first boot), ours2 (the same backend,
# a second boot), qemu (QEMU's built-in virtio-iommu-pci), none (no IOMMU: the floor); ours* with
# virtio_iommu.table_mode=0; table1, table2 (our device in page-table mode, contrib/linux: two
# boots against one backend), tablepoll (page-table mode on the polling backend), sva (page-table
# mode with page requests: /bin/sva-test binds its memory to 00:05.0 while the host drives it).
mode=ours bench=all reps=1 secs="${VIOMMU_BENCH_SECONDS:-1}"
for w in $(cat /proc/cmdline); do
    case "$w" in
        viommu.mode=*) mode="${w#viommu.mode=}" ;;
        # viommu.bench=t1g1: only the benchmark's first configuration (the contended boots);
        # t1g1xN: N times, each after a mark and a pause of 0.3 s.
        viommu.bench=*) bench="${w#viommu.bench=}" ;;
        # viommu.seconds=N: each run N seconds (default 1), after a mark and a pause of 0.3 s
        # (the contended A/B boots: the host switches polling every 50 ms meanwhile, ab_watch).
        viommu.seconds=*) secs="${w#viommu.seconds=}" ;;
    esac
done
case "$bench" in *x*) reps="${bench#*x}" bench="${bench%x*}" ;; esac
echo "guest-tier: mode $mode"

echo "guest-tier: kernel $(uname -r)"
for d in /sys/bus/virtio/devices/virtio*; do
    [ -e "$d" ] || continue
    echo "guest-tier: $(basename "$d") device=$(cat "$d/device") vendor=$(cat "$d/vendor") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)")"
done
if [ "$mode" != none ]; then
    if have_glob /sys/bus/virtio/drivers/virtio_iommu/virtio*; then pass virtio-iommu-bound; else fail virtio-iommu-bound; fi
    if dmesg | grep -q virtio_iommu; then pass dmesg-virtio-iommu; else fail dmesg-virtio-iommu; fi
    if dmesg | grep -q 'ACPI: VIOT'; then pass acpi-viot-table; else fail acpi-viot-table; fi
fi
# The page-table series (contrib/linux) says so when it negotiated F_ATTACH_TABLE.
case "$mode" in
    table* | sva)
        if dmesg | grep -q 'guest page tables supported'; then
            pass attach-table-negotiated
        else
            fail attach-table-negotiated "no 'guest page tables supported' in dmesg"
        fi
        # F_PAGE_REQUEST (patch 0004): taken in every page-table mode boot, used by sva
        if dmesg | grep -q 'page requests supported'; then
            pass page-requests-negotiated
        else
            fail page-requests-negotiated "no 'page requests supported' in dmesg"
        fi
        ;;
    ours*)
        if grep -q 'virtio_iommu.table_mode=0' /proc/cmdline && ! dmesg | grep -q 'guest page tables supported'; then
            pass table-mode-off
        else
            fail table-mode-off "page-table mode not turned off by virtio_iommu.table_mode=0"
        fi
        ;;
    qemu)
        # Mode on by default, but QEMU's device does not offer F_ATTACH_TABLE: the series is inert.
        if ! grep -q 'table_mode=0' /proc/cmdline && ! dmesg | grep -q 'guest page tables supported'; then
            pass table-mode-inert-without-extension
        else
            fail table-mode-inert-without-extension
        fi
        ;;
esac

echo dma_map_benchmark >"/sys/bus/pci/devices/$ep/driver_override"
if echo "$ep" >/sys/bus/pci/drivers/dma_map_benchmark/bind; then
    pass dma-map-benchmark-bind
else
    fail dma-map-benchmark-bind "bind failed (EAGAIN = probe deferred: no IOMMU for the endpoint)"
fi
if [ "$mode" != none ]; then
    if [ -e "/sys/bus/pci/devices/$ep/iommu_group" ]; then
        g="$(readlink "/sys/bus/pci/devices/$ep/iommu_group")"
        pass "endpoint-iommu-group"
        echo "guest-tier: $ep iommu_group ${g##*/} type $(cat "/sys/bus/pci/devices/$ep/iommu_group/type" 2>/dev/null)"
    else
        fail endpoint-iommu-group
    fi
fi
# The benchmark: 1 and 2 threads, 4 KiB and 64 KiB granules (pages of 4 KiB), one second each.
# tablepoll: a marker and a pause before each configuration and after the last, in which the
# host reads the backend's INVALIDATE count (guest-tier.sh, inv_watch).
mark() {
    if [ "$mode" = tablepoll ]; then
        echo "dma-bench-mark $1"
        sleep 0.5
    elif [ "$reps" -gt 1 ] || [ "$secs" -gt 1 ]; then
        echo "dma-bench-mark $1"
        sleep 0.3
    fi
}
if [ "$mode" != sva ] && [ -x /bin/dma-bench ] && [ -e /sys/kernel/debug/dma_map_benchmark ]; then
    for t in 1 2; do
        for g in 1 16; do
            [ "$bench" = all ] || [ "$bench" = "t${t}g${g}" ] || continue
            for rep in $(seq "$reps"); do
                mark "t=$t g=$g rep=$rep"
                if /bin/dma-bench "$secs" "$t" "$g"; then
                    pass "dma-map-benchmark-t$t-g$g"
                else
                    fail "dma-map-benchmark-t$t-g$g"
                fi
            done
        done
    done
    mark end
fi

# A user-space VFIO driver (type1) on the second endpoint, first boot only: the host checks each
# of its mappings through the control socket while it waits (guest-tier.sh). In page-table mode
# (table1) on both endpoints, in one container: type1 attaches the second group to the first
# one's domain, so both endpoints share its table, which the host checks through both.
vfio_eps=""
case "$mode" in
    ours) vfio_eps=0000:00:05.0 ;;
    table1)
        vfio_eps=0000:00:05.0,0000:00:04.0
        echo "$ep" >"/sys/bus/pci/devices/$ep/driver/unbind" 2>/dev/null || true
        ;;
esac
if [ -n "$vfio_eps" ] && [ -x /bin/vfio-map ]; then
    bound=1
    for e in $(echo "$vfio_eps" | tr , ' '); do
        echo vfio-pci >"/sys/bus/pci/devices/$e/driver_override"
        echo "$e" >/sys/bus/pci/drivers/vfio-pci/bind || bound=0
    done
    if [ "$bound" = 1 ]; then
        pass vfio-pci-bind
        if /bin/vfio-map "$vfio_eps" "${VIOMMU_VFIO_WAIT:-6}"; then pass vfio-map; else fail vfio-map; fi
    else
        fail vfio-pci-bind
    fi
fi

# SVA (patches 0004, 0005): a process binds its memory to 00:05.0 (endpoint 0x28) and prints the
# PASID and its addresses; the host (guest-tier.sh, sva_watch) drives the endpoint at them.
if [ "$mode" = sva ]; then
    if [ -x /bin/sva-test ] && [ -e /sys/kernel/debug/virtio-iommu-sva-test/bind ]; then
        if /bin/sva-test 0000:00:05.0 "${VIOMMU_SVA_WAIT:-60}"; then pass sva-test-exit-0; else fail sva-test-exit-0; fi
        # The process is gone: its PASID was unbound (the host checks that the endpoint is blocked).
        echo "sva-test: exited"
        sleep "${VIOMMU_SVA_AFTER:-6}"
    else
        fail sva-test "no /bin/sva-test or no test-only bind file (CONFIG_VIRTIO_IOMMU_SVA_TEST)"
    fi
fi

bad="$(dmesg | grep -E 'BUG:|Oops|general protection fault|WARNING:|Call Trace:|Kernel panic|kernel BUG' || true)"
if [ -z "$bad" ]; then pass dmesg-no-bug-oops; else fail dmesg-no-bug-oops; echo "$bad" | head -n 40; fi

echo "guest-tier: dmesg lines about the IOMMU:"
dmesg | grep -iE 'virtio_iommu|viot|iommu|dma_map_benchmark|virtio' | sed 's/^/guest-dmesg: /'
echo "guest-tier: ${passed} passed, ${failed} failed (guest)"
[ "$failed" -eq 0 ]
