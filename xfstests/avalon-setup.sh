#!/usr/bin/env bash
# Prepares an Avalon cluster for xfstests.
#
#   xfstests/avalon-setup.sh [DIR]        (default /var/tmp/avalon-xfstests)
#   xfstests/avalon-setup.sh --down [DIR] (unmount TEST/SCRATCH, stop it)
#
# - links /sbin/mount.fuse.avalon-xfstests to xfstests/mount.fuse.avalon-xfstests
#   of this checkout (runs this checkout's avalon-fuse; handles remount).
#   local.config mounts with -t fuse.avalon-xfstests, so a `./dev setup` of
#   another checkout, which re-points /sbin/mount.fuse.avalon, cannot swap
#   the client under a running xfstests;
# - starts `avalonctl up DIR` in the background (3 MDS, 3 OSDs on
#   127.0.0.1, random ports) unless it is already mounted at DIR/mnt;
# - creates /xfstests-test and /xfstests-scratch in the volume and the
#   mount points /mnt/avalon-test, /mnt/avalon-scratch;
# - writes DIR/xfstests.env (AVALON_MDS=...), which local.config reads.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${AVALON_BIN_DIR:-$ROOT/target/release}
down=0
if [ "${1:-}" = --down ]; then down=1; shift; fi
DIR=${1:-/var/tmp/avalon-xfstests}

if [ $down = 1 ]; then
    for m in /mnt/avalon-test /mnt/avalon-scratch; do
        if findmnt "$m" >/dev/null 2>&1; then umount "$m" || umount -l "$m"; fi
    done
    "$BIN/avalonctl" down "$DIR" || true
    exit 0
fi

[ -x "$BIN/avalon-fuse" ] || { echo "no $BIN/avalon-fuse: cargo build --release --workspace --bins first" >&2; exit 1; }
ln -sfn "$ROOT/xfstests/mount.fuse.avalon-xfstests" /sbin/mount.fuse.avalon-xfstests

mkdir -p "$DIR"
if ! findmnt "$DIR/mnt" >/dev/null 2>&1; then
    nohup "$BIN/avalonctl" up "$DIR" </dev/null >"$DIR.log" 2>&1 &
    for _ in $(seq 1 240); do
        findmnt "$DIR/mnt" >/dev/null 2>&1 && break
        sleep 0.5
    done
fi
findmnt "$DIR/mnt" >/dev/null || { echo "cluster did not come up; see $DIR.log" >&2; exit 1; }
# The MDS list is DIR/mnt's mount source minus the trailing ":/".
src=$(findmnt -n -o SOURCE "$DIR/mnt")
mds=${src%:/}
echo "AVALON_MDS=$mds" >"$DIR/xfstests.env"
# The mounts' key (mutual TLS), for mount.fuse.avalon-xfstests.
echo "export AVALON_KEYFILE=$DIR/keys/client.local.key" >>"$DIR/xfstests.env"
mkdir -p "$DIR/mnt/xfstests-test" "$DIR/mnt/xfstests-scratch" /mnt/avalon-test /mnt/avalon-scratch
chmod 777 "$DIR/mnt/xfstests-test" "$DIR/mnt/xfstests-scratch"
# Tests switch to these users (fsgqa, fsgqa2, 123456-fsgqa).
getent group fsgqa >/dev/null || groupadd fsgqa
id fsgqa >/dev/null 2>&1 || useradd -m -g fsgqa fsgqa
id fsgqa2 >/dev/null 2>&1 || useradd -m fsgqa2
id 123456-fsgqa >/dev/null 2>&1 || useradd -m 123456-fsgqa
"$BIN/avalonctl" status "$DIR" | head -8 || true
echo "ready: AVALON_MDS=$mds (in $DIR/xfstests.env); run ./check -g quick in the xfstests checkout"
