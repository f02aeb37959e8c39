#!/usr/bin/env bash
# The tree to build an x86 test kernel from: for a 7.x source, a copy patched with the Linux
# virtio-iommu page-table series (contrib/linux/000[1-3]-*.patch, made by patch-kernel-source.sh);
# any other version (6.12) as it is (the series needs drivers/iommu/generic_pt, 7.x only).
# One patched 7.x kernel serves every x86 tier: where the series is inert (QEMU's virtio-iommu
# offers no F_ATTACH_TABLE; virtio_iommu.table_mode=0) the driver behaves as the unpatched one.
#
# Usage: x86-kernel-source.sh SRC_TREE   (as printed by fetch-kernel-source.sh)
# Prints the tree's path on stdout (the only stdout line); progress goes to stderr.
# Env: VIOMMU_VM_UNPATCHED=1  use the 7.x tree unpatched (a kernel without the series).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -eq 1 ] || vm_die "usage: $0 SRC_TREE"
[ -f "$1/Makefile" ] || vm_die "$1 is not a kernel source tree"
kver="$(make -s -C "$1" kernelversion)"
if [ "${kver%%.*}" != 7 ] || [ "${VIOMMU_VM_UNPATCHED:-0}" = 1 ]; then
    printf '%s\n' "$1"
    exit 0
fi
series=("${VM_DIR}/../../contrib/linux/"000[1-9]-*.patch)
[ -f "${series[0]}" ] || vm_die "no patch series in contrib/linux"
exec "${VM_DIR}/patch-kernel-source.sh" "$1" "${series[@]}"
