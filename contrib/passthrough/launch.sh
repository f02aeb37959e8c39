#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Start QEMU with a passthrough (VFIO cdev) device whose DMA our virtio-iommu backend governs:
# open /dev/iommu and the cdev once and hand the same open files to both processes, as libvirt
# hands fds to QEMU. See README.md here and spec-notes/passthrough.md. POSIX sh (busybox will do).
#
# usage: launch.sh --cdev /dev/vfio/devices/vfioN --endpoint 0x20
#                  [--backend vhost-device-iommu] [--backend-arg ARG]...
#                  [--socket PATH] -- qemu-system-x86_64 ARGS...
#
# In the QEMU arguments, {IOMMUFD}, {CDEV} and {SOCKET} are replaced by the iommufd's fd number,
# the cdev's fd number and the socket's path. QEMU must realize -device vfio-pci before the
# vhost-user device (command-line order). Exit status: QEMU's.
#
# The backend creates the vhost-user socket (--socket-path): with a vfio-bound-fd endpoint it
# listens before it waits for QEMU's bind, and QEMU starts only once the socket exists (QEMU
# connects when it creates the chardev, before it realizes vfio-pci).
set -eu

die() { echo "launch.sh: $*" >&2; exit 2; }
usage() { sed -n '7,9s/^# //p' "$0" >&2; exit 2; }

cdev="" endpoint="" iommu=/dev/iommu backend=vhost-device-iommu socket="" wait_s=30
# The backend's extra arguments, each single-quoted, for eval.
bargs=""
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cdev) [ $# -ge 2 ] || usage; cdev="$2"; shift 2 ;;
        --endpoint) [ $# -ge 2 ] || usage; endpoint="$2"; shift 2 ;;
        --iommu) [ $# -ge 2 ] || usage; iommu="$2"; shift 2 ;;
        --backend) [ $# -ge 2 ] || usage; backend="$2"; shift 2 ;;
        --backend-arg) [ $# -ge 2 ] || usage; bargs="$bargs $(quote "$2")"; shift 2 ;;
        --socket) [ $# -ge 2 ] || usage; socket="$2"; shift 2 ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
[ -n "$cdev" ] && [ -n "$endpoint" ] || usage
[ $# -gt 0 ] || die "no QEMU command after --"
if [ -z "$socket" ]; then
    dir="$(mktemp -d "${TMPDIR:-/tmp}/viommu-XXXXXX")" || die "mktemp failed"
    socket="$dir/viommu.sock"
fi
[ ! -e "$socket" ] || die "$socket exists"

# One open file each, as fds 3 and 4 of both children: the kernel binds a cdev once (QEMU does
# it), and the iommufd objects of both processes must live in one context.
exec 3<>"$iommu" || die "cannot open $iommu"
exec 4<>"$cdev" || die "cannot open $cdev"

# Replace {IOMMUFD}, {CDEV} and {SOCKET} in QEMU's arguments (rebuilding "$@").
n=$#
while [ "$n" -gt 0 ]; do
    a="$1"
    shift
    out=""
    while :; do
        case "$a" in
            *"{IOMMUFD}"*) out="$out${a%%\{IOMMUFD\}*}3"; a="${a#*\{IOMMUFD\}}" ;;
            *"{CDEV}"*) out="$out${a%%\{CDEV\}*}4"; a="${a#*\{CDEV\}}" ;;
            *"{SOCKET}"*) out="$out${a%%\{SOCKET\}*}$socket"; a="${a#*\{SOCKET\}}" ;;
            *) out="$out$a"; break ;;
        esac
    done
    set -- "$@" "$out"
    n=$((n - 1))
done

# The backend: no stdin, its stdout to our stderr (QEMU owns the terminal). `exec`: $! must be
# the backend itself, not a subshell around it, or the kill below would miss it.
eval "exec \"\$backend\" --socket-path \"\$socket\" --iommufd-fd 3 \
    --endpoint \"\$endpoint,vfio-bound-fd=4\" $bargs" </dev/null >&2 &
bpid=$!
cleanup() {
    kill "$bpid" 2>/dev/null || :
    wait "$bpid" 2>/dev/null || :
    rm -f "$socket"
    [ -z "${dir:-}" ] || rmdir "$dir" 2>/dev/null || :
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# QEMU may start once the socket exists (the backend then waits for QEMU's bind).
i=0
while [ ! -S "$socket" ]; do
    kill -0 "$bpid" 2>/dev/null || die "the backend exited before it listened"
    [ "$i" -lt $((wait_s * 10)) ] || die "no socket at $socket after ${wait_s}s"
    sleep 0.1
    i=$((i + 1))
done

# QEMU in the foreground with fds 3 and 4; ours close when we exit, after both children.
rc=0
"$@" || rc=$?
exit "$rc"
