#!/usr/bin/env python3
"""MDS leader failover as a client sees it.

Starts a local cluster (3 MDS, 3 OSDs, one FUSE mount) with `avalonctl up`
under a temporary directory, all on 127.0.0.1. Each repeat runs a create
loop through the mount (open(O_CREAT|O_EXCL) of a new name, then close; the
time of every successful create is recorded), kills the current MDS leader
with SIGKILL at a random moment 3-5 s into the loop, keeps the loop going
until --after seconds after the first create that succeeded after the kill,
then stops it, restarts the killed MDS with its own command line and waits
until all three MDS agree again. The figure of a repeat is the longest gap
between two successful creates in its loop (the failover as the client saw
it).

    bench/failover.py                   # 10 repeats
    bench/failover.py --repeats 3 --seed 7 --json /tmp/failover.json
    bench/failover.py --mounts 2        # one more (idle) mount of the cluster

With --mounts 2 or more, the other mounts hold sessions (and so, as far as
a new leader knows, leases), which the new leader must wait out before it
acknowledges a change (docs/ARCHITECTURE.md, "Failover timing").

Prints each repeat and the distribution (min, median, p90, max) of the
longest gaps; exits 1 if any gap is >= --limit (default 2 s) or a repeat
failed (a create that returned an error, the loop stuck past --stall-max).
Everything it started is stopped and unmounted at the end, on errors and on
Ctrl-C. Run as root (FUSE mount). Python 3 standard library only.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AVALON_BIN_DIR") or os.path.join(ROOT, "target", "release")
AVALONCTL = os.path.join(BIN, "avalonctl")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_proc(p, timeout=15):
    """SIGTERM, then SIGKILL: a Popen we started."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


# ---------------------------------------------------------------- the loop

def create_loop(dirpath, out_path, stop_path, limit):
    """The child process: creates new names in `dirpath` until `stop_path`
    exists or `limit` seconds passed; writes one line per create to
    `out_path` (CLOCK_MONOTONIC seconds, then "ok" or the error)."""
    lines = []
    start = time.monotonic()
    i = 0
    last_check = 0.0
    while True:
        now = time.monotonic()
        if now - start > limit:
            break
        if now - last_check > 0.05:
            last_check = now
            if os.path.exists(stop_path):
                break
        name = os.path.join(dirpath, f"f{i}")
        try:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            lines.append(f"{time.monotonic():.6f} ok {i}\n")
        except OSError as e:
            lines.append(f"{time.monotonic():.6f} err {i} {e.errno} {e.strerror}\n")
        i += 1
        if len(lines) >= 256:
            with open(out_path, "a") as f:
                f.writelines(lines)
            lines = []
    with open(out_path, "a") as f:
        f.writelines(lines)
        f.write("done\n")


def read_loop(out_path):
    oks, errs, done = [], [], False
    try:
        with open(out_path) as f:
            for line in f:
                parts = line.split()
                if parts == ["done"]:
                    done = True
                elif len(parts) >= 3 and parts[1] == "ok":
                    oks.append((float(parts[0]), int(parts[2])))
                elif len(parts) >= 3:
                    errs.append(line.strip())
    except FileNotFoundError:
        pass
    return oks, errs, done


# ---------------------------------------------------------------- cluster

