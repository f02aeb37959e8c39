#!/usr/bin/env bash
# The arm64 kernel tier: ARM SMMUv3 nesting through Linux iommufd, under QEMU/TCG.
#
# Fetches (cached under ${VIOMMU_VM_CACHE:-~/.cache/vhost-device-iommu/vm}):
#   - the cross toolchain (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross; machine's own suites)
#   - Rust's aarch64-unknown-linux-gnu standard library (rustup target add, if missing)
#   - QEMU 11 qemu-system-aarch64 (qemu-system-arm from trixie-backports; fetch-qemu.sh)
#   - a static arm64 busybox (busybox-static:arm64 from the machine's own suites; fetch-busybox.sh)
#   - the same linux-source 7.x tree as the x86 tier (fetch-kernel-source.sh), copied with
#     hardlinks and patched with arm64/smmu-canwbs.patch (patch-kernel-source.sh; TEST-ONLY patch,
#     see the patch), then built with VIOMMU_VM_ARCH=arm64 build-kernel.sh (tinyconfig +
#     kernel-arm64.fragment, target Image)
# builds arm64/smmu3-check.c static against that tree's uapi headers (`make headers`, cached),
# builds (or takes) a static aarch64 vhost-device-iommu, makes the initramfs (arm64/smoke.sh as
# /test.sh), boots `qemu-system-aarch64 -M virt,iommu=smmuv3,gic-version=3 -cpu max
# -device pci-testdev -device edu` and
# prints two lines:
#   kernel-tier arm64 <kernel version>: N passed, M failed
#   kernel-tier arm64 <kernel version>: dma-through-tables N passed, M failed
# counting the PASS/FAIL lines of the console (the second: those of tests/dma_smmu3.rs, real DMA
# of QEMU's edu device through a stage-1 table we bind; they count in the first line too). Exit status non-zero if anything failed.
#
# Env: VIOMMU_ARM64_TESTS="p1 p2"        more static aarch64 programs: copied to /bin/<name> and
#                                         run after the smoke checks, each one test (exit 0 = pass)
#      VIOMMU_ARM64_CARGO_TESTS="t1 t2"  static aarch64 libtest executables (cargo test --no-run
#                                         --target aarch64-unknown-linux-gnu; unset: built here,
#                                         tests/smmu3_endpoints.rs, tests/vfio_endpoints.rs and
#                                         tests/dma_smmu3.rs); copied to
#                                         /bin/<name without -hash> and run with
#                                         `--ignored --test-threads=1`, VIOMMU_BIN and
#                                         VIOMMU_VFIO_CDEV set; one check per `test ... ok|FAILED`
#      VIOMMU_ARM64_BACKEND=PATH         static aarch64 vhost-device-iommu for /bin/vhost-device-iommu;
#                                         unset: built here (cargo build --release --target
#                                         aarch64-unknown-linux-gnu, +crt-static; honours
#                                         CARGO_TARGET_DIR); `none`: leave it out
#      VIOMMU_ARM64_KERNEL=7.x           fetch-kernel-source.sh VERSIONSPEC
#      VIOMMU_ARM64_TIMEOUT=300          boot timeout (s)
#      VIOMMU_ARM64_APPEND               more kernel args (e.g. iommufd.allow_unsafe_interrupts=1)
#      VIOMMU_ARM64_QEMU_ARGS            more QEMU args (e.g. `-d guest_errors,unimp -D FILE`)
#      VIOMMU_ARM64_MACHINE=virt,iommu=smmuv3,gic-version=3   QEMU machine
#      plus VIOMMU_VM_CACHE, VIOMMU_VM_VERBOSE, VIOMMU_VM_JOBS, VIOMMU_VM_MEM, VIOMMU_VM_SMP, ...
# Console log: ${VIOMMU_VM_CACHE:-~/.cache/vhost-device-iommu/vm}/logs/arm64-tier-<version>.log
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tmo="${VIOMMU_ARM64_TIMEOUT:-300}"
# VIOMMU_VM_LOGDIR: a private place for the console logs (two worktrees running a tier at once
# would otherwise write, and count, the same per-version log).
logdir="${VIOMMU_VM_LOGDIR:-${VM_CACHE}/logs}"
mkdir -p "$logdir"
repo="$(cd "${VM_DIR}/../.." && pwd)"
triple=aarch64-unknown-linux-gnu
work="$(mktemp -d "${TMPDIR:-/tmp}/viommu-arm64-tier.XXXXXX")"
trap 'rm -rf "$work"' EXIT
t_start="$(date +%s)"
elapsed() { echo $(($(date +%s) - t_start)); }

