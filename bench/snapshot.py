#!/usr/bin/env python3
"""How long taking a snapshot of a large directory takes (issue #24: under
1 s for 100,000 files).

Starts `avalonctl up` (3 MDS, 3 OSDs, a mount) in a fresh temporary
directory, creates --files empty files in one directory through the mount
(and fsyncs it, so delegated creates have reached the MDS), then times
`mkdir DIR/.snap/NAME` on the mount and `avalonctl snapshot create`, a
listing of the snapshot, and their removal. Everything started is stopped
at the end. Run as root from the repository, after a release build:

    bench/snapshot.py [--files 100000] [--json out.json]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AVALON_BIN_DIR") or os.path.join(ROOT, "target", "release")


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="avalon-snapbench-", dir="/var/tmp")
    cluster = os.path.join(base, "c")
    mnt = os.path.join(cluster, "mnt")
    ctl = os.path.join(BIN, "avalonctl")
    log = open(os.path.join(base, "up.log"), "w")
    up = subprocess.Popen([ctl, "up", cluster], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    out = {"files": args.files}
    try:
        deadline = time.time() + 120
        while not is_mounted(mnt):
            if up.poll() is not None or time.time() > deadline:
                sys.exit(f"avalonctl up failed; see {log.name}")
            time.sleep(0.2)
        d = os.path.join(mnt, "big")
        os.mkdir(d)

        def create():
            for i in range(args.files):
                os.close(os.open(os.path.join(d, f"f{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        out["create_s"] = timed(create)
        out["mkdir_snap_s"] = timed(lambda: os.mkdir(os.path.join(d, ".snap", "s1")))
        out["avalonctl_create_s"] = timed(lambda: subprocess.run(
            [ctl, "snapshot", "create", "/big", "s2", "--cluster", cluster],
            check=True, stdout=subprocess.DEVNULL))
        n = 0

        def listing():
            nonlocal n
            n = len(os.listdir(os.path.join(d, ".snap", "s1")))

        out["list_snapshot_s"] = timed(listing)
        assert n == args.files, f"snapshot lists {n} files"
        out["rmdir_snap_s"] = timed(lambda: os.rmdir(os.path.join(d, ".snap", "s1")))
        subprocess.run([ctl, "snapshot", "rm", "/big", "s2", "--cluster", cluster],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                subprocess.run([ctl, "down", cluster])
                up.kill()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt])
        shutil.rmtree(base, ignore_errors=True)
    for k, v in out.items():
        print(f"{k:>20}: {v:.3f}" if isinstance(v, float) else f"{k:>20}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
