#!/usr/bin/env bash
# Make a patched copy of an unpacked kernel source tree WITHOUT touching the original (other runs
# build from it concurrently).
#
# Usage: patch-kernel-source.sh SRC_TREE PATCH...
#   Prints the patched tree's path on stdout (the only stdout line); progress goes to stderr.
#
# The copy is a hardlinked one (`cp -al`, same file system, a few seconds and almost no space):
# GNU patch writes each patched file to a new file and renames it into place, so the patched
# files get new inodes and the original tree's inodes are never written. This is checked: every
# patched file must end up with a link count of 1, and the original files' contents must be
# unchanged afterwards. The tree is cached by (source tree, sha256 of the patches in order):
#   ${VM_CACHE}/src-patched/<source dir>-<sha16>/<tree name>/
# and records the patches in <tree>/.viommu-patches (build-kernel.sh folds that file into its
# cache key, so a patched tree never shares a kernel with the unpatched one).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$#" -ge 2 ] || vm_die "usage: $0 SRC_TREE PATCH..."
[ -f "$1/Makefile" ] || vm_die "$1 is not a kernel source tree"
src="$(cd "$1" && pwd)"
shift
patches=()
for p in "$@"; do
    [ -f "$p" ] || vm_die "no such patch: $p"
    patches+=("$(cd "$(dirname "$p")" && pwd)/$(basename "$p")")
done
[ ! -f "${src}/.viommu-patches" ] || vm_die "$src is itself a patched copy; patch the original tree"

sha="$(cat "${patches[@]}" | sha256sum | cut -c1-16)"
name="$(basename "$(dirname "$src")")-${sha}"
dest="${VM_CACHE}/src-patched/${name}"
tree="${dest}/$(basename "$src")"

if [ -f "${dest}/.complete" ] && [ -d "$tree" ]; then
    vm_log "cached patched tree ($(basename "$src") + ${#patches[@]} patch(es), ${sha}): $tree"
    printf '%s\n' "$tree"
    exit 0
fi

vm_need_pkgs patch
mkdir -p "${VM_CACHE}/src-patched"
vm_lock "patch-${name}"
if [ -f "${dest}/.complete" ] && [ -d "$tree" ]; then # made by a concurrent run
    printf '%s\n' "$tree"
    exit 0
fi

t0="$(date +%s)"
rm -rf "${dest}.tmp" "$dest"
mkdir -p "${dest}.tmp"
vm_log "hardlinked copy of $src"
cp -al "$src" "${dest}.tmp/"
ttree="${dest}.tmp/$(basename "$src")"

for p in "${patches[@]}"; do
    # The files this patch touches (+++ lines, -p1), and their original contents' checksums.
    mapfile -t files < <(sed -n 's/^+++ [^/]*\/\([^[:space:]]*\).*/\1/p' "$p")
    [ "${#files[@]}" -gt 0 ] || vm_die "$p touches no file (want a -p1 unified diff)"
    # Files the patch creates are not in the original: only those it has are checked.
    old=()
    for f in "${files[@]}"; do [ ! -e "${src}/${f}" ] || old+=("$f"); done
    before="$(cd "$src" && sha256sum /dev/null "${old[@]}")"
    vm_log "applying $(basename "$p") (${files[*]})"
    patch -d "$ttree" -p1 --forward --batch --no-backup-if-mismatch <"$p" >&2 ||
        vm_die "$(basename "$p") does not apply to $src"
    after="$(cd "$src" && sha256sum /dev/null "${old[@]}")"
    [ "$before" = "$after" ] || vm_die "BUG: patching the copy changed the original tree ($src)"
    for f in "${files[@]}"; do
        [ ! -e "${src}/${f}" ] || [[ " ${old[*]} " == *" ${f} "* ]] ||
            vm_die "BUG: patching the copy created ${f} in the original tree ($src)"
    done
    for f in "${files[@]}"; do
        [ "$(stat -c %h "${ttree}/${f}")" -eq 1 ] ||
            vm_die "BUG: ${f} in the copy still shares its inode with the original after patching"
    done
done
{
    printf 'source %s\n' "$src"
    for p in "${patches[@]}"; do printf 'patch %s %s\n' "$(sha256sum "$p" | cut -d' ' -f1)" "$(basename "$p")"; done
} >"${ttree}/.viommu-patches"
touch "${dest}.tmp/.complete"
mv "${dest}.tmp" "$dest"
vm_log "patched tree ready in $(($(date +%s) - t0)) s: $tree"
printf '%s\n' "$tree"