# A failure before the boot still prints the one result line.
result_fail() {
    printf 'kernel-tier arm64 %s: 0 passed, 1 failed (%s)\n' "${kver:-${VIOMMU_ARM64_KERNEL:-7.x}}" "$1"
    exit 1
}

# ---- toolchain, QEMU, busybox ----
vm_need_pkgs gcc-aarch64-linux-gnu libc6-dev-arm64-cross make
# Rust's aarch64 standard library for the cross builds below (once per machine).
if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
    vm_log "rustup target add ${triple}"
    rustup target add "$triple" >&2 || result_fail "rustup target add ${triple} failed"
fi
qemu="$("${VM_DIR}/fetch-qemu.sh" qemu-system-arm)" || result_fail "QEMU fetch failed"
busybox="$("${VM_DIR}/fetch-busybox.sh" arm64)" || result_fail "busybox fetch failed"
vm_log "qemu ${qemu}, busybox ${busybox} ($(elapsed) s)"

# ---- kernel: same source tree as the x86 tier, patched copy, arm64 build ----
src="$("${VM_DIR}/fetch-kernel-source.sh" "${VIOMMU_ARM64_KERNEL:-7.x}")" || result_fail "kernel source fetch failed"
psrc="$("${VM_DIR}/patch-kernel-source.sh" "$src" "${VM_DIR}/arm64/smmu-canwbs.patch")" ||
    result_fail "patching the kernel source failed"
t_k="$(date +%s)"
kimg="$(VIOMMU_VM_ARCH=arm64 "${VM_DIR}/build-kernel.sh" "$psrc")" || result_fail "kernel configure/build failed"
kver="$(sed -n 's/^kernel //p' "$(dirname "$kimg")/info")"
vm_log "kernel ${kver}: ${kimg} ($(($(date +%s) - t_k)) s; build_seconds $(sed -n 's/^build_seconds //p' "$(dirname "$kimg")/info"))"

# ---- uapi headers of that tree (make headers, out of tree), cached ----
hdr="${VM_CACHE}/headers/$(basename "$(dirname "$psrc")")-arm64"
if [ ! -f "${hdr}/.complete" ]; then
    vm_lock "headers-$(basename "$hdr")"
    if [ ! -f "${hdr}/.complete" ]; then
        vm_log "make headers (arm64) from ${psrc}"
        rm -rf "${hdr}" "${hdr}.tmp" "${hdr}.obj"
        nice -n 15 make -s -C "$psrc" O="${hdr}.obj" ARCH=arm64 headers >"${work}/headers.log" 2>&1 || {
            tail -n 20 "${work}/headers.log" >&2
            result_fail "make headers failed"
        }
        mkdir -p "${hdr}.tmp"
        cp -a "${hdr}.obj/usr/include" "${hdr}.tmp/include"
        find "${hdr}.tmp/include" -name '.*' -type f -delete
        rm -rf "${hdr}.obj"
        touch "${hdr}.tmp/.complete"
        mv "${hdr}.tmp" "$hdr"
    fi
fi

# ---- guest programs ----
check_bin="${work}/smmu3-check"
aarch64-linux-gnu-gcc -static -O2 -Wall -Wextra -Werror -I "${hdr}/include" \
    -o "$check_bin" "${VM_DIR}/arm64/smmu3-check.c" || result_fail "building smmu3-check failed"

