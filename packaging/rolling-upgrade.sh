#!/usr/bin/env bash
# Rolling upgrade of a running local cluster, run by hand (CI cannot afford
# a second release build):
#
#   packaging/rolling-upgrade.sh [--old REV | --old-bin DIR] [--new-bin DIR] [--dir DIR]
#
# Builds the previous release (REV, default: the merge base of HEAD and
# main) in a temporary git worktree under /var/tmp (own target dir, both
# removed at the end) and takes the current tree's release binaries
# (target/release, built if missing); --old-bin / --new-bin take binaries
# already built instead. Starts 3 MDS + 3 OSDs + a mount on 127.0.0.1 with
# the old binaries (`avalonctl up`), keeps a writer/reader checking data in
# a loop, then replaces the nodes one at a time with the new binaries, each
# with the same command line: the MDS followers, the leader, the OSDs (each
# followed by `avalonctl wait-healthy`), and last remounts the client. At
# the end every file written is read back from the new client and compared,
# and the longest write+read+verify of the loop while daemons were replaced
# (its I/O stall) is reported. Needs root (FUSE) and python3.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD_REV=""
OLD_BIN=""
NEW_BIN=""
DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --old) OLD_REV=$2; shift 2 ;;
        --old-bin) OLD_BIN=$(realpath "$2"); shift 2 ;;
        --new-bin) NEW_BIN=$(realpath "$2"); shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

WORK=$(mktemp -d /var/tmp/avalon-upgrade.XXXXXX)
DIR=${DIR:-$WORK/cluster}
OLD_TREE=""
UP_PID=""
WRITER_PID=""
# Daemons this script started (`up` stops only those it started itself).
STARTED=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

