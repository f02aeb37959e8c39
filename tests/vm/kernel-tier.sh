#!/usr/bin/env bash
# The kernel tier's one entry point: for each kernel (newest 7.x from trixie-backports, then 6.12
# from the machine's own suites) fetch + build it (cached), boot it under QEMU with the guest smoke
# test (guest/smoke.sh) plus any host-built static test programs, and print two result lines per kernel:
#   kernel-tier <kernel version>: N passed, M failed
#   kernel-tier <kernel version>: dma-through-tables N passed, M failed
# the second for tests/dma_map.rs (QEMU's edu device doing real DMA through the MAPs our backend
# makes; counted in the first line too; SKIPPED on 6.12, as the VFIO test is). tests/passthrough.rs
# also runs contrib/passthrough/launch.sh (the README's recipe) with a QEMU stand-in and the edu:
# its checks count in the first line.
# A 7.x kernel carries the virtio-iommu series of contrib/linux (x86-kernel-source.sh), inert
# with QEMU's virtio-iommu, so that it is the same kernel the guest tier boots.
# On a 7.x kernel a second, dedicated boot runs a real QEMU 11 inside the guest (mknested.sh,
# guest/nested.sh): the README's launcher with our backend and that QEMU's vfio-pci on the edu
# behind the root port (tests/passthrough_qemu.rs), and the time QEMU takes to get there:
#   kernel-tier <kernel version> nested-qemu: N passed, M failed
#   kernel-tier <kernel version>: nested-qemu realize_s=<s> boot_s=<s|timeout|not-run>
# (its checks count in the first line too).
# Exit status is non-zero if anything failed. Progress and diagnostics go to stderr.
#
# Our own guest programs (examples/vm_iommufd.rs: our iommufd layer against the real /dev/iommu and
# the selftest mock) are built static here and always run; their PASS/FAIL lines count one each.
# Env: VIOMMU_VM_TESTS="path1 path2"  more static test programs to copy into the guest and run after
#                                      the smoke checks, each one test (exit 0 = pass)
#      VIOMMU_VM_KERNELS="7.x 6.12"   which kernels (fetch-kernel-source.sh VERSIONSPECs)
#      VIOMMU_VM_TIMEOUT=300          per-boot timeout in seconds
#      VIOMMU_VFIO_CDEV=/dev/vfio/devices/vfioN   a real VFIO cdev on THIS host (bound to vfio-pci,
#                                      with /dev/iommu): tests/vfio_endpoints.rs runs against it
#      VIOMMU_VM_NESTED=0             no nested boot; =only: the nested boot alone (not the
#                                      ordinary one; benchmarks)
#      VIOMMU_NESTED_BOOT_S=0         in the nested boot, also boot a second-level guest (the same
#                                      kernel, a tiny initramfs) with at most this many seconds
#                                      (boot_s; 0 = not run)
#      plus those of the other scripts (VIOMMU_VM_CACHE, VIOMMU_VM_VERBOSE, VIOMMU_VM_ACCEL, ...)
# Console logs: ${VIOMMU_VM_CACHE:-~/.cache/vhost-device-iommu/vm}/logs/kernel-tier-<version>.log (the
# nested boot: kernel-tier-<version>-nested.log)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

kernels="${VIOMMU_VM_KERNELS:-7.x 6.12}"
tmo="${VIOMMU_VM_TIMEOUT:-300}"
# VIOMMU_VM_LOGDIR: a private place for the console logs (two worktrees running a tier at once
# would otherwise write, and count, the same per-version log).
logdir="${VIOMMU_VM_LOGDIR:-${VM_CACHE}/logs}"
mkdir -p "$logdir"

work="$(mktemp -d "${TMPDIR:-/tmp}/viommu-kernel-tier.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# ---- our guest test programs, built static (the initramfs has no libraries) ----
repo="$(cd "${VM_DIR}/../.." && pwd)"
triple=x86_64-unknown-linux-gnu
vm_log "building the static guest test programs (cargo, --target ${triple})"
# An explicit --target keeps build scripts and proc macros dynamic.
export RUSTFLAGS="-C target-feature=+crt-static"
(cd "$repo" && cargo build --release --features selftest --example vm_iommufd \
    --bin vhost-device-iommu --target "$triple") >&2
