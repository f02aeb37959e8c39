#!/usr/bin/env bash
# Boot a test kernel + initramfs in QEMU (TCG by default), stream the serial console to LOG, and exit
# with the guest test's status (from the `VIOMMU-TEST-EXIT <status>` line printed by guest/init).
#
# Usage: run-guest.sh KERNEL INITRAMFS LOG TIMEOUT_S [extra kernel args...] [-- extra qemu args...]
#   e.g. run-guest.sh bzImage initramfs.cpio.gz /tmp/g.log 120 viommu.test=/bin/t viommu.args=a,b \
#            -- -device virtio-iommu-pci -device pci-testdev
# Exit status: the guest test's status; 124 on timeout (QEMU is killed); 125 if the guest ended
# without reporting a status (panic, crash, QEMU error).
# Env: VIOMMU_VM_VERBOSE=1   also copy the console to stdout
#      VIOMMU_VM_ACCEL=kvm   use KVM (-accel kvm -cpu host); default TCG (-accel tcg,thread=multi -cpu max)
#      VIOMMU_VM_QEMU        QEMU binary (default qemu-system-x86_64; Debian's qemu-system-x86 is
#                            installed if missing). Pass -L dirs for other builds after `--`.
#      VIOMMU_VM_CPU, VIOMMU_VM_MEM (1G), VIOMMU_VM_SMP (2), VIOMMU_VM_MACHINE (q35)
#      VIOMMU_VM_APPEND      more kernel args (e.g. quiet)
#      VIOMMU_VM_CONSOLE     kernel console device (default ttyS0; ttyAMA0 for the arm64 virt machine)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -ge 4 ] || vm_die "usage: $0 KERNEL INITRAMFS LOG TIMEOUT_S [kernel args...] [-- qemu args...]"
kernel="$1" initrd="$2" log="$3" tmo="$4"
shift 4
[ -f "$kernel" ] || vm_die "kernel $kernel not found"
[ -f "$initrd" ] || vm_die "initramfs $initrd not found"
if ! [[ "$tmo" =~ ^[1-9][0-9]*$ ]]; then vm_die "TIMEOUT_S must be a positive integer, got '$tmo'"; fi
kargs=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    kargs+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
qargs=("$@")

qemu="${VIOMMU_VM_QEMU:-qemu-system-x86_64}"
if ! command -v "$qemu" >/dev/null; then
    [ -z "${VIOMMU_VM_QEMU:-}" ] || vm_die "VIOMMU_VM_QEMU=$qemu not found"
    vm_need_pkgs qemu-system-x86
fi

if [ "${VIOMMU_VM_ACCEL:-tcg}" = kvm ]; then
    accel=(-accel kvm) cpu="${VIOMMU_VM_CPU:-host}"
else
    # shellcheck disable=SC2054 # the comma belongs to the -accel value
    accel=(-accel tcg,thread=multi) cpu="${VIOMMU_VM_CPU:-max}"
fi
kparts=("console=${VIOMMU_VM_CONSOLE:-ttyS0}" panic=-1 "${kargs[@]}")
# shellcheck disable=SC2206 # VIOMMU_VM_APPEND is a list of words
[ -z "${VIOMMU_VM_APPEND:-}" ] || kparts+=(${VIOMMU_VM_APPEND})
append="${kparts[*]}"
cmd=("$qemu" "${accel[@]}" -M "${VIOMMU_VM_MACHINE:-q35}" -cpu "$cpu" -m "${VIOMMU_VM_MEM:-1G}"
    -smp "${VIOMMU_VM_SMP:-2}" -nographic -no-reboot -nic none
    -kernel "$kernel" -initrd "$initrd" -append "$append" "${qargs[@]}")

mkdir -p "$(dirname "$log")"
{
    printf '# run-guest:'
    printf ' %q' "${cmd[@]}"
    printf '\n'
} >"$log"
t0="$(date +%s.%N)"
rc=0
if [ "${VIOMMU_VM_VERBOSE:-0}" = 1 ]; then
    timeout -k 5 "$tmo" "${cmd[@]}" </dev/null 2>&1 | tee -a "$log" || rc="${PIPESTATUS[0]}"
else
    timeout -k 5 "$tmo" "${cmd[@]}" </dev/null >>"$log" 2>&1 || rc="$?"
fi
secs="$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")"

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    printf '[vm] run-guest: TIMEOUT: the guest did not finish within %s s; QEMU was killed (log: %s)\n' "$tmo" "$log" >&2
    exit 124
fi
status="$(tr -d '\r' <"$log" | { grep -a -o 'VIOMMU-TEST-EXIT [0-9]*' || true; } | tail -n 1 | cut -d' ' -f2)"
if [ -z "$status" ]; then
    printf '[vm] run-guest: the guest ended without VIOMMU-TEST-EXIT (QEMU exit %s after %s s; log: %s); last lines:\n' "$rc" "$secs" "$log" >&2
    tail -n 15 "$log" | tr -d '\r' | sed 's/^/[vm]   /' >&2
    exit 125
fi
vm_log "run-guest: guest test exit status ${status} after ${secs} s (QEMU exit ${rc}; log: ${log})"
exit "$status"
