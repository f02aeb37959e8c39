#!/usr/bin/env bash
# Obtain a Debian linux-source package and unpack it under the cache root.
#
# Usage: fetch-kernel-source.sh VERSIONSPEC
#   VERSIONSPEC  7.x (or 7)  newest linux-source-7.* that trixie-backports offers right now
#                N.x         the same for another major version
#                6.12        linux-source-6.12 from the machine's own security suite (bookworm-security)
#                N.M         linux-source-N.M from the machine's own suites, else trixie-backports
# Prints the unpacked source tree's path on stdout (the only stdout line); progress goes to stderr,
# including which package and version was used.
#
# Packages are fetched with a private apt configuration (own sources.list, lists and cache under
# the cache root, Dir::State::status=/dev/null) whose mirror URIs are copied at run time from
# /etc/apt/sources.list.d/debian.sources. The system's apt sources and lists are not touched.
# Idempotent: an already unpacked version is reused without any download.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -eq 1 ] || vm_die "usage: $0 VERSIONSPEC   (e.g. 7.x or 6.12)"
spec="$1"
own="$(vm_codename)"

if [[ "$spec" =~ ^[0-9]+(\.x)?$ ]]; then
    spec="${spec%.x}.x"
elif ! [[ "$spec" =~ ^[0-9]+\.[0-9]+$ ]]; then
    vm_die "bad VERSIONSPEC '$spec' (want e.g. 7.x or 6.12)"
fi

mkdir -p "${VM_CACHE}/src"
vm_lock fetch-kernel-source

if [[ "$spec" == *.x ]]; then
    major="${spec%.x}"
    vm_papt_init trixie-backports "trixie-backports"
    vm_papt_update
    pkg="$(vm_apt_cache pkgnames "linux-source-${major}." | grep -E "^linux-source-${major}\.[0-9]+$" |
        sort -V | tail -n 1 || true)"
    [ -n "$pkg" ] || vm_die "trixie-backports offers no linux-source-${major}.* package"
else
    pkg="linux-source-${spec}"
    vm_papt_init "$own" "${own}-security ${own}-updates ${own}"
    vm_papt_update
    if [ -z "$(vm_apt_cache show "$pkg" 2>/dev/null | head -n 1)" ]; then
        vm_papt_init trixie-backports "trixie-backports"
        vm_papt_update
    fi
fi

# Newest version of that package in the configured suites.
ver=""
while read -r v; do
    if [ -z "$ver" ] || dpkg --compare-versions "$v" gt "$ver"; then ver="$v"; fi
done < <(vm_apt_cache show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
[ -n "$ver" ] || vm_die "no version of $pkg found (suites: $(cut -d' ' -f4 "${VM_PAPT}/sources.list" | tr '\n' ' '))"

short="${pkg#linux-source-}"
dest="${VM_CACHE}/src/${pkg}_${ver//[~:+]/_}"   # no ~ : + in build paths
tree="${dest}/linux-source-${short}"
vm_log "using ${pkg} ${ver}"

if [ -f "${dest}/.complete" ] && [ -d "$tree" ]; then
    vm_log "cached: $tree"
    printf '%s\n' "$tree"
    exit 0
fi

vm_need_pkgs xz-utils
rm -rf "$dest" "${dest}.tmp"
mkdir -p "${dest}.tmp/deb"
vm_log "downloading ${pkg}=${ver}"
(cd "${dest}.tmp" && vm_apt_get download "${pkg}=${ver}" >&2)
deb="$(find "${dest}.tmp" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
[ -n "$deb" ] || vm_die "apt-get download produced no .deb"
dpkg -x "$deb" "${dest}.tmp/deb"
tarball="$(find "${dest}.tmp/deb/usr/src" -maxdepth 1 -name "linux-source-${short}.tar.*" | head -n 1)"
[ -n "$tarball" ] || vm_die "no /usr/src/linux-source-${short}.tar.* in $deb"
vm_log "unpacking $(basename "$tarball")"
tar -C "${dest}.tmp" -xf "$tarball"
[ -f "${dest}.tmp/linux-source-${short}/Makefile" ] || vm_die "tarball did not contain linux-source-${short}/"
rm -rf "${dest}.tmp/deb" "$deb"
printf '%s %s\n' "$pkg" "$ver" >"${dest}.tmp/.complete"
mv "${dest}.tmp" "$dest"
vm_log "unpacked: $tree"
printf '%s\n' "$tree"
