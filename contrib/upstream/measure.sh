#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The cost lines with the changes this directory proposes to the crates of
# the field, beside the stock crates', in one run: builds the backend once
# with each patch applied to the crate version Cargo.lock names (sources
# from cargo's registry cache, [patch.crates-io] on the command line, a
# target directory of its own under ~/.cache), then runs
# `cargo bench --bench request_path -- --cost` and
# `cargo bench --bench fault_cost -- --quick` on the stock binary and on
# the patched one (VIOMMU_BIN). Not part of tests/run.sh: a release build
# per patch costs minutes. Usage: bash contrib/upstream/measure.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-device-iommu/upstream
cd "$repo"
cargo fetch -q
cargo build -q --release --bin vhost-device-iommu
mkdir -p "$cache"

# The registry source directory of crate $1 at the version Cargo.lock pins.
crate_dir() {
    cargo metadata -q --format-version 1 | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
for p in m["packages"]:
    if p["name"] == sys.argv[1] and p["source"] and p["source"].startswith("registry"):
        print(os.path.dirname(p["manifest_path"])); break
else:
    sys.exit("crate %s not in the dependency graph" % sys.argv[1])
' "$1"
}

binaries=("stock=$repo/target/release/vhost-device-iommu")
patches=()
for patch in "$here"/*.patch; do
    name=$(basename "$patch" .patch)
    crate=${name%%-[0-9]*}
    src=$(crate_dir "$crate")
    version=${src##*-}
    case "$name" in
    "$crate-$version-"*) ;;
    *) echo "upstream: $name: SKIPPED (Cargo.lock has $crate $version)" >&2; continue ;;
    esac
    dst=$cache/src/$name
    rm -rf "$dst"
    mkdir -p "$dst"
    cp -r "$src/." "$dst"
    patch -s -d "$dst" -p1 <"$patch"
    patches+=("$crate=$dst")
    CARGO_TARGET_DIR=$cache/target/$name cargo build -q --release --bin vhost-device-iommu \
        --config "patch.crates-io.$crate.path=\"$dst\""
    binaries+=("$name=$cache/target/$name/release/vhost-device-iommu")
done
if [ "${#patches[@]}" -gt 1 ]; then
    args=()
    for p in "${patches[@]}"; do
        args+=(--config "patch.crates-io.${p%%=*}.path=\"${p#*=}\"")
    done
    CARGO_TARGET_DIR=$cache/target/all cargo build -q --release --bin vhost-device-iommu "${args[@]}"
    binaries+=("all=$cache/target/all/release/vhost-device-iommu")
fi

for b in "${binaries[@]}"; do
    for bench in "request_path --cost" "fault_cost --quick"; do
        VIOMMU_BIN=${b#*=} cargo bench -q --bench "${bench% *}" -- "${bench#* }" 2>/dev/null |
            grep -E '^(request|fault)-cost(-crates)? ' | sed "s/^/upstream ${b%%=*}: /"
    done
done