ours=("${repo}/target/${triple}/release/examples/vm_iommufd")
backend_bin="${repo}/target/${triple}/release/vhost-device-iommu"
# The socket-level harness against selftest endpoints (tests/selftest_endpoints.rs): cargo names
# the test executable with a hash, so ask it where it put it.
# cargo_exe SUBCOMMAND TARGET-NAME ARGS...: build, and print the path of the one executable.
cargo_exe() {
    local sub="$1" name="$2" exe
    shift 2
    exe="$(cd "$repo" && cargo "$sub" --features selftest --target "$triple" --no-run \
        --message-format=json "$@" 2>/dev/null | grep "\"name\":\"${name}\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')"
    [ -n "$exe" ] && [ "$(wc -l <<<"$exe")" -eq 1 ] || vm_die "no single executable for ${name}"
    printf '%s\n' "$exe"
}
cargo_tests=("$(cargo_exe test selftest_endpoints --release --test selftest_endpoints)"
    "$(cargo_exe test selftest_nested --release --test selftest_nested)"
    "$(cargo_exe test selftest_faults --release --test selftest_faults)"
    "$(cargo_exe test vfio_endpoints --release --test vfio_endpoints)"
    "$(cargo_exe test passthrough --release --test passthrough)"
    "$(cargo_exe test dma_map --release --test dma_map)")
# The IOAS-path and nested benchmarks (benches/) run as more guest programs.
ours+=("$(cargo_exe bench ioas_path --bench ioas_path)")
ours+=("$(cargo_exe bench nested --bench nested)")
ours+=("$(cargo_exe bench fault_relay --bench fault_relay)")
# Only in the nested boot (it needs QEMU 11 in the guest).
nested_test="$(cargo_exe test passthrough_qemu --release --test passthrough_qemu)"
unset RUSTFLAGS

# ---- the initramfs (same for every kernel) ----
files=("${VM_DIR}/guest/smoke.sh:/test.sh" "${VM_DIR}/guest/libtest.sh:/lib/viommu-libtest.sh")
: >"${work}/viommu-tests"
declare -A seen=()
for t in "${ours[@]}" ${VIOMMU_VM_TESTS:-}; do
    [ -f "$t" ] || vm_die "VIOMMU_VM_TESTS: no such file: $t"
    name="$(basename "$t")"
    [ -z "${seen[$name]:-}" ] || vm_die "VIOMMU_VM_TESTS: two programs named $name"
    seen[$name]=1
    files+=("$t")
    printf '/bin/%s\n' "$name" >>"${work}/viommu-tests"
done
files+=("${work}/viommu-tests:/etc/viommu-tests")
files+=("${backend_bin}:/bin/vhost-device-iommu")
# The README's passthrough launcher, run by tests/passthrough.rs (VIOMMU_LAUNCHER, smoke.sh).
files+=("${repo}/contrib/passthrough/launch.sh:/bin/viommu-launch.sh")
: >"${work}/viommu-cargo-tests"
for t in "${cargo_tests[@]}"; do
    name="$(basename "$t" | sed 's/-[0-9a-f]*$//')"
    files+=("${t}:/bin/${name}")
    printf '/bin/%s\n' "$name" >>"${work}/viommu-cargo-tests"
done
files+=("${work}/viommu-cargo-tests:/etc/viommu-cargo-tests")
"${VM_DIR}/mkinitramfs.sh" "${work}/initramfs.cpio.gz" "${files[@]}"