cleanup() {
    set +e
    [ -n "$WRITER_PID" ] && kill "$WRITER_PID" 2>/dev/null && wait "$WRITER_PID" 2>/dev/null
    if mountpoint -q "$DIR/mnt" 2>/dev/null; then fusermount3 -u "$DIR/mnt" || umount -l "$DIR/mnt"; fi
    [ -n "$UP_PID" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
    for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null; done
    sleep 3
    for p in "${STARTED[@]}"; do kill -9 "$p" 2>/dev/null; done
    if [ -n "$OLD_TREE" ]; then
        git -C "$ROOT" worktree remove --force "$OLD_TREE"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- binaries
if [ -z "$OLD_BIN" ]; then
    OLD_REV=${OLD_REV:-$(git -C "$ROOT" merge-base HEAD main)}
    OLD_TREE=$WORK/old-src
    log "building the old release $(git -C "$ROOT" rev-parse --short "$OLD_REV") in $OLD_TREE"
    git -C "$ROOT" worktree add --detach "$OLD_TREE" "$OLD_REV" >/dev/null
    (cd "$OLD_TREE" && CARGO_TARGET_DIR=$WORK/old-target nice -n 15 \
        cargo build --release -p avalon-mds -p avalon-osd -p avalon-fuse -p avalonctl --bins)
    OLD_BIN=$WORK/old-target/release
fi
if [ -z "$NEW_BIN" ]; then
    (cd "$ROOT" && nice -n 10 cargo build --release -p avalon-mds -p avalon-osd -p avalon-fuse -p avalonctl --bins)
    NEW_BIN=$ROOT/target/release
fi
for b in avalon-mds avalon-osd avalon-fuse avalonctl; do
    [ -x "$OLD_BIN/$b" ] && [ -x "$NEW_BIN/$b" ] || { echo "missing $b" >&2; exit 1; }
done
CTL="$NEW_BIN/avalonctl"

# ---------------------------------------------------------------- cluster
log "starting 3 MDS + 3 OSDs + a mount with the old binaries in $DIR"
mkdir -p "$DIR"
"$OLD_BIN/avalonctl" up "$DIR" --no-metrics >"$WORK/up.out" 2>&1 &
UP_PID=$!
for _ in $(seq 1 180); do
    mountpoint -q "$DIR/mnt" 2>/dev/null && break
    kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.out"; exit 1; }
    sleep 1
done
mountpoint -q "$DIR/mnt" || { echo "the old cluster did not mount" >&2; cat "$WORK/up.out"; exit 1; }
"$CTL" wait-healthy "$DIR" --timeout 120 >/dev/null

# ---------------------------------------------------------------- I/O loop
# Each round writes a new 256 KiB file, reads it back and compares; the
# checksums go to a list checked again at the end. A round's duration in
# ms goes to $WORK/rounds (with the phase it ran in: old, the name of the
# node being replaced, new); $WORK/pause holds the
# loop while the client is remounted.
PHASE=$WORK/phase
echo old >"$PHASE"
mkdir -p "$DIR/mnt/upgrade"
writer() {
    local i=0 src=$WORK/src.bin
    while :; do
        if [ -e "$WORK/pause" ]; then touch "$WORK/paused"; sleep 0.1; continue; fi
        rm -f "$WORK/paused"
        i=$((i + 1))
        head -c 262144 /dev/urandom >"$src"
        local sum t0 t1 f=$DIR/mnt/upgrade/f$i
        sum=$(sha256sum <"$src" | cut -d' ' -f1)
        t0=$(date +%s%N)
        if cp "$src" "$f" && [ "$(sha256sum <"$f" | cut -d' ' -f1)" = "$sum" ]; then
            t1=$(date +%s%N)
            echo "f$i $sum" >>"$WORK/written"
            echo "$(( (t1 - t0) / 1000000 )) $(cat "$PHASE")" >>"$WORK/rounds"
        else
            echo "round $i failed" >>"$WORK/errors"
        fi
    done
}
writer &
WRITER_PID=$!
sleep 5

# ---------------------------------------------------------------- upgrade
status_json() { "$CTL" status "$DIR" --json 2>/dev/null || true; }
leader() { status_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"] or "")'; }

# Whether process PID runs. The old daemons are children of the old
# `avalonctl up`, which does not reap them: an exited one stays a zombie,
# which `kill -0` still finds.
running() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# Replaces daemon NAME (mds1, osd2, ...) by BIN with its command line.
replace() {
    local name=$1 bin=$2 pidf=$DIR/run/$1.pid pid args=()
    pid=$(cat "$pidf")
    echo "$name" >"$PHASE"
    mapfile -d '' args < <(tail -z -n +2 "/proc/$pid/cmdline")
    kill "$pid"
    for _ in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
    running "$pid" && kill -9 "$pid"
    RUST_LOG=info setsid "$bin" "${args[@]}" </dev/null >>"$DIR/logs/$name.log" 2>&1 &
    echo $! >"$pidf"
    STARTED+=("$!")
    log "  $name: pid $pid -> $! ($(basename "$bin") new)"
    wait_serving "$name" "$!"
}

# Waits until the leader lists NAME with process PID serving (an OSD up,
# an MDS in the Raft group): `wait-healthy` alone may still see the
# previous process as up, and the next replacement would then take two
# nodes away at once.
wait_serving() {
    local name=$1 pid=$2 kind id
    kind=${name%%[0-9]*}
    id=${name#"$kind"}
    for _ in $(seq 1 600); do
        status_json | python3 -c '
import json, sys
kind, id, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    j = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
if kind == "osd":
    ok = any(o["id"] == id and o["pid"] == pid and o["state"] == "up" for o in j["osds"])
else:
    ok = any(m["id"] == id and m["pid"] == pid and m["role"] in ("leader", "follower") for m in j["mds"])
sys.exit(0 if ok else 1)' "$kind" "$id" "$pid" && return 0
        sleep 0.2
    done
    echo "$name (pid $pid) is not serving after 120 s" >&2
    return 1
}

L=$(leader)
[ -n "$L" ] || { echo "no leader" >&2; exit 1; }
log "MDS leader is $L; replacing the followers first"
for id in 1 2 3; do
    [ "$id" = "$L" ] && continue
    replace "mds$id" "$NEW_BIN/avalon-mds"
    "$CTL" wait-healthy "$DIR" --timeout 120 >/dev/null
done
log "replacing the leader mds$L"
replace "mds$L" "$NEW_BIN/avalon-mds"
"$CTL" wait-healthy "$DIR" --timeout 120 >/dev/null
for f in "$DIR"/run/osd*.pid; do
    n=$(basename "$f" .pid)
    replace "$n" "$NEW_BIN/avalon-osd"
    "$CTL" wait-healthy "$DIR" --timeout 180 >/dev/null
done

log "remounting the client with the new binary"
touch "$WORK/pause"
for _ in $(seq 1 600); do [ -e "$WORK/paused" ] && break; sleep 0.1; done
cpid=$(pgrep -f "avalon-fuse --foreground .* $DIR/mnt" | head -n1)
mapfile -d '' cargs < <(tail -z -n +2 "/proc/$cpid/cmdline")
fusermount3 -u "$DIR/mnt"
for _ in $(seq 1 100); do running "$cpid" || break; sleep 0.1; done
# The old client ran as `--foreground SOURCE MNT --detached -o ...`: the new
# one detaches itself the same way.
margs=()
for a in "${cargs[@]}"; do
    case "$a" in --foreground|--detached) ;; *) margs+=("$a") ;; esac
done
"$NEW_BIN/avalon-fuse" "${margs[@]}"
echo new >"$PHASE"
rm -f "$WORK/pause"
sleep 10
kill "$WRITER_PID"; wait "$WRITER_PID" 2>/dev/null || true
WRITER_PID=""

# ---------------------------------------------------------------- verdict
log "checking every file written, from the new client"
lost=0
while read -r name sum; do
    got=$(sha256sum <"$DIR/mnt/upgrade/$name" 2>/dev/null | cut -d' ' -f1 || true)
    [ "$got" = "$sum" ] || { lost=$((lost + 1)); echo "  $name differs or is missing"; }
done <"$WORK/written"
"$CTL" status "$DIR"
files=$(wc -l <"$WORK/written")
errors=0
[ -e "$WORK/errors" ] && errors=$(wc -l <"$WORK/errors")
python3 - "$WORK/rounds" <<'EOF'
import sys
rounds = {}
for line in open(sys.argv[1]):
    ms, phase = line.split()
    rounds.setdefault(phase, []).append(int(ms))
# Phases in the order they ran: old, then the node being replaced (from its
# stop until the next one's), then new.
for phase, r in rounds.items():
    r = sorted(r)
    print(f"{phase:8} rounds {len(r):4}  median {r[len(r)//2]:6} ms  longest {r[-1]:6} ms")
EOF
log "files written and checked: $files, lost or wrong: $lost, failed rounds: $errors"
new_versions=$(status_json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sorted({n["version"] for k in ("mds","osds","clients") for n in s[k]}))')
log "versions now: $new_versions"
[ "$lost" = 0 ] && [ "$errors" = 0 ]
