# shellcheck shell=bash
# Shared helpers for the VM test tier scripts. Source it, do not run it:
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Nothing here writes into the repository: every artefact goes under the cache root.

# shellcheck disable=SC2034 # used by the scripts that source this file
VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VM_CACHE="${VIOMMU_VM_CACHE:-${HOME}/.cache/vhost-device-iommu/vm}"

vm_log() { printf '[vm] %s\n' "$*" >&2; }
vm_die() {
    printf '[vm] ERROR: %s\n' "$*" >&2
    exit 1
}

# vm_lock NAME: hold an exclusive lock (fd 9) under the cache root until the script exits,
# so two concurrent runs never extract or build into the same directory.
vm_lock() {
    mkdir -p "${VM_CACHE}/locks"
    exec 9>"${VM_CACHE}/locks/$1.lock"
    if ! flock -n 9; then
        vm_log "waiting for lock $1 (another run holds it)"
        flock 9
    fi
}

# vm_need_pkgs PKG...: install the Debian packages that are missing, from the machine's own suites,
# non-interactively. Refreshes the system lists once if the first attempt fails.
vm_need_pkgs() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || vm_die "missing packages ${missing[*]} (run as root, or install them)"
    vm_log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for dpkg's lock: tests/vm/prepare.sh may be installing in the background.
    local lk=(-o DPkg::Lock::Timeout=900)
    if ! apt-get install "${lk[@]}" -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt-get update "${lk[@]}" -q >&2
        apt-get install "${lk[@]}" -y -q --no-install-recommends "${missing[@]}" >&2 ||
            vm_die "apt-get install ${missing[*]} failed"
    fi
}

# URI of the machine's Debian mirror, read at run time from the system's deb822 sources
# (no host name is ever written into the repository). $1 = "main" or "security".
vm_system_uri() {
    local want="$1" f="/etc/apt/sources.list.d/debian.sources"
    [ -r "$f" ] || vm_die "$f not found: cannot learn the Debian mirror URI"
    # Walk the stanzas; pick the first URIs: of a stanza whose Suites: mention -security (or not).
    awk -v want="$want" '
        function flush() {
            if (uri != "" && found == "") {
                sec = (suites ~ /-security/)
                if ((want == "security" && sec) || (want == "main" && !sec)) found = uri
            }
            uri = ""; suites = ""
        }
        /^[ \t]*$/ { flush(); next }
        /^URIs:/ { split(substr($0, 6), a, " "); uri = a[1] }
        /^Suites:/ { suites = substr($0, 8) }
        END { flush(); if (found == "") exit 1; print found }
    ' "$f" || vm_die "no URIs: line for the $want archive in $f"
}

# The machine's own release codename (bookworm on Debian 12).
vm_codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && printf '%s\n' "${VERSION_CODENAME:?}")
}

# Private apt configuration: nothing of the system's apt state is read or written except
# its keyrings and apt.conf.d. Usage: vm_papt_init NAME "SUITE..." [ARCH] ; then vm_apt_get /
# vm_apt_cache. ARCH (e.g. arm64) makes that configuration a foreign-architecture one
# (APT::Architecture and APT::Architectures set to ARCH only): its lists and downloads are ARCH's.
VM_PAPT=""
VM_PAPT_ARCH=""
vm_papt_init() {
    local name="$1" suites="$2" s uri kr=/usr/share/keyrings/debian-archive-keyring.gpg
    VM_PAPT="${VM_CACHE}/apt/${name}"
    VM_PAPT_ARCH="${3:-}"
    mkdir -p "${VM_PAPT}/lists/partial" "${VM_PAPT}/cache/archives/partial"
    local tmp="${VM_PAPT}/sources.list.new"
    : >"$tmp"
    for s in $suites; do
        case "$s" in
            *-security) uri="$(vm_system_uri security)" ;;
            *) uri="$(vm_system_uri main)" ;;
        esac
        printf 'deb [signed-by=%s] %s %s main\n' "$kr" "$uri" "$s" >>"$tmp"
    done
    if ! cmp -s "$tmp" "${VM_PAPT}/sources.list" 2>/dev/null; then
        mv "$tmp" "${VM_PAPT}/sources.list"
        rm -f "${VM_PAPT}/updated"
    else
        rm -f "$tmp"
    fi
}
vm_papt_opts() {
    printf '%s\n' \
        -o "Dir::Etc::SourceList=${VM_PAPT}/sources.list" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::State::Lists=${VM_PAPT}/lists" \
        -o "Dir::Cache=${VM_PAPT}/cache" \
        -o "Dir::State::status=/dev/null" \
        -o "Acquire::Languages=none" \
        -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false" \
        -o "APT::Sandbox::User=root"
    if [ -n "$VM_PAPT_ARCH" ]; then
        printf '%s\n' -o "APT::Architecture=${VM_PAPT_ARCH}" -o "APT::Architectures=${VM_PAPT_ARCH}"
    fi
}
vm_apt_get() {
    local o
    mapfile -t o < <(vm_papt_opts)
    apt-get -q "${o[@]}" "$@"
}
vm_apt_cache() {
    local o
    mapfile -t o < <(vm_papt_opts)
    apt-cache "${o[@]}" "$@"
}
# Refresh the private lists when they are missing or older than VIOMMU_VM_APT_TTL seconds
# (default one day). If the refresh fails but old lists exist, keep going with them.
vm_papt_update() {
    local ttl="${VIOMMU_VM_APT_TTL:-86400}" now stamp=0
    now="$(date +%s)"
    [ -f "${VM_PAPT}/updated" ] && stamp="$(cat "${VM_PAPT}/updated")"
    if [ $((now - stamp)) -lt "$ttl" ]; then
        return 0
    fi
    vm_log "apt-get update (private lists in ${VM_PAPT})"
    if vm_apt_get update >&2; then
        printf '%s\n' "$now" >"${VM_PAPT}/updated"
    elif [ "$stamp" -gt 0 ]; then
        vm_log "WARNING: apt-get update failed; using the lists from $(date -d "@${stamp}")"
    else
        vm_die "apt-get update of the private lists failed"
    fi
}

# Is this ELF file statically linked (no program interpreter)? Scripts count as "static".
vm_is_static() {
    local f="$1"
    if [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" != '177ELF' ]; then
        return 0
    fi
    ! LC_ALL=C readelf -l "$f" 2>/dev/null | grep -q 'Requesting program interpreter'
}

# dma_line PREFIX TESTNAME CONSOLE: print `PREFIX: dma-through-tables N passed, M failed` from the
# `PASS|FAIL TESTNAME::...` lines of a console log (the libtest checks of tests/dma_*.rs), or
# `... SKIPPED (reason)` from its SKIP line; a run that named none of its tests is one failure.
# Status 1 if anything failed or nothing ran.
dma_line() {
    local prefix="$1" name="$2" clean="$3" p f skip
    p="$(grep -c "^PASS ${name}::" <<<"$clean" || true)"
    f="$(grep -c -E "^FAIL ${name}(::| )" <<<"$clean" || true)"
    skip="$(grep -m1 "^SKIP ${name} " <<<"$clean" | sed "s/^SKIP ${name} //" || true)"
    if [ -n "$skip" ] && [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
        printf '%s: dma-through-tables SKIPPED %s\n' "$prefix" "$skip"
        return 0
    fi
    if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
        printf '%s: dma-through-tables 0 passed, 1 failed (%s did not run)\n' "$prefix" "$name"
        return 1
    fi
    printf '%s: dma-through-tables %s passed, %s failed\n' "$prefix" "$p" "$f"
    [ "$f" -eq 0 ]
}