overall=0
result() { printf '%s\n' "$1"; }
# ordinary_boot KVER KIMG: the tier's boot of that kernel; status 1 if anything failed.
ordinary_boot() {
    local kver="$1" kimg="$2" log rc passed failed skipped extra extra_skip clean ok=0
    log="${logdir}/kernel-tier-${kver}.log"
    rc=0
    # QEMU's virtio-iommu with a pci-testdev behind it: the guest binds the testdev to vfio-pci and
    # tests/vfio_endpoints.rs serves it as a VFIO endpoint (tests/passthrough.rs: bound by a QEMU
    # stand-in, adopted by the backend). virtio-iommu does not isolate MSIs, so
    # iommufd refuses the bind (EPERM) unless told that this test machine accepts that. QEMU's edu
    # device, a DMA engine, is bound the same way: tests/dma_map.rs moves bytes through our MAPs.
    # A second edu alone behind a PCIe root port has a bus reset (one on the root bus has none):
    # tests/passthrough.rs runs the README's launcher on it and resets it as QEMU does.
    "${VM_DIR}/run-guest.sh" "$kimg" "${work}/initramfs.cpio.gz" "$log" "$tmo" viommu.test=/test.sh \
        iommufd.allow_unsafe_interrupts=1 \
        -- -device virtio-iommu-pci -device pci-testdev -device edu \
        -device pcie-root-port,id=rp1,chassis=1 -device edu,bus=rp1 || rc=$?
    [ -f "$log" ] || : >"$log" # run-guest.sh may have failed before creating it
    clean="$(tr -d '\r' <"$log")"
    passed="$(grep -c '^PASS ' <<<"$clean" || true)"
    failed="$(grep -c '^FAIL ' <<<"$clean" || true)"
    skipped="$(grep -c '^SKIP ' <<<"$clean" || true)"
    grep -E '^(PASS|FAIL|SKIP|dma-note:) ' <<<"$clean" | sed "s/^/[vm]   ${kver}: /" >&2 || true
    if [ "$skipped" -gt 0 ]; then
        {
            echo "[vm] !!"
            grep -E '^SKIP ' <<<"$clean" | sed "s/^SKIP /[vm] !! ${kver}: SKIPPED /"
            echo "[vm] !!"
        } >&2
        extra_skip=", ${skipped} SKIPPED (see above)"
    else
        extra_skip=""
    fi
    # Benchmark lines the guest programs printed, for the record.
    grep -E '^(ioas-path|nested|fault-relay)(-detail|-batch-detail)? ' <<<"$clean" | sed "s/^/kernel-tier ${kver}: /" || true
    extra=""
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        # timeout, panic, or the guest test failed without saying which check: count the run itself
        failed=1
        extra=" (guest run failed: exit ${rc}; log ${log})"
    fi
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] || ok=1
    [ "$passed" -gt 0 ] || [ -n "$extra" ] || extra=" (no checks ran; log ${log})"
    result "kernel-tier ${kver}: ${passed} passed, ${failed} failed${extra_skip}${extra}"
    # Real DMA through the tables we bind (tests/dma_map.rs), counted in the totals above too.
    dma_line "kernel-tier ${kver}" dma_map "$clean" || ok=1
    return "$ok"
}

# nested_boot KVER KIMG: the dedicated boot with QEMU 11 in the guest (mknested.sh,
# guest/nested.sh); status 1 if anything failed. No QEMU 11 (fetch-qemu.sh failed, e.g. no
# network): SKIPPED, loudly.
nested_boot() {
    local kver="$1" kimg="$2" log rc=0 passed failed clean extra=""
    log="${logdir}/kernel-tier-${kver}-nested.log"
    if ! "${VM_DIR}/fetch-qemu.sh" qemu-system-x86 >/dev/null 2>"${work}/mknested.err"; then
        cat "${work}/mknested.err" >&2
        {
            echo "[vm] !!"
            echo "[vm] !! ${kver}: nested QEMU 11 SKIPPED: fetch-qemu.sh failed ($(tail -n 1 "${work}/mknested.err"))"
            echo "[vm] !!"
        } >&2
        result "kernel-tier ${kver} nested-qemu: SKIPPED (no QEMU 11: $(tail -n 1 "${work}/mknested.err"))"
        return 0
    fi
    if ! "${VM_DIR}/mknested.sh" "${work}/nested.cpio.gz" "$kimg" \
        "${nested_test}:/bin/passthrough_qemu" 2>"${work}/mknested.err"; then
        cat "${work}/mknested.err" >&2
        result "kernel-tier ${kver} nested-qemu: 0 passed, 1 failed (mknested.sh failed)"
        return 1
    fi
    cat "${work}/mknested.err" >&2
    # The ordinary initramfs, then the nested archive over it (NUL padding between is skipped).
    {
        cat "${work}/initramfs.cpio.gz"
        dd if=/dev/zero bs=1 count=$(((512 - $(stat -c %s "${work}/initramfs.cpio.gz") % 512) % 512)) status=none
        cat "${work}/nested.cpio.gz"
    } >"${work}/initramfs-nested.cpio.gz"
    # The same machine as the ordinary boot, for the edu behind rp1; QEMU in the guest needs time.
    "${VM_DIR}/run-guest.sh" "$kimg" "${work}/initramfs-nested.cpio.gz" "$log" \
        "$((tmo + ${VIOMMU_NESTED_BOOT_S:-0} + 600))" viommu.test=/nested.sh \
        "viommu.args=${VIOMMU_NESTED_BOOT_S:-0}" iommufd.allow_unsafe_interrupts=1 \
        -- -device virtio-iommu-pci -device pcie-root-port,id=rp1,chassis=1 -device edu,bus=rp1 || rc=$?
    rm -f "${work}/initramfs-nested.cpio.gz" "${work}/nested.cpio.gz"
    [ -f "$log" ] || : >"$log"
    clean="$(tr -d '\r' <"$log")"
    passed="$(grep -c '^PASS ' <<<"$clean" || true)"
    failed="$(grep -c '^FAIL ' <<<"$clean" || true)"
    grep -E '^(PASS|FAIL|SKIP|dma-note:) ' <<<"$clean" | sed "s/^/[vm]   ${kver} nested: /" >&2 || true
    grep -E '^nested-qemu ' <<<"$clean" | sed "s/^/kernel-tier ${kver}: /" || true
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed=1
        extra=" (guest run failed: exit ${rc}; log ${log})"
    fi
    [ "$passed" -gt 0 ] || [ -n "$extra" ] || extra=" (no checks ran; log ${log})"
    result "kernel-tier ${kver} nested-qemu: ${passed} passed, ${failed} failed${extra}"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
}