backend="${VIOMMU_ARM64_BACKEND:-}"
if [ -z "$backend" ]; then
    vm_log "building the static aarch64 vhost-device-iommu (cargo, --target ${triple}) ($(elapsed) s)"
    t_c="$(date +%s)"
    # An explicit --target keeps build scripts and proc macros dynamic (host).
    backend="$(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        nice -n 15 cargo build --release --target "$triple" --bin vhost-device-iommu \
        --message-format=json-render-diagnostics 2>"${work}/cargo.err" |
        grep '"name":"vhost-device-iommu"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)" || true
    if [ -z "$backend" ] || [ ! -f "$backend" ]; then
        tail -n 40 "${work}/cargo.err" >&2
        result_fail "cross build of vhost-device-iommu failed"
    fi
    vm_log "backend: ${backend} ($(($(date +%s) - t_c)) s)"
fi

# The socket-level tests against the VFIO device behind the SMMUv3 (tests/smmu3_endpoints.rs,
# tests/vfio_endpoints.rs), unless the caller names its own.
if [ -z "${VIOMMU_ARM64_CARGO_TESTS+set}" ]; then
    vm_log "building the static aarch64 socket tests smmu3_endpoints, vfio_endpoints, dma_smmu3 ($(elapsed) s)"
    VIOMMU_ARM64_CARGO_TESTS="$(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        nice -n 15 cargo test --release --target "$triple" --no-run --test smmu3_endpoints \
        --test vfio_endpoints --test dma_smmu3 --message-format=json-render-diagnostics 2>"${work}/cargo-tests.err" |
        grep -E '"name":"((smmu3|vfio)_endpoints|dma_smmu3)"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' |
        tr '\n' ' ')" || true
    if [ "$(wc -w <<<"$VIOMMU_ARM64_CARGO_TESTS")" -ne 3 ]; then
        tail -n 40 "${work}/cargo-tests.err" >&2
        result_fail "cross build of the socket tests failed"
    fi
fi

files=("${VM_DIR}/arm64/smoke.sh:/test.sh" "${VM_DIR}/guest/libtest.sh:/lib/viommu-libtest.sh"
    "${check_bin}:/bin/smmu3-check")
if [ "$backend" != none ]; then
    [ -f "$backend" ] || result_fail "VIOMMU_ARM64_BACKEND: no such file: $backend"
    files+=("${backend}:/bin/vhost-device-iommu")
fi
: >"${work}/viommu-tests"
declare -A seen=([smmu3-check]=1 [vhost-device-iommu]=1)
# shellcheck disable=SC2086 # space-separated lists
for t in ${VIOMMU_ARM64_TESTS:-}; do
    [ -f "$t" ] || result_fail "VIOMMU_ARM64_TESTS: no such file: $t"
    name="$(basename "$t")"
    [ -z "${seen[$name]:-}" ] || result_fail "two guest programs named $name"
    seen[$name]=1
    files+=("${t}:/bin/${name}")
    printf '/bin/%s\n' "$name" >>"${work}/viommu-tests"
done
files+=("${work}/viommu-tests:/etc/viommu-tests")
: >"${work}/viommu-cargo-tests"
# shellcheck disable=SC2086
for t in ${VIOMMU_ARM64_CARGO_TESTS:-}; do
    [ -f "$t" ] || result_fail "VIOMMU_ARM64_CARGO_TESTS: no such file: $t"
    name="$(basename "$t" | sed 's/-[0-9a-f]*$//')"
    [ -z "${seen[$name]:-}" ] || result_fail "two guest programs named $name"
    seen[$name]=1
    files+=("${t}:/bin/${name}")
    printf '/bin/%s\n' "$name" >>"${work}/viommu-cargo-tests"
