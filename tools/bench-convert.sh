#!/bin/sh
# Conversion throughput: `sluice convert` against `ctr-remote images convert --estargz
# --oci` (Debian's stargz-snapshotter 0.12) on the same image, in one run.
#
# Usage (as root, from the repository root, after `cargo build --release`):
#   tools/bench-convert.sh [IMAGE_NAME]      # default: everything
# IMAGE_NAME is a tools/mkimage.py image (everything, busybox, app) or a
# tools/mkbenchimages image (tiny, python, large; built once into target/bench-images,
# which for python means a debootstrap from the configured apt mirror).
#
# ctr-remote works on containerd's content store, so a private, throw-away containerd
# is started; the image is imported first and only the conversion itself is timed.
# sluice reads the same image from its OCI layout and writes an OCI layout. Both use
# gzip level 9 (ctr-remote's only choice) and 4 MiB chunks.
set -eu
name=${1:-everything}
root=$(pwd)
sluice="$root/target/release/sluice"
[ -x "$sluice" ] || { echo "build first: cargo build --release --bin sluice" >&2; exit 1; }
. "$root/tools/private-containerd.sh"

case "$name" in
tiny | python | large)
    python3 "$root/tools/mkbenchimages" "$root/target/bench-images" --images "$name" >/dev/null
    layout="$root/target/bench-images/$name/layout"
    archive="$root/target/bench-images/$name/image.tar"
    ;;
*)
    layout="$work/layout"
    archive="$work/image.tar"
    python3 "$root/tools/mkimage.py" "$name" "$layout" --archive "$archive" >/dev/null
    ;;
esac
ctr -a "$sock" images import --base-name "bench/$name" "$archive" >/dev/null
src_ref=$(ctr -a "$sock" images ls -q | head -n 1)
uncompressed=0
for layer in $(jq -r '.manifests[0].digest' "$layout/index.json" | cut -d: -f2 |
    xargs -I{} jq -r '.layers[].digest' "$layout/blobs/sha256/{}" | cut -d: -f2); do
    n=$(gzip -dc "$layout/blobs/sha256/$layer" | wc -c)
    uncompressed=$((uncompressed + n))
done

now() { date +%s.%N; }
rate() { # seconds -> "S s, R MB/s"
    echo "$1" | awk -v b="$uncompressed" '{ printf "%.2f s, %.1f MB/s", $1, b / $1 / 1e6 }'
}

t0=$(now)
ctr-remote -a "$sock" images convert --oci --estargz --estargz-chunk-size 4194304 \
    "$src_ref" "bench/$name:esgz" >/dev/null
t1=$(now)
ctr_secs=$(echo "$t1 $t0" | awk '{ print $1 - $2 }')

t0=$(now)
"$sluice" convert "oci:$layout" "oci:$work/out" --format estargz \
    --chunk-size 4194304 --compression-level 9 --temp-dir "$work" >/dev/null
t1=$(now)
sluice_secs=$(echo "$t1 $t0" | awk '{ print $1 - $2 }')

t0=$(now)
"$sluice" convert "oci:$layout" "oci:$work/out-prefetch" --format estargz \
    --chunk-size 4194304 --compression-level 9 --prefetch entrypoint --temp-dir "$work" >/dev/null
t1=$(now)
prefetch_secs=$(echo "$t1 $t0" | awk '{ print $1 - $2 }')

t0=$(now)
"$sluice" convert "oci:$layout" "oci:$work/out-zstd" --format zstd-chunked \
    --chunk-size 4194304 --temp-dir "$work" >/dev/null
t1=$(now)
zstd_secs=$(echo "$t1 $t0" | awk '{ print $1 - $2 }')

echo "image $name: $uncompressed bytes uncompressed, $(nproc) CPUs"
echo "ctr-remote images convert --oci --estargz:  $(rate "$ctr_secs")"
echo "sluice convert --format estargz (gzip -9):  $(rate "$sluice_secs")"
echo "sluice convert --format estargz --prefetch entrypoint:  $(rate "$prefetch_secs")"
echo "sluice convert --format zstd-chunked (-3):  $(rate "$zstd_secs")"
