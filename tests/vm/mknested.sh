#!/usr/bin/env bash
# The extra initramfs archive of the kernel tier's nested boot: QEMU 11 (fetch-qemu.sh's
# qemu-system-x86_64, the libraries its loader resolves in the prefix, that loader, and the three
# firmware files a q35 `-kernel` boot reads) and a second-level guest (KERNEL, the test kernel
# itself, with a tiny initramfs: a marker and power off, or with viommu.l2=edu guest/edu-vfio.c on
# the edu QEMU assigns), plus guest/nested.sh as /nested.sh. The kernel unpacks it over the
# ordinary test initramfs when both are concatenated (kernel-tier.sh does that), so the ordinary
# boot stays as it is.
#
# Usage: mknested.sh OUT.cpio.gz KERNEL [FILE:/DEST ...]   (FILEs copied to /DEST, e.g. a test)
# In the guest: /opt/qemu/qemu-system-x86_64 (a wrapper: `/opt/qemu/lib/ld-linux-x86-64.so.2
# --library-path /opt/qemu/lib /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share "$@"`),
# /opt/nested/bzImage, /opt/nested/initramfs.cpio.gz.
# The QEMU part (~70 MB before compression) is built once per QEMU version and cached under
# ${VM_CACHE}/nested-qemu/<version>/qemu-<hash of this script>.cpio.gz. Progress on stderr.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -ge 2 ] || vm_die "usage: $0 OUT.cpio.gz KERNEL [FILE:/DEST ...]"
out="$1" kernel="$2"
shift 2
[ -f "$kernel" ] || vm_die "no kernel $kernel"
if [ "$(id -u)" -ne 0 ] && [ -z "${FAKEROOTKEY:-}" ]; then
    command -v fakeroot >/dev/null || vm_die "needs root or fakeroot (for the /dev nodes)"
    exec fakeroot -- "$0" "$@"
fi

wrapper="$("${VM_DIR}/fetch-qemu.sh" qemu-system-x86)"
prefix="$(sed -n "s/^P='\(.*\)'$/\1/p" "$wrapper")"
[ -x "${prefix}/usr/bin/qemu-system-x86_64" ] || vm_die "no QEMU in the prefix of $wrapper"
cache="${VM_CACHE}/nested-qemu/$(basename "$(dirname "$wrapper")")"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

stage="$(mktemp -d "${TMPDIR:-/tmp}/viommu-nested.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# ---- QEMU, cached ----
archive="${cache}/qemu-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12).cpio.gz"
if [ ! -f "$archive" ]; then
    vm_lock nested-qemu
fi
if [ ! -f "$archive" ]; then
    # Those of older versions of this script go.
    rm -f "${cache}"/qemu*.cpio.gz*
    q="${stage}/q"
    mkdir -p "${q}/opt/qemu/bin" "${q}/opt/qemu/lib" "${q}/opt/qemu/share"
    loader="${prefix}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    libpath="${prefix}/usr/lib/x86_64-linux-gnu:${prefix}/lib/x86_64-linux-gnu"
    cp "${prefix}/usr/bin/qemu-system-x86_64" "${q}/opt/qemu/bin/"
    cp -L "$loader" "${q}/opt/qemu/lib/ld-linux-x86-64.so.2"
    # The libraries the prefix's loader resolves (all of them in the prefix: checked).
    n=0
    while read -r lib; do
        case "$lib" in
            "${prefix}"/*) cp -L "$lib" "${q}/opt/qemu/lib/" ;;
            *) vm_die "QEMU's library $lib resolves outside the prefix" ;;
        esac
        n=$((n + 1))
    done < <("$loader" --library-path "$libpath" --list "${prefix}/usr/bin/qemu-system-x86_64" |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
    [ "$n" -gt 10 ] || vm_die "only $n libraries for QEMU: the loader's list looks wrong"
    # q35 reads the BIOS and the vapic ROM at machine init; -kernel adds the linuxboot option ROM.
    # With -nodefaults and no NIC nothing else is read.
    cp "${prefix}/usr/share/seabios/bios-256k.bin" "${prefix}/usr/share/qemu/linuxboot_dma.bin" \
        "${prefix}/usr/share/qemu/kvmvapic.bin" "${q}/opt/qemu/share/"
    cat >"${q}/opt/qemu/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
# tests/vm/mknested.sh: QEMU 11 with its own loader and libraries.
exec /opt/qemu/lib/ld-linux-x86-64.so.2 --library-path /opt/qemu/lib \
    /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share "$@"
WRAP
    chmod 0755 "${q}/opt/qemu/qemu-system-x86_64"
    (cd "$q" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
        gzip -n -6 >"${archive}.tmp"
    mv "${archive}.tmp" "$archive"
    vm_log "nested QEMU archive ${archive} ($(stat -c %s "$archive") bytes, ${n} libraries)"
fi

# ---- the second-level guest: this kernel, a tiny initramfs ----
vm_need_pkgs busybox-static cpio gzip gcc libc6-dev
t="${stage}/tiny"
mkdir -p "${t}/bin" "${t}/dev"
cp /bin/busybox "${t}/bin/busybox"
mknod -m 0600 "${t}/dev/console" c 5 1
# Plain: the marker, power off (the boot-time measurement). viommu.l2=edu (tests/passthrough_qemu.rs):
# the edu QEMU assigns at 00:04.0 to vfio-pci, edu-vfio's checks, the marker, then wait for QEMU's
# system_reset (the host's QMP) and do it all again.
cat >"${t}/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo NESTED-L2-UP
if grep -q viommu.l2=edu /proc/cmdline; then
    d=/sys/bus/pci/devices/0000:00:04.0
    echo vfio-pci >"$d/driver_override"
    [ -e "$d/driver" ] && echo 0000:00:04.0 >"$d/driver/unbind"
    echo 0000:00:04.0 >/sys/bus/pci/drivers_probe
    /bin/edu-vfio 0000:00:04.0
    echo "L2-EDU-DONE status=$? uptime_s=$(cut -d" " -f1 /proc/uptime)"
    while :; do sleep 3600; done
fi
poweroff -f
INIT
gcc -static -O2 -Wall -o "${t}/bin/edu-vfio" "${VM_DIR}/guest/edu-vfio.c" || vm_die "cannot build guest/edu-vfio.c"
chmod 0755 "${t}/init"
n="${stage}/n"
mkdir -p "${n}/opt/nested"
(cd "$t" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -n -9 >"${n}/opt/nested/initramfs.cpio.gz"
cp "$kernel" "${n}/opt/nested/bzImage"
install -m 0755 "${VM_DIR}/guest/nested.sh" "${n}/nested.sh"
for spec in "$@"; do
    [[ "$spec" =~ ^(.+):(/.+)$ ]] || vm_die "want FILE:/DEST, got $spec"
    [ -f "${BASH_REMATCH[1]}" ] || vm_die "no such file: ${BASH_REMATCH[1]}"
    mkdir -p "$(dirname "${n}${BASH_REMATCH[2]}")"
    install -m 0755 "${BASH_REMATCH[1]}" "${n}${BASH_REMATCH[2]}"
done
(cd "$n" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -n -6 >"${stage}/rest.cpio.gz"

# Concatenated archives: the kernel unpacks each in turn (NUL padding between them is skipped).
pad() { dd if=/dev/zero bs=1 count=$(((512 - $(stat -c %s "$1") % 512) % 512)) status=none; }
{
    cat "$archive"
    pad "$archive"
    cat "${stage}/rest.cpio.gz"
} >"${out}.tmp"
mv "${out}.tmp" "$out"
vm_log "nested archive $out ($(stat -c %s "$out") bytes)"
