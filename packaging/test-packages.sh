#!/usr/bin/env bash
# Checks the packages of `./dev package`, then installs the .debs on this
# (Debian) machine and runs a cluster from the installed files only:
#
#   1. dpkg-deb -c / rpm -qlp list the expected files; lintian finds no
#      errors; systemd-analyze verify accepts the units;
#   2. apt install ./*.deb; 3 MDS on 127.0.0.1-3 and 3 OSDs on 127.0.0.4-6
#      (as if on six machines), each started from its installed unit's
#      ExecStart= line as User=/Group= of the unit, with NOTIFY_SOCKET (each
#      must send READY=1), configured from the installed example configs;
#   3. a mount from an fstab line (`mount -a -T FILE`: /etc/fstab is not
#      touched), files written and read back, umount, daemons stopped;
#   4. apt remove, then apt purge: the data directories are intact after
#      both; a second install purged with AVALON_PURGE_DATA=yes deletes them;
#   5. everything it made is removed (packages, the avalon user, /etc/avalon,
#      /var/lib/avalon) and /sbin/mount.fuse.avalon is restored.
#
# Run as root:  packaging/test-packages.sh [PKGDIR]   (default target/packages;
# made with `./dev package` when it holds no .deb). Needs a machine without
# the avalon packages, user or /etc/avalon (it refuses otherwise).
# AVALON_TEST_MDS_PORT / AVALON_TEST_OSD_PORT change the ports (7100, 7200).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PKGDIR=$(realpath -m "${1:-$ROOT/target/packages}")
MDS_PORT=${AVALON_TEST_MDS_PORT:-7100}
OSD_PORT=${AVALON_TEST_OSD_PORT:-7200}
PACKAGES=(avalon-mds avalon-osd avalon-client avalonctl)
HELPER=/sbin/mount.fuse.avalon

say() { echo "== $*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and mounts)"
for p in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q installed; then
        fail "$p is installed already; this test installs and purges it"
    fi
done
getent passwd avalon >/dev/null && fail "user avalon exists already; this test creates and deletes it"
[ -e /etc/avalon ] && fail "/etc/avalon exists already; this test creates and deletes it"
[ -e /var/lib/avalon ] && fail "/var/lib/avalon exists already; this test creates and deletes it"

if ! compgen -G "$PKGDIR/*.deb" >/dev/null; then
    say "no packages in $PKGDIR: ./dev package"
    "$ROOT/dev" package
    PKGDIR=$ROOT/target/packages
fi

WORK=$(mktemp -d /tmp/avalon-pkgtest.XXXXXX)
chmod 755 "$WORK"
MNT=$WORK/mnt
OLD_HELPER=$(readlink "$HELPER" 2>/dev/null || true)
PIDS=()
LISTENERS=()

# Those of our packages dpkg still knows (installed, or config files left).
known_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        if dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed\|config-files"; then
            echo "$p"
        fi
    done
}