class Cluster:
    """`avalonctl up BASE` in its own session, plus the MDS processes this
    harness restarted (`avalonctl up` only knows its own children)."""

    def __init__(self, base):
        self.base = base
        self.mnt = os.path.join(base, "mnt")
        self.up = None
        self.restarted = []
        self.extra = []

    def start(self, timeout):
        log(f"starting the cluster in {self.base}")
        self.uplog = open(os.path.join(os.path.dirname(self.base), "avalon-up.log"), "w")
        self.up = subprocess.Popen([AVALONCTL, "up", self.base], stdin=subprocess.DEVNULL,
                                   stdout=self.uplog, stderr=self.uplog,
                                   start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt):
            if self.up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"avalonctl up failed; see {self.uplog.name}")
            time.sleep(0.2)

    def status(self):
        r = subprocess.run([AVALONCTL, "status", self.base, "--json"],
                           capture_output=True, text=True, timeout=30)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def leader(self):
        """(id, pid) of the leader, as the MDS nodes report it."""
        st = self.status()
        if not st or not st.get("leader_id"):
            return None
        for m in st["mds"]:
            if m["id"] == st["leader_id"] and m["role"] == "leader" and m["pid"]:
                return m["id"], m["pid"]
        return None

    def wait_whole(self, timeout):
        """Until every MDS answers, one is leader and all applied the same
        index (the restarted one caught up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st and st.get("leader_id"):
                mds = st["mds"]
                roles = sorted(m["role"] for m in mds)
                applied = {m["last_applied"] for m in mds}
                if roles == ["follower", "follower", "leader"] and len(applied) == 1:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the MDS group did not become whole within {timeout} s")

    def mount_extra(self, n):
        """Mount number `n` (2, 3, ...) of the same cluster at BASE/mnt<n>."""
        st = self.status()
        if not st:
            raise RuntimeError("no cluster status for the extra mount")
        source = ",".join(m["addr"] for m in st["mds"]) + ":/"
        path = os.path.join(self.base, f"mnt{n}")
        os.makedirs(path, exist_ok=True)
        logf = os.path.join(self.base, "logs", f"client{n}.log")
        subprocess.run([os.path.join(BIN, "avalon-fuse"), source, path, "-o", f"log={logf}"],
                       check=True, capture_output=True, timeout=120)
        self.extra.append(path)
        if not is_mounted(path):
            raise RuntimeError(f"extra mount {path} did not mount")

    def restart(self, cmdline, mds_id):
        logf = open(os.path.join(self.base, "logs", f"mds{mds_id}.log"), "a")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        p = subprocess.Popen(cmdline, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                             env=env, start_new_session=True)
        self.restarted.append(p)
        return p

    def stop(self):
        for path in self.extra:
            if is_mounted(path):
                subprocess.run(["fusermount3", "-u", path], capture_output=True, timeout=60)
            if is_mounted(path):
                subprocess.run(["umount", "-l", path], capture_output=True, timeout=60)
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
            try:
                self.up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log("avalonctl up did not stop; avalonctl down")
                subprocess.run([AVALONCTL, "down", self.base], timeout=120)
                stop_proc(self.up)
        for p in self.restarted:
            stop_proc(p)
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)


# ---------------------------------------------------------------- one repeat

def one_repeat(a, c, n, rng, work):
    """Runs repeat `n`; returns a dict with its figures."""
    d = os.path.join(c.mnt, f"r{n}")
    os.mkdir(d)
    out = os.path.join(work, f"loop{n}.txt")
    stop = os.path.join(work, f"stop{n}")
    leader = c.leader()
    if leader is None:
        raise RuntimeError("no MDS leader before the repeat")
    victim, pid = leader
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = [x.decode() for x in f.read().split(b"\0") if x]
    kill_after = rng.uniform(a.kill_min, a.kill_max)
    limit = kill_after + a.stall_max + a.after + 10
    loop = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_loop", d, out, stop,
                             str(limit)])
    t0 = time.monotonic()
    try:
        time.sleep(kill_after)
        # The leader may have changed meanwhile (it should not).
        leader = c.leader()
        if leader is None:
            raise RuntimeError("no MDS leader at the kill")
        victim, pid = leader
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [x.decode() for x in f.read().split(b"\0") if x]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        log(f"repeat {n}: killed leader mds{victim} (pid {pid}) {killed - t0:.2f} s in")
        # Until creates came back, then --after seconds more.
        resumed = None
        while True:
            time.sleep(0.1)
            oks, errs, done = read_loop(out)
            if done:
                break
            if resumed is None:
                # The loop flushes every 256 creates: look at what is there.
                after = [t for t, _ in oks if t > killed]
                if after:
                    resumed = after[0]
            now = time.monotonic()
            if resumed is None and now - killed > a.stall_max:
                break
            if resumed is not None and now - resumed > a.after:
                break
        open(stop, "w").close()
        try:
            loop.wait(timeout=a.stall_max + 30)
        except subprocess.TimeoutExpired:
            loop.kill()
            raise RuntimeError("the create loop did not stop (a create hung)")
    finally:
        if loop.poll() is None:
            open(stop, "w").close()
            try:
                loop.wait(timeout=60)
            except subprocess.TimeoutExpired:
                loop.kill()
    oks, errs, done = read_loop(out)
    times = [t for t, _ in oks]
    gaps = [(b - x, x) for x, b in zip(times, times[1:])]
    gap, gap_at = max(gaps) if gaps else (float("inf"), 0.0)
    after = [t for t in times if t > killed]
    first_after = (after[0] - killed) if after else None
    # Every acknowledged name is there, once.
    names = os.listdir(d)
    want = {f"f{i}" for _, i in oks}
    missing = sorted(want - set(names))
    extra = sorted(set(names) - want)
    r = {
        "repeat": n,
        "victim": victim,
        "kill_at_s": round(killed - t0, 3),
        "creates": len(oks),
        "errors": errs[:5],
        "error_count": len(errs),
        "longest_gap_s": round(gap, 3),
        "gap_starts_after_kill_s": round(gap_at - killed, 3),
        "first_create_after_kill_s": None if first_after is None else round(first_after, 3),
        "missing": missing[:5],
        "missing_count": len(missing),
        "unexpected": extra[:5],
        "loop_done": done,
    }
    log(f"repeat {n}: {len(oks)} creates, longest gap {gap:.3f} s "
        f"(starting {gap_at - killed:+.3f} s from the kill), "
        f"{len(errs)} errors, {len(missing)} missing")
    # Restart the victim and wait for a whole group before the next repeat.
    c.restart(cmdline, victim)
    c.wait_whole(a.recover_max)
    return r


def pct(v, p):
    s = sorted(v)
    k = max(0, min(len(s) - 1, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the kill moments (printed when not given)")
    ap.add_argument("--kill-min", type=float, default=3.0, help="earliest kill, s into the loop")
    ap.add_argument("--kill-max", type=float, default=5.0, help="latest kill, s into the loop")
    ap.add_argument("--after", type=float, default=4.0,
                    help="seconds the loop goes on after creates came back")
    ap.add_argument("--stall-max", type=float, default=60.0,
                    help="give up on a repeat whose creates do not come back within this")
    ap.add_argument("--recover-max", type=float, default=120.0,
                    help="seconds to wait for the restarted MDS to catch up")
    ap.add_argument("--mounts", type=int, default=1,
                    help="mounts of the cluster; the loop runs on the first, the others idle")
    ap.add_argument("--limit", type=float, default=2.0,
                    help="exit 1 if any longest gap is at least this (s)")
    ap.add_argument("--dir", default=None, help="work directory (default: a new one in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--_loop", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._loop:
        create_loop(a._loop[0], a._loop[1], a._loop[2], float(a._loop[3]))
        return 0
    if os.geteuid() != 0:
        log("failover.py: needs root (FUSE mount)")
        return 2
    if not os.path.exists(AVALONCTL):
        log(f"failover.py: {AVALONCTL} not found; cargo build --release --workspace --bins")
        return 2
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    log(f"seed {seed}")
    rng = random.Random(seed)
    work = a.dir or tempfile.mkdtemp(prefix="avalon-failover.", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    c = Cluster(os.path.join(work, "cluster"))
    results, failure = [], None

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        c.start(180)
        c.wait_whole(a.recover_max)
        for n in range(2, a.mounts + 1):
            c.mount_extra(n)
        for n in range(a.repeats):
            results.append(one_repeat(a, c, n, rng, work))
    except (Exception, KeyboardInterrupt) as e:
        failure = f"{type(e).__name__}: {e}"
        log(f"failover.py: {failure}")
    finally:
        c.stop()
    gaps = [r["longest_gap_s"] for r in results]
    bad = [r for r in results
           if r["longest_gap_s"] >= a.limit or r["error_count"] or r["missing_count"]
           or r["unexpected"]]
    summary = {"seed": seed, "repeats": len(results), "mounts": a.mounts, "limit_s": a.limit,
               "results": results, "failure": failure}
    if gaps:
        summary.update(min_s=min(gaps), median_s=round(statistics.median(gaps), 3),
                       p90_s=pct(gaps, 90), max_s=max(gaps))
        print(f"longest gap between successful creates over {len(gaps)} repeats "
              f"(seed {seed}, {a.mounts} mount{'s' if a.mounts > 1 else ''}):")
        print("  " + " ".join(f"{g:.2f}" for g in gaps))
        print(f"  min {min(gaps):.2f} s  median {statistics.median(gaps):.2f} s  "
              f"p90 {pct(gaps, 90):.2f} s  max {max(gaps):.2f} s  (limit {a.limit:.2f} s)")
    for r in bad:
        print(f"  repeat {r['repeat']}: gap {r['longest_gap_s']} s, errors {r['errors']}, "
              f"missing {r['missing']}, unexpected {r['unexpected']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    if not a.keep and failure is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"work directory kept: {work}")
    return 1 if (bad or failure or len(results) < a.repeats) else 0


if __name__ == "__main__":
    sys.exit(main())
