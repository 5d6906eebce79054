#!/usr/bin/env bash
# Prepares an Avalon cluster for xfstests: starts `./dev up DIR` in the
# background if nothing answers at $AVALON_MDS, creates the two
# subdirectories TEST_DEV and SCRATCH_DEV name, and the mount points.
#   xfstests/avalon-setup.sh [DIR]     (default /var/tmp/avalon-xfstests)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-/var/tmp/avalon-xfstests}
if ! findmnt "$DIR/mnt" >/dev/null 2>&1; then
    nohup "$ROOT/dev" up "$DIR" </dev/null >"$DIR.log" 2>&1 &
    for _ in $(seq 1 240); do
        findmnt "$DIR/mnt" >/dev/null 2>&1 && break
        sleep 0.5
    done
fi
findmnt "$DIR/mnt" >/dev/null || { echo "cluster did not come up; see $DIR.log" >&2; exit 1; }
mkdir -p "$DIR/mnt/xfstests-test" "$DIR/mnt/xfstests-scratch" /mnt/avalon-test /mnt/avalon-scratch
chmod 777 "$DIR/mnt/xfstests-test" "$DIR/mnt/xfstests-scratch"
"$ROOT/target/release/avalonctl" status --mds "${AVALON_MDS:-127.0.0.1:7100}" | head -5 || true
echo "ready: export AVALON_MDS=<the MDS list above> and run ./check -g quick in the xfstests checkout"
