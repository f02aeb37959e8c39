#!/usr/bin/env bash
# Configure and build a test kernel from an unpacked source tree (as printed by fetch-kernel-source.sh).
#
# Usage: build-kernel.sh [--config-only] VERSION_DIR
#   Prints the path of the cached bzImage on stdout (the only stdout line); progress goes to stderr.
#   --config-only  stop after the fragment check and print the path of the checked .config instead.
#
# VIOMMU_VM_ARCH=arm64 builds an arm64 kernel instead (cross, ARCH=arm64
# CROSS_COMPILE=aarch64-linux-gnu- unless VIOMMU_VM_CROSS_COMPILE says otherwise; Debian's
# gcc-aarch64-linux-gnu is installed if missing), default fragment kernel-arm64.fragment, target
# and printed file `Image`, cache key <version>-arm64-<sha16>. Without it (or with x86_64) nothing
# changes. A tree made by patch-kernel-source.sh (it has a .viommu-patches file) adds
# -p<sha8 of that file> to the key, and takes kernel-patched.fragment (next to the default
# fragment; symbols that only the patches add) after the fragment, its sha8 in the key too.
#
# Steps: make ARCH=x86_64 tinyconfig (out of tree, O=<cache>), scripts/config for every line of
# kernel.fragment, make olddefconfig, then a check that FAILS LOUDLY if any fragment symbol did not
# end up as requested, then `nice -n 15 make -j2 bzImage`.
# Cache key: (kernel version, sha256 of the fragment) ->
#   ${VIOMMU_VM_CACHE:-~/.cache/vhost-device-iommu/vm}/kernels/<version>-<sha16>/{bzImage,config,build.log}
# A cached kernel is returned at once. Env: VIOMMU_VM_FRAGMENT (another fragment file),
# VIOMMU_VM_JOBS (make -j, default 2), VIOMMU_VM_KEEP_BUILD=1 (keep the object tree),
# VIOMMU_VM_VERBOSE=1 (stream the make output).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

config_only=0
if [ "${1:-}" = "--config-only" ]; then
    config_only=1
    shift
fi
[ "$#" -eq 1 ] || vm_die "usage: $0 [--config-only] VERSION_DIR"
arch="${VIOMMU_VM_ARCH:-x86_64}"
case "$arch" in
    x86_64 | x86)
        karch=x86_64 kdir=x86 target=bzImage cross="" keyarch="" deffrag=kernel.fragment
        ;;
    arm64 | aarch64)
        karch=arm64 kdir=arm64 target=Image keyarch="-arm64" deffrag=kernel-arm64.fragment
        cross="${VIOMMU_VM_CROSS_COMPILE:-aarch64-linux-gnu-}"
        ;;
    *) vm_die "VIOMMU_VM_ARCH=$arch: want x86_64 or arm64" ;;
esac
if [ ! -f "$1/Makefile" ] || [ ! -d "$1/arch/${kdir}" ]; then vm_die "$1 is not a kernel source tree"; fi
src="$(cd "$1" && pwd)"
frag="${VIOMMU_VM_FRAGMENT:-${VM_DIR}/${deffrag}}"
[ -f "$frag" ] || vm_die "fragment $frag not found"
frag="$(cd "$(dirname "$frag")" && pwd)/$(basename "$frag")"

sha="$(sha256sum "$frag" | cut -c1-16)"
# Symbols that only the contrib/linux patches add: for patched trees only (6.12 has none of them).
pfrag=""
if [ -f "${src}/.viommu-patches" ] && [ -f "${VM_DIR}/kernel-patched.fragment" ] && [ "$karch" = x86_64 ]; then
    pfrag="${VM_DIR}/kernel-patched.fragment"
fi
kver="$(make -s -C "$src" kernelversion)"
key="${kver}${keyarch}-${sha}"
# a patched copy (patch-kernel-source.sh) never shares a kernel with its unpatched original
[ ! -f "${src}/.viommu-patches" ] || key="${key}-p$(sha256sum "${src}/.viommu-patches" | cut -c1-8)"
[ -z "$pfrag" ] || key="${key}-f$(sha256sum "$pfrag" | cut -c1-8)"
out="${VM_CACHE}/kernels/${key}"
bdir="${VM_CACHE}/build/${key}"

if [ "$config_only" -eq 0 ] && [ -f "${out}/${target}" ]; then
    vm_log "cached kernel ${kver} (fragment ${sha}): ${out}/${target}"
    printf '%s\n' "${out}/${target}"
    exit 0
fi

vm_need_pkgs make gcc bc bison flex libelf-dev libssl-dev cpio
if [ "$karch" = arm64 ] && [ -z "${VIOMMU_VM_CROSS_COMPILE:-}" ]; then vm_need_pkgs gcc-aarch64-linux-gnu; fi
mkdir -p "${VM_CACHE}/kernels" "${VM_CACHE}/build"
vm_lock "build-${key}"
if [ "$config_only" -eq 0 ] && [ -f "${out}/${target}" ]; then # built by a concurrent run
    printf '%s\n' "${out}/${target}"
    exit 0
fi