done
files+=("${work}/viommu-cargo-tests:/etc/viommu-cargo-tests")
VIOMMU_VM_BUSYBOX="$busybox" "${VM_DIR}/mkinitramfs.sh" "${work}/initramfs.cpio.gz" "${files[@]}" ||
    result_fail "initramfs build failed"
# Everything in it must be aarch64 (an x86 program would only fail in the guest, confusingly).
for spec in "${files[@]}"; do
    f="${spec%%:/*}"
    if [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        m="$(LC_ALL=C readelf -h "$f" | sed -n 's/^ *Machine: *//p')"
        [ "$m" = AArch64 ] || result_fail "$f is a ${m} ELF file, not AArch64"
    fi
done

# ---- boot ----
log="${logdir}/arm64-tier-${kver}.log"
rc=0
t_b="$(date +%s.%N)"
# The virt machine's SMMUv3 is in nested mode (S1P+S2P) by default on current machine types
# (hw/arm/virt.c sets stage=nested unless the machine type is older than 9.1); the -global makes
# that explicit. gic-version=3: the virt default is GICv2 (+GICv2m, no MSI isolation); the GICv3
# ITS gives MSI isolation, so iommufd binds the device without allow_unsafe_interrupts.
# shellcheck disable=SC2086 # VIOMMU_ARM64_APPEND and _QEMU_ARGS are lists of words
VIOMMU_VM_QEMU="$qemu" VIOMMU_VM_ACCEL=tcg VIOMMU_VM_CPU="${VIOMMU_ARM64_CPU:-max}" \
    VIOMMU_VM_MACHINE="${VIOMMU_ARM64_MACHINE:-virt,iommu=smmuv3,gic-version=3}" VIOMMU_VM_CONSOLE=ttyAMA0 \
    "${VM_DIR}/run-guest.sh" "$kimg" "${work}/initramfs.cpio.gz" "$log" "$tmo" viommu.test=/test.sh \
    ${VIOMMU_ARM64_APPEND:-} -- -global arm-smmuv3.stage=nested -device pci-testdev -device edu \
    ${VIOMMU_ARM64_QEMU_ARGS:-} || rc=$?
boot_s="$(printf '%.1f' "$(echo "$(date +%s.%N) - $t_b" | bc)")"
[ -f "$log" ] || : >"$log"
clean="$(tr -d '\r' <"$log")"
passed="$(grep -c '^PASS ' <<<"$clean" || true)"
failed="$(grep -c '^FAIL ' <<<"$clean" || true)"
grep -E '^(PASS|FAIL|SKIP) ' <<<"$clean" | sed "s/^/[vm]   arm64 ${kver}: /" >&2 || true
grep -E '^(smmu3|dma-note): ' <<<"$clean" | sed "s/^/[vm]   arm64 ${kver}: /" >&2 || true
vm_log "boot + tests: ${boot_s} s (total $(elapsed) s); console log: ${log}"
extra=""
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    # timeout, panic, or the guest test failed without saying which check: count the run itself
    failed=1
    extra=" (guest run failed: exit ${rc}; log ${log})"
fi
[ "$passed" -gt 0 ] || [ -n "$extra" ] || extra=" (no checks ran; log ${log})"
printf 'kernel-tier arm64 %s: %s passed, %s failed%s\n' "$kver" "$passed" "$failed" "$extra"
# Real DMA through the tables we bind (tests/dma_smmu3.rs), counted in the totals above too; only
# when that test was built here (a caller's VIOMMU_ARM64_CARGO_TESTS may leave it out).
dma_ok=0
if grep -q '/dma_smmu3-' <<<"${VIOMMU_ARM64_CARGO_TESTS:-}"; then
    dma_line "kernel-tier arm64 ${kver}" dma_smmu3 "$clean" || dma_ok=1
else
    printf 'kernel-tier arm64 %s: dma-through-tables SKIPPED (dma_smmu3 not in VIOMMU_ARM64_CARGO_TESTS)\n' "$kver"
fi
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] && [ "$dma_ok" -eq 0 ]