cleanup() {
    local rc=$?
    set +e
    if findmnt "$MNT" >/dev/null 2>&1; then umount "$MNT" || umount -l "$MNT"; fi
    for pid in "${PIDS[@]}" "${LISTENERS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}" "${LISTENERS[@]}"; do wait "$pid" 2>/dev/null; done
    local left
    left=$(known_packages)
    # shellcheck disable=SC2086
    [ -z "$left" ] || dpkg --purge $left >/dev/null 2>&1
    rm -rf /etc/avalon /var/lib/avalon
    if getent passwd avalon >/dev/null; then userdel avalon; fi
    if getent group avalon >/dev/null; then groupdel avalon; fi
    # The mount helper ./dev setup links to a build tree: put it back.
    if [ -n "$OLD_HELPER" ] && [ ! -e "$HELPER" ]; then ln -sf "$OLD_HELPER" "$HELPER"; fi
    if [ $rc -eq 0 ]; then
        rm -rf "$WORK"
    else
        echo "logs kept in $WORK" >&2
        tail -n 5 "$WORK"/*.log 2>/dev/null >&2
    fi
}
trap cleanup EXIT

deb_of() { compgen -G "$PKGDIR/$1_*.deb" | head -n 1; }

# --- 1. the package files -------------------------------------------------
say "file lists (dpkg-deb -c)"
expect_files() {
    local pkg=$1 deb list f
    shift
    deb=$(deb_of "$pkg")
    [ -n "$deb" ] || fail "no $pkg .deb in $PKGDIR"
    list=$(dpkg-deb -c "$deb" | awk '{ $1=$2=$3=$4=$5=""; sub(/^ +/, ""); print }')
    for f in "$@"; do
        grep -qxF -- "$f" <<<"$list" || fail "$pkg: $f missing from $(basename "$deb"); it has:
$list"
    done
    echo "$pkg: $# expected entries present"
}
expect_files avalon-mds ./usr/bin/avalon-mds ./lib/systemd/system/avalon-mds@.service \
    ./etc/avalon/mds.example.toml ./usr/share/doc/avalon-mds/copyright \
    ./usr/share/doc/avalon-mds/cluster-guide.md ./usr/share/man/man8/avalon-mds.8.gz
expect_files avalon-osd ./usr/bin/avalon-osd ./lib/systemd/system/avalon-osd@.service \
    ./etc/avalon/osd.example.toml ./usr/share/doc/avalon-osd/copyright \
    ./usr/share/man/man8/avalon-osd.8.gz
expect_files avalon-client ./usr/bin/avalon-fuse "./sbin/mount.fuse.avalon -> /usr/bin/avalon-fuse" \
    ./usr/share/doc/avalon-client/examples/fstab ./usr/share/doc/avalon-client/examples/mnt-avalon.mount \
    ./usr/share/man/man8/avalon-fuse.8.gz "./usr/share/man/man8/mount.fuse.avalon.8.gz -> avalon-fuse.8.gz" \
    ./etc/logrotate.d/avalon-client
expect_files avalonctl ./usr/bin/avalonctl ./usr/share/man/man1/avalonctl.1.gz \
    ./usr/share/bash-completion/completions/avalonctl ./usr/share/zsh/vendor-completions/_avalonctl
for p in avalon-mds avalon-osd; do
    for s in postinst prerm postrm; do
        dpkg-deb -I "$(deb_of $p)" "$s" >/dev/null || fail "$p has no $s"
    done
done

if compgen -G "$PKGDIR/*.rpm" >/dev/null; then
    say "file lists (rpm -qlp)"
    command -v rpm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null
    for f in "$PKGDIR"/*.rpm; do
        rpm -qlp "$f" 2>/dev/null >"$WORK/rpm.list"
        case $(basename "$f") in
            avalon-mds-*) want="/usr/bin/avalon-mds /usr/lib/systemd/system/avalon-mds@.service /etc/avalon/mds.example.toml /usr/share/man/man8/avalon-mds.8.gz" ;;
            avalon-osd-*) want="/usr/bin/avalon-osd /usr/lib/systemd/system/avalon-osd@.service /etc/avalon/osd.example.toml /usr/share/man/man8/avalon-osd.8.gz" ;;
            avalon-client-*) want="/usr/bin/avalon-fuse /usr/sbin/mount.fuse.avalon /usr/share/man/man8/avalon-fuse.8.gz /etc/logrotate.d/avalon-client" ;;
            avalonctl-*) want="/usr/bin/avalonctl /usr/share/man/man1/avalonctl.1.gz" ;;
            *) continue ;;
        esac
        for w in $want; do grep -qxF "$w" "$WORK/rpm.list" || fail "$(basename "$f"): $w missing"; done
        case $(basename "$f") in
            avalon-mds-* | avalon-osd-*)
                rpm -qp --scripts "$f" 2>/dev/null | grep -q "useradd -r -g avalon" || fail "$(basename "$f"): no avalon user scriptlet"
                ;;
        esac
        echo "$(basename "$f"): ok"
    done
else
    fail "no .rpm in $PKGDIR"
fi

say "lintian"
command -v lintian >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null
# Errors fail the test; warnings are shown.
lintian --fail-on error --tag-display-limit 0 "$PKGDIR"/*.deb | tee "$WORK/lintian.log" || fail "lintian found errors"
echo "lintian: $(grep -c '^E:' "$WORK/lintian.log" || true) errors, $(grep -c '^W:' "$WORK/lintian.log" || true) warnings"

# --- 2. install and start a cluster from the installed files ---------------
say "apt install"
debs=()
for p in "${PACKAGES[@]}"; do debs+=("$(deb_of "$p")"); done
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >"$WORK/apt-install.log" 2>&1 ||
    fail "apt install: $(tail -n 20 "$WORK/apt-install.log")"
getent passwd avalon >/dev/null || fail "postinst made no avalon user"
[ "$(stat -c %U:%G /var/lib/avalon)" = avalon:avalon ] || fail "/var/lib/avalon is not avalon's"
[ "$(readlink -f "$HELPER")" = /usr/bin/avalon-fuse ] || fail "$HELPER does not lead to /usr/bin/avalon-fuse"

say "systemd-analyze verify"
if command -v systemd-analyze >/dev/null; then
    # Templates are verified through an instance.
    mkdir -p "$WORK/units"
    for u in mds osd; do
        cp "/lib/systemd/system/avalon-$u@.service" "$WORK/units/avalon-$u@1.service"
    done
    cp /usr/share/doc/avalon-client/examples/mnt-avalon.mount "$WORK/units/"
    systemd-analyze verify "$WORK"/units/* || fail "systemd-analyze verify failed"
    echo "systemd-analyze verify: ok"
else
    echo "systemd-analyze not installed: skipped"
fi

if [ -d /run/systemd/system ]; then
    echo "note: systemd runs here, but the daemons are started from their ExecStart lines all the same"
fi

say "configs from the installed examples"
peers="\"1=127.0.0.1:$MDS_PORT\", \"2=127.0.0.2:$MDS_PORT\", \"3=127.0.0.3:$MDS_PORT\""
mdslist="\"127.0.0.1:$MDS_PORT\", \"127.0.0.2:$MDS_PORT\", \"127.0.0.3:$MDS_PORT\""
for i in 1 2 3; do
    sed -e "s|^listen = .*|listen = \"127.0.0.$i:$MDS_PORT\"|" \
        -e "s|^data_dir = .*|data_dir = \"/var/lib/avalon/mds-$i\"|" \
        -e "s|^peers = .*|peers = [$peers]|" \
        /etc/avalon/mds.example.toml >"/etc/avalon/mds-$i.toml"
    grep -qxF "listen = \"127.0.0.$i:$MDS_PORT\"" "/etc/avalon/mds-$i.toml" || fail "mds.example.toml has no listen line"
    grep -qF "peers = [$peers]" "/etc/avalon/mds-$i.toml" || fail "mds.example.toml has no peers line"
    # TLS keys are tested by the e2e suite; the package test runs plaintext.
    sed -i 's/^# insecure = false$/insecure = true/' "/etc/avalon/mds-$i.toml"
    grep -qxF "insecure = true" "/etc/avalon/mds-$i.toml" || fail "mds.example.toml has no insecure line"
done
for n in 1 2 3; do
    a=127.0.0.$((n + 3))
    sed -e "s|^listen = .*|listen = \"$a:$OSD_PORT\"|" \
        -e "s|^data_dir = .*|data_dir = \"/var/lib/avalon/osd-$n\"|" \
        -e "s|^mds = .*|mds = [$mdslist]|" \
        /etc/avalon/osd.example.toml >"/etc/avalon/osd-$n.toml"
    # Six machines: each OSD its own failure domain (set in place: the
    # file ends in its [security] table).
    sed -i "s|^# failure_domain = .*|failure_domain = \"host$((n + 3))\"|" "/etc/avalon/osd-$n.toml"
    grep -qxF "failure_domain = \"host$((n + 3))\"" "/etc/avalon/osd-$n.toml" || fail "osd.example.toml has no failure_domain line"
    sed -i 's/^# insecure = false$/insecure = true/' "/etc/avalon/osd-$n.toml"
    grep -qxF "listen = \"$a:$OSD_PORT\"" "/etc/avalon/osd-$n.toml" || fail "osd.example.toml has no listen line"
done
for i in 1 2 3; do
    ! ss -ltnH "src 127.0.0.$i:$MDS_PORT" | grep -q . || fail "127.0.0.$i:$MDS_PORT is in use (AVALON_TEST_MDS_PORT)"
    ! ss -ltnH "src 127.0.0.$((i + 3)):$OSD_PORT" | grep -q . || fail "127.0.0.$((i + 3)):$OSD_PORT is in use (AVALON_TEST_OSD_PORT)"
done

# A unit's value of KEY (the last one wins, as in systemd).
unit_value() { sed -n "s/^$2=//p" "$1" | tail -n 1; }

# Starts instance $2 of unit $1 as systemd would: its ExecStart with %i
# replaced, as its User/Group, no new privileges, no capabilities, its
# UMask, NOTIFY_SOCKET pointing at a listener that records what it sends.
start_instance() {
    local unit=/lib/systemd/system/$1@.service inst=$2 name=$1@$2 cmd user group umask
    cmd=$(unit_value "$unit" ExecStart)
    cmd=${cmd//%i/$inst}
    user=$(unit_value "$unit" User)
    group=$(unit_value "$unit" Group)
    umask=$(unit_value "$unit" UMask)
    [ "$(unit_value "$unit" Type)" = notify ] || fail "$unit is not Type=notify"
    python3 - "$WORK/$name.sock" "$WORK/$name.notify" <<'EOF' &
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
with open(out, "a") as f:
    while True:
        msg = s.recv(4096).decode(errors="replace")
        f.write(msg.rstrip("\n") + "\n")
        f.flush()
        if "READY=1" in msg.split("\n"):
            break
EOF
    LISTENERS+=($!)
    for _ in $(seq 1 50); do [ -S "$WORK/$name.sock" ] && break; sleep 0.1; done
    local -a argv
    read -ra argv <<<"$cmd"
    echo "$name: $cmd (as $user:$group)"
    (umask "$umask" && exec env -i PATH=/usr/bin:/bin NOTIFY_SOCKET="$WORK/$name.sock" \
        setpriv --reuid="$user" --regid="$group" --init-groups --no-new-privs \
        --bounding-set=-all -- "${argv[@]}") >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}

say "start 3 MDS (127.0.0.1-3) and 3 OSDs (127.0.0.4-6) from the units' ExecStart"
for i in 1 2 3; do start_instance avalon-mds "$i"; done
for n in 1 2 3; do start_instance avalon-osd "$n"; done

say "wait for READY=1 from each (sd_notify)"
for name in avalon-mds@1 avalon-mds@2 avalon-mds@3 avalon-osd@1 avalon-osd@2 avalon-osd@3; do
    for _ in $(seq 1 600); do
        grep -qx READY=1 "$WORK/$name.notify" 2>/dev/null && break
        sleep 0.2
    done
    grep -qx READY=1 "$WORK/$name.notify" 2>/dev/null || fail "$name sent no READY=1 in 120 s (log: $WORK/$name.log)"
    echo "$name: $(tr '\n' ' ' <"$WORK/$name.notify")"
done

MDS_ADDRS=127.0.0.1:$MDS_PORT,127.0.0.2:$MDS_PORT,127.0.0.3:$MDS_PORT
say "avalonctl wait-healthy, status"
avalonctl wait-healthy --insecure --mds "$MDS_ADDRS" --timeout 180 >"$WORK/wait-healthy.log" 2>&1 ||
    fail "cluster not healthy: $(tail -n 5 "$WORK/wait-healthy.log")"
avalonctl status --insecure --mds "$MDS_ADDRS" --json >"$WORK/status.json"
python3 - "$WORK/status.json" "$MDS_PORT" "$OSD_PORT" <<'EOF'
import json, sys
st = json.load(open(sys.argv[1]))
mds_port, osd_port = sys.argv[2], sys.argv[3]
mds = sorted(m["addr"] for m in st["mds"] if m["role"] != "unreachable")
osds = sorted(o["addr"] for o in st["osds"] if o["state"] == "up")
want_mds = [f"127.0.0.{i}:{mds_port}" for i in (1, 2, 3)]
want_osd = [f"127.0.0.{i}:{osd_port}" for i in (4, 5, 6)]
assert mds == want_mds, f"MDS addresses {mds}, want {want_mds}"
assert osds == want_osd, f"OSD addresses {osds}, want {want_osd}"
assert st["leader_id"], "no leader"
print(f"status: leader {st['leader_id']}, MDS {mds}, OSDs up {osds}, {st['health']}")
EOF

# --- 3. mount from an fstab line and use it --------------------------------
say "mount -a from an fstab line"
mkdir -p "$MNT"
echo "$MDS_ADDRS:/  $MNT  fuse.avalon  _netdev,noatime,insecure,connect_timeout=60,log=$WORK/client.log  0 0" >"$WORK/fstab"
cat "$WORK/fstab"
mount -a -T "$WORK/fstab"
findmnt -n -o SOURCE,FSTYPE "$MNT" | tee "$WORK/findmnt.out"
grep -q "fuse.avalon" "$WORK/findmnt.out" || fail "not mounted as fuse.avalon"

say "write and read files"
mkdir -p "$MNT/dir/sub"
for i in $(seq 1 50); do echo "file $i" >"$MNT/dir/sub/f$i"; done
head -c $((20 << 20)) /dev/urandom >"$WORK/big"
cp "$WORK/big" "$MNT/dir/big"
mv "$MNT/dir/sub/f50" "$MNT/dir/renamed"
rm "$MNT/dir/sub/f49"
sync
umount "$MNT"
mount -a -T "$WORK/fstab"
cmp "$WORK/big" "$MNT/dir/big" || fail "20 MiB file differs after remount"
[ "$(cat "$MNT/dir/sub/f7")" = "file 7" ] || fail "small file differs"
[ "$(cat "$MNT/dir/renamed")" = "file 50" ] || fail "renamed file differs"
[ ! -e "$MNT/dir/sub/f49" ] || fail "removed file is back"
[ "$(find "$MNT/dir/sub" -type f | wc -l)" = 48 ] || fail "wrong file count"
echo "50 small files, a 20 MiB file, a rename and an unlink: read back after remount"
umount "$MNT"
findmnt "$MNT" >/dev/null && fail "still mounted"

say "stop the daemons (SIGTERM, as systemctl stop)"
for pid in "${PIDS[@]}"; do kill -TERM "$pid"; done
for pid in "${PIDS[@]}"; do wait "$pid" || fail "a daemon exited with $? on SIGTERM (logs in $WORK)"; done
PIDS=()
for pid in "${LISTENERS[@]}"; do kill "$pid" 2>/dev/null || true; done
LISTENERS=()

# --- 4. remove and purge keep the data ---------------------------------------
snapshot() { (cd /var/lib/avalon && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
snapshot >"$WORK/data.before"
echo "data: $(wc -l <"$WORK/data.before") files under /var/lib/avalon"
grep -q "./osd-1/" "$WORK/data.before" || fail "no OSD data under /var/lib/avalon/osd-1"

say "apt remove"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "${PACKAGES[@]}" >"$WORK/apt-remove.log" 2>&1
[ ! -e /usr/bin/avalon-mds ] || fail "/usr/bin/avalon-mds still there after remove"
snapshot | diff -q - "$WORK/data.before" >/dev/null || fail "data changed by apt remove"
[ -f /etc/avalon/mds-1.toml ] || fail "remove deleted /etc/avalon/mds-1.toml"
getent passwd avalon >/dev/null || fail "remove deleted the avalon user"
echo "data intact after remove; configs and user kept"

say "apt purge (without AVALON_PURGE_DATA)"
# Only packages with conffiles are left after remove (the others are gone).
mapfile -t left < <(known_packages)
[ ${#left[@]} -gt 0 ] || fail "no package left in config-files state after remove"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "${left[@]}" >"$WORK/apt-purge.log" 2>&1 ||
    fail "apt purge: $(tail -n 5 "$WORK/apt-purge.log")"
[ -z "$(known_packages)" ] || fail "still known to dpkg after purge: $(known_packages)"
snapshot | diff -q - "$WORK/data.before" >/dev/null || fail "data changed by apt purge"
[ ! -e /etc/avalon/mds.example.toml ] || fail "purge left the example config"
echo "data intact after purge"

say "install again, purge with AVALON_PURGE_DATA=yes"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$(deb_of avalon-mds)" "$(deb_of avalon-osd)" >>"$WORK/apt-install.log" 2>&1
AVALON_PURGE_DATA=yes DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq avalon-mds avalon-osd >>"$WORK/apt-purge.log" 2>&1
if compgen -G "/var/lib/avalon/mds-*" >/dev/null || compgen -G "/var/lib/avalon/osd-*" >/dev/null; then
    fail "AVALON_PURGE_DATA=yes purge left data: $(ls /var/lib/avalon)"
fi
echo "data deleted by the purge with the flag"

say "packages: ok"