for spec in $kernels; do
    vm_log "=== kernel ${spec} ==="
    if ! src="$("${VM_DIR}/fetch-kernel-source.sh" "$spec")"; then
        result "kernel-tier ${spec}: 0 passed, 1 failed (kernel source fetch failed)"
        overall=1
        continue
    fi
    # 7.x: the tree patched with contrib/linux (inert here: QEMU's virtio-iommu), shared with
    # the guest tier, so the x86 tiers build one 7.x kernel.
    if ! src="$("${VM_DIR}/x86-kernel-source.sh" "$src")" || ! kimg="$("${VM_DIR}/build-kernel.sh" "$src")"; then
        result "kernel-tier ${spec}: 0 passed, 1 failed (kernel patch/configure/build failed)"
        overall=1
        continue
    fi
    kver="$(sed -n 's/^kernel //p' "$(dirname "$kimg")/info")"
    if [ "${VIOMMU_VM_NESTED:-1}" != only ]; then
        ordinary_boot "$kver" "$kimg" || overall=1
    fi
    if [ "${VIOMMU_VM_NESTED:-1}" != 0 ] && [ "${kver%%.*}" -ge 7 ]; then
        nested_boot "$kver" "$kimg" || overall=1
    fi
done

if [ -z "${VIOMMU_VFIO_CDEV:-}" ]; then
    {
        echo "[vm] !!"
        echo "[vm] !! kernel-tier hardware run SKIPPED: set VIOMMU_VFIO_CDEV=/dev/vfio/devices/vfioN to use real VFIO hardware"
        echo "[vm] !!"
    } >&2
    result "kernel-tier hardware: SKIPPED (VIOMMU_VFIO_CDEV not set)"
else
    # On this host, against the operator's VFIO device: the same test the guests run.
    vm_log "=== hardware: ${VIOMMU_VFIO_CDEV} ==="
    hwlog="${logdir}/kernel-tier-hardware.log"
    hrc=0
    (cd "$repo" && VIOMMU_VFIO_CDEV="$VIOMMU_VFIO_CDEV" cargo test --release --test vfio_endpoints \
        -- --ignored --test-threads=1) >"$hwlog" 2>&1 || hrc=$?
    hp="$(grep -c '^test .* \.\.\. ok$' "$hwlog" || true)"
    hf="$(grep -c '^test .* \.\.\. FAILED$' "$hwlog" || true)"
    [ "$hrc" -eq 0 ] || [ "$hf" -gt 0 ] || hf=1
    [ "$hf" -eq 0 ] && [ "$hp" -gt 0 ] || overall=1
    result "kernel-tier hardware ${VIOMMU_VFIO_CDEV}: ${hp} passed, ${hf} failed (log ${hwlog})"
fi

exit "$overall"
