#!/usr/bin/env bash
# Build the test initramfs: static busybox, guest/init as /init, /dev/console and /dev/null nodes
# (DEVTMPFS_MOUNT does not apply to an initramfs, so they must be in the cpio), plus FILES.
#
# Usage: mkinitramfs.sh OUT.cpio.gz [FILE | FILE:/DEST ...]
#   FILE        copied to /bin/<basename FILE>
#   FILE:/DEST  copied to /DEST (e.g. tests/vm/guest/smoke.sh:/test.sh)
# ELF files must be statically linked (the initramfs has no libc); a dynamically linked one is an
# error unless VIOMMU_VM_ALLOW_DYNAMIC=1. Needs root (mknod) or fakeroot.
# VIOMMU_VM_BUSYBOX=PATH takes busybox from PATH (e.g. an arm64 one from fetch-busybox.sh) instead
# of the host's /bin/busybox (Debian's busybox-static, installed if missing); it must be static too.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -ge 1 ] || vm_die "usage: $0 OUT.cpio.gz [FILE | FILE:/DEST ...]"

if [ "$(id -u)" -ne 0 ] && [ -z "${FAKEROOTKEY:-}" ]; then
    command -v fakeroot >/dev/null || vm_die "needs root or fakeroot (for the /dev nodes)"
    exec fakeroot -- "$0" "$@"
fi

out="$1"
shift
if [ -n "${VIOMMU_VM_BUSYBOX:-}" ]; then
    vm_need_pkgs cpio gzip
    busybox="$VIOMMU_VM_BUSYBOX"
    if [ ! -f "$busybox" ] || ! vm_is_static "$busybox"; then
        vm_die "VIOMMU_VM_BUSYBOX=$busybox is missing or not static"
    fi
else
    vm_need_pkgs busybox-static cpio gzip
    busybox=/bin/busybox
    if [ ! -x "$busybox" ] || ! vm_is_static "$busybox"; then
        vm_die "$busybox is missing or not static (install busybox-static)"
    fi
fi

stage="$(mktemp -d "${TMPDIR:-/tmp}/viommu-initramfs.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
cp "$busybox" "$stage/bin/busybox"
chmod 0755 "$stage/bin/busybox"
install -m 0755 "${VM_DIR}/guest/init" "$stage/init"
mknod -m 0600 "$stage/dev/console" c 5 1
mknod -m 0666 "$stage/dev/null" c 1 3

for spec in "$@"; do
    if [[ "$spec" =~ ^(.+):(/.+)$ ]]; then
        srcf="${BASH_REMATCH[1]}" dest="${BASH_REMATCH[2]}"
    else
        srcf="$spec" dest="/bin/$(basename "$spec")"
    fi
    [ -f "$srcf" ] || vm_die "no such file: $srcf"
    if ! vm_is_static "$srcf"; then
        if [ "${VIOMMU_VM_ALLOW_DYNAMIC:-0}" = 1 ]; then
            vm_log "WARNING: $srcf is dynamically linked; it will not run in the guest"
        else
            vm_die "$srcf is dynamically linked; the guest has no libc (build it static, see tests/vm/README.md)"
        fi
    fi
    [ -e "$stage$dest" ] && vm_die "two FILES map to $dest"
    mkdir -p "$(dirname "$stage$dest")"
    cp "$srcf" "$stage$dest"
    chmod a+rX "$stage$dest"
    [ -x "$srcf" ] && chmod a+x "$stage$dest"
done

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -n -6 >"${out}.tmp"
mv "${out}.tmp" "$out"
vm_log "initramfs $out ($(stat -c %s "$out") bytes, $# extra file(s))"
