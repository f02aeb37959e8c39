#!/usr/bin/env bash
# Fetch and build, ahead of the VM tiers, what they will need: the packages, Rust's aarch64
# standard library, QEMU 11 (x86 and arm), busybox, the kernel sources and the three test kernels
# (7.x and 6.12 for x86, 7.x for arm64). tests/run.sh starts it in the background (nice) while the
# Rust tiers run, so that on a fresh machine the downloads and the kernel builds use the time and
# the cores the Rust tiers leave idle. Each step is one of the tier scripts' own helpers, cached
# and locked exactly as when a tier runs it: a tier that needs something this script is still
# making waits on the same lock, then finds it cached. Nothing here decides a result: a failed
# step is logged and the tier that needs it retries and reports.
#
# Usage: bash tests/vm/prepare.sh   (progress on stderr; exit 0 unless a step failed)
# Env: the tiers' own (VIOMMU_VM_CACHE, VIOMMU_VM_KERNELS, VIOMMU_VM_GUEST_KERNEL,
#      VIOMMU_ARM64_KERNEL, VIOMMU_VM_JOBS, ...).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

t0="$(date +%s)"
status=0
# step WHAT CMD...: run CMD (its stdout is the product's path), log how long it took.
step() {
    local what="$1" t out
    shift
    t="$(date +%s)"
    if out="$("$@")"; then
        vm_log "prepare: ${what} ready: ${out:-ok} ($(($(date +%s) - t)) s, t+$(($(date +%s) - t0)) s)"
        printf '%s\n' "$out"
    else
        vm_log "prepare: ${what} FAILED (the tier that needs it will retry and report)"
        status=1
        return 1
    fi
}

# Downloads first: they need the network, not the CPU.
step "packages" vm_need_pkgs make gcc bc bison flex libelf-dev libssl-dev cpio gzip \
    busybox-static qemu-system-x86 gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
    step "Rust aarch64 std" rustup target add aarch64-unknown-linux-gnu >/dev/null
fi
step "QEMU 11 x86" "${VM_DIR}/fetch-qemu.sh" >/dev/null
step "QEMU 11 arm" "${VM_DIR}/fetch-qemu.sh" qemu-system-arm >/dev/null
step "busybox arm64" "${VM_DIR}/fetch-busybox.sh" arm64 >/dev/null
declare -A src=()
for spec in ${VIOMMU_VM_KERNELS:-7.x 6.12} ${VIOMMU_VM_GUEST_KERNEL:-7.x} ${VIOMMU_ARM64_KERNEL:-7.x}; do
    [ -n "${src[$spec]:-}" ] && continue
    src[$spec]="$(step "kernel source ${spec}" "${VM_DIR}/fetch-kernel-source.sh" "$spec")" || {
        src[$spec]=""
        status=1
    }
done

# Then the builds, in the order the tiers need them.
# x86: a 7.x tree is built patched with contrib/linux (x86-kernel-source.sh), as the tiers do.
x86_kernel() { "${VM_DIR}/build-kernel.sh" "$("${VM_DIR}/x86-kernel-source.sh" "$1")"; }
for spec in ${VIOMMU_VM_KERNELS:-7.x 6.12}; do
    [ -n "${src[$spec]}" ] && step "x86 kernel ${spec}" x86_kernel "${src[$spec]}" >/dev/null
done
arm="${src[${VIOMMU_ARM64_KERNEL:-7.x}]}"
if [ -n "$arm" ] && psrc="$(step "patched arm64 source" "${VM_DIR}/patch-kernel-source.sh" "$arm" \
    "${VM_DIR}/arm64/smmu-canwbs.patch")" || {
    status=1
    false
}; then
    step "arm64 kernel" env VIOMMU_VM_ARCH=arm64 "${VM_DIR}/build-kernel.sh" "$psrc" >/dev/null
fi
vm_log "prepare: done in $(($(date +%s) - t0)) s (status ${status})"
exit "$status"