# ---- parse the fragment: NAME<TAB>WANT, WANT in y|m|n|<literal value> ----
want_list=()
cfg_args=()
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    if [[ "$line" =~ ^#\ CONFIG_([A-Za-z0-9_]+)\ is\ not\ set[[:space:]]*$ ]]; then
        sym="${BASH_REMATCH[1]}" val=n
    elif [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]]; then
        continue
    elif [[ "$line" =~ ^CONFIG_([A-Za-z0-9_]+)=(.*)$ ]]; then
        sym="${BASH_REMATCH[1]}" val="${BASH_REMATCH[2]}"
    else
        vm_die "${frag}:${lineno}: cannot parse '${line}'"
    fi
    case "$val" in
        y) cfg_args+=(--enable "$sym") ;;
        m) cfg_args+=(--module "$sym") ;;
        n) cfg_args+=(--disable "$sym") ;;
        \"*\")
            str="${val#\"}"
            cfg_args+=(--set-str "$sym" "${str%\"}")
            ;;
        *) cfg_args+=(--set-val "$sym" "$val") ;;
    esac
    want_list+=("${sym}"$'\t'"${val}")
done < <(cat "$frag" ${pfrag:+"$pfrag"})
[ "${#want_list[@]}" -gt 0 ] || vm_die "fragment $frag sets nothing"

mkargs=(-C "$src" O="$bdir" ARCH="$karch")
[ -z "$cross" ] || mkargs+=(CROSS_COMPILE="$cross")
kmake() { make "${mkargs[@]}" "$@"; }

t0="$(date +%s)"
# An existing object tree for the same key (an interrupted or --config-only run) is reused:
# tinyconfig rewrites .config from scratch and kbuild rebuilds only what changed.
mkdir -p "$bdir"
vm_log "configuring ${kver} in ${bdir} (tinyconfig + $(basename "$frag"), ${#want_list[@]} symbols)"
kmake -s tinyconfig >"${bdir}/config.log" 2>&1 || {
    tail -n 30 "${bdir}/config.log" >&2
    vm_die "make tinyconfig failed"
}
"${src}/scripts/config" --file "${bdir}/.config" "${cfg_args[@]}"
kmake -s olddefconfig >>"${bdir}/config.log" 2>&1 || {
    tail -n 30 "${bdir}/config.log" >&2
    vm_die "make olddefconfig failed"
}

# ---- the check: every fragment symbol must have the requested value ----
bad=0
for entry in "${want_list[@]}"; do
    sym="${entry%%$'\t'*}" val="${entry#*$'\t'}"
    got="$(sed -n "s/^CONFIG_${sym}=//p" "${bdir}/.config" | tail -n 1)"
    [ -n "$got" ] || got=n
    if [ "$got" != "$val" ]; then
        printf '[vm] FRAGMENT CHECK FAILED: CONFIG_%s wanted %s, got %s\n' "$sym" "$val" "$got" >&2
        bad=$((bad + 1))
    fi
done
if [ "$bad" -gt 0 ]; then
    vm_die "${bad} fragment symbol(s) not as requested on ${kver}; read that kernel's Kconfig for their dependencies (config: ${bdir}/.config)"
fi
vm_log "fragment check ok on ${kver}: all ${#want_list[@]} symbols as requested ($(($(date +%s) - t0)) s)"
if [ "$config_only" -eq 1 ]; then
    printf '%s\n' "${bdir}/.config"
    exit 0
fi

# ---- build ----
jobs="${VIOMMU_VM_JOBS:-2}"
vm_log "building ${kver} ${target}${keyarch:+ (${karch})}: nice -n 15 make -j${jobs} (log: ${bdir}/build.log)"
t1="$(date +%s)"
if [ "${VIOMMU_VM_VERBOSE:-0}" = 1 ]; then
    nice -n 15 make "${mkargs[@]}" -j"$jobs" "$target" 2>&1 | tee "${bdir}/build.log" >&2 ||
        vm_die "kernel build failed (log: ${bdir}/build.log)"
else
    nice -n 15 make "${mkargs[@]}" -j"$jobs" "$target" >"${bdir}/build.log" 2>&1 || {
        tail -n 40 "${bdir}/build.log" >&2
        vm_die "kernel build failed (log: ${bdir}/build.log)"
    }
fi
secs=$(($(date +%s) - t1))
[ -f "${bdir}/arch/${kdir}/boot/${target}" ] || vm_die "make succeeded but produced no ${target}"

rm -rf "${out}.tmp"
mkdir -p "${out}.tmp"
cp "${bdir}/arch/${kdir}/boot/${target}" "${out}.tmp/${target}"
cp "${bdir}/.config" "${out}.tmp/config"
cp "${bdir}/build.log" "${out}.tmp/build.log"
cp "$frag" "${out}.tmp/kernel.fragment"
printf 'kernel %s\nsource %s\nfragment_sha256_16 %s\nbuild_seconds %s\n' "$kver" "$src" "$sha" "$secs" >"${out}.tmp/info"
[ -z "$keyarch" ] || printf 'arch %s\n' "$karch" >>"${out}.tmp/info"
[ ! -f "${src}/.viommu-patches" ] || cp "${src}/.viommu-patches" "${out}.tmp/patches"
rm -rf "$out"
mv "${out}.tmp" "$out"
[ "${VIOMMU_VM_KEEP_BUILD:-0}" = 1 ] || rm -rf "$bdir"
vm_log "built ${kver} in ${secs} s: ${out}/${target} ($(stat -c %s "${out}/${target}") bytes)"
printf '%s\n' "${out}/${target}"
