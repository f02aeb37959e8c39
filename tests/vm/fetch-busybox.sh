#!/usr/bin/env bash
# Fetch Debian's busybox-static for another architecture (default arm64) from the machine's own
# suites, through a private apt configuration of that architecture, and unpack it into the cache.
#
# Usage: fetch-busybox.sh [ARCH]
# Prints the path of the static busybox binary on stdout (the only stdout line), e.g.
#   ${VM_CACHE}/busybox/arm64/<version>/busybox
# Progress (package and version) goes to stderr. Nothing is installed on the system: the .deb is
# downloaded with `apt-get download` (APT::Architecture=ARCH, own lists under
# ${VM_CACHE}/apt/<codename>-ARCH) and unpacked with `dpkg -x`. Idempotent: a cached binary is
# reused (the lists are refreshed at most once per VIOMMU_VM_APT_TTL).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -le 1 ] || vm_die "usage: $0 [ARCH]   (Debian architecture, default arm64)"
arch="${1:-arm64}"
[[ "$arch" =~ ^[a-z0-9]+$ ]] || vm_die "bad architecture '$arch'"
own="$(vm_codename)"

mkdir -p "${VM_CACHE}/busybox"
vm_lock "fetch-busybox-${arch}"
vm_papt_init "${own}-${arch}" "${own}-security ${own}-updates ${own}" "$arch"
vm_papt_update

ver=""
while read -r v; do
    if [ -z "$ver" ] || dpkg --compare-versions "$v" gt "$ver"; then ver="$v"; fi
done < <(vm_apt_cache show "busybox-static:${arch}" 2>/dev/null | sed -n 's/^Version: //p')
[ -n "$ver" ] || vm_die "no busybox-static for ${arch} in ${own}"
vm_log "using busybox-static:${arch} ${ver} (${own})"

dest="${VM_CACHE}/busybox/${arch}/${ver//[~:+]/_}"
if [ ! -f "${dest}/.complete" ]; then
    rm -rf "${dest}.tmp" "$dest"
    mkdir -p "${dest}.tmp/deb" "${dest}.tmp/x"
    (cd "${dest}.tmp/deb" && vm_apt_get download "busybox-static:${arch}=${ver}" >&2) ||
        vm_die "apt-get download busybox-static:${arch} failed"
    deb="$(find "${dest}.tmp/deb" -maxdepth 1 -name 'busybox-static_*.deb' | head -n 1)"
    [ -n "$deb" ] || vm_die "apt-get download produced no .deb"
    dpkg -x "$deb" "${dest}.tmp/x"
    bb=""
    for c in bin/busybox usr/bin/busybox; do
        [ -f "${dest}.tmp/x/${c}" ] && bb="${dest}.tmp/x/${c}" && break
    done
    [ -n "$bb" ] || vm_die "no bin/busybox in $(basename "$deb")"
    vm_is_static "$bb" || vm_die "$(basename "$deb")'s busybox is not static"
    cp "$bb" "${dest}.tmp/busybox"
    chmod 0755 "${dest}.tmp/busybox"
    rm -rf "${dest}.tmp/deb" "${dest}.tmp/x"
    printf 'busybox-static:%s %s\n' "$arch" "$ver" >"${dest}.tmp/.complete"
    mv "${dest}.tmp" "$dest"
fi
vm_log "busybox: ${dest}/busybox ($(LC_ALL=C readelf -h "${dest}/busybox" | sed -n 's/^ *Machine: *//p'))"
printf '%s\n' "${dest}/busybox"
