#!/usr/bin/env python3
"""Avalon benchmark harness.

Starts, in one run and all on 127.0.0.1, its own Avalon cluster (3 MDS,
3 OSDs), a local directory, a FUSE passthrough (bindfs over a local
directory) and a peer distributed filesystem, MooseFS (1 master,
3 chunkservers, goal 3, trash time 0; installed from Debian packages and
started by hand with its own configs under the run's temp dir). It runs the
same workloads on each system in turn (interleaved, the order rotated on
every --repeat), prints one column per system, the medians over the
repeats, and Avalon's speed relative to bindfs and to MooseFS. Everything it
started is stopped at the end, on errors and on Ctrl-C.

    bench/bench.py                                  # everything, default sizes
    bench/bench.py --files 500 --fio-size 64M --fio-time 3 --small-files 500 \\
                   --tree-entries 2000               # quick look
    bench/bench.py --only meta,cached --repeat 3 --json /tmp/b.json --chart /tmp/b.svg
    bench/bench.py --no-peers --systems local,bindfs,avalon
    bench/bench.py --only scale --scale-files 1000000 --systems moosefs,avalon

Workloads (--only takes a comma-separated list of these):
  meta    create / stat / rename / unlink of --files empty files by one
          process, then by --workers processes, each in its own directory
  ls      `ls -l` of a directory of --files entries, after dropping caches
  small   write --small-files files of --small-size bytes (no fsync), then
          drop caches and read them all back: files/s each way
  tree    real work on a real source tree (glibc from Debian's glibc-source,
          ~21k entries, decompressed once to a local .tar so xz is not
          measured): untar, `find`, `du -s` (caches dropped before each),
          `rm -rf`; seconds, lower is better
  cached  warm figures: stat of the same --cached-files files again (they
          were stat'ed once just before), and fio 4k random reads (psync,
          buffered) of a --cached-size file that was read once first; both
          fio runs with --invalidate=0 (fio's default drops the file's page
          cache when it opens it, so every read was a miss)
  fio     sequential write and read (bs=1M, --fio-size, end_fsync; caches
          dropped before the read), 4k random read and write (--fio-time
          seconds each, psync)
  fsync   4 KiB pwrite + fsync on one file in a loop: overwriting offset 0,
          appending, and overwriting + fdatasync (--sync-time seconds or
          --sync-ops loops each); loops/s
  sqlite  sqlite3 in WAL mode, synchronous=FULL, --sqlite-inserts
          autocommit inserts by one connection; inserts/s
  scale   (only when named) --workers processes, each in its own directory,
          create empty files up to --scale-files in total, in ten steps;
          after each: the step's create rate, worst and p99 single create,
          the stat rate over --scale-stats random files created so far, and
          the RSS of each metadata server (avalon-mds, mfsmaster). Stops
          after the step that passes --scale-time seconds.

Each workload starts on a quiet machine: after the previous one (on any
system) ended, the harness syncs and waits until the CPUs are at least
--settle-idle idle (at most --settle-max seconds; the wait is logged), so
one system's background work (deletions, write-back) is not measured as
another's workload.

Reading the output: one column per system; `avalon/bindfs` and
`avalon/moosefs` are speed ratios (for time metrics the inverse of the time
ratio), so 1.0 is parity, 0.5 twice as slow, 2.0 twice as fast. --chart
draws the same speed ratio to bindfs for every system and metric (log scale).
Workloads that fail on one system are reported (stderr and JSON `errors`)
and shown as n/a; the others go on.

Run as root (FUSE mounts, drop_caches). Packages it needs (bindfs, fio,
moosefs-*, glibc-source) are installed with apt when missing, with a
policy-rc.d that keeps package scripts from starting daemons. Peers are
skipped with --no-peers, or with a message when their packages cannot be
installed or they fail to start.
"""

import argparse
import array
import contextlib
import glob
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AVALON_BIN_DIR") or os.path.join(ROOT, "target", "release")
# Extra arguments of `avalonctl up` (--no-metrics, --insecure).
AVALON_UP_ARGS = []
GROUPS = ["meta", "ls", "small", "tree", "cached", "fio", "fsync", "sqlite"]
# Long workloads, run only when --only names them.
EXTRA_GROUPS = ["scale"]
PEERS = ["moosefs"]
MOOSEFS_PKGS = ["moosefs-master", "moosefs-chunkserver", "moosefs-client"]
POLICY_RC = "/usr/sbin/policy-rc.d"
CMD_TIMEOUT = 3600  # seconds, any single external command (tar, find, fio...)

# metric name -> True when higher is better (rates), False for times.
METRICS = {}


def metric(name, higher=True):
    METRICS.setdefault(name, higher)
    return name


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- packages

@contextlib.contextmanager
def no_daemon_starts():
    """A policy-rc.d that exits 101 while apt runs, so that package scripts
    start no daemon with the default (all-interface) configs. An existing
    one that already says 101 is left alone; any other is put back after."""
    saved = None
    if os.path.exists(POLICY_RC):
        with open(POLICY_RC) as f:
            if "exit 101" in f.read():
                yield
                return
        saved = POLICY_RC + ".avalon-bench-saved"
        os.rename(POLICY_RC, saved)
    try:
        with open(POLICY_RC, "w") as f:
            f.write("#!/bin/sh\n# avalon bench.py: no daemon starts during apt\nexit 101\n")
        os.chmod(POLICY_RC, 0o755)
        yield
    finally:
        os.unlink(POLICY_RC)
        if saved:
            os.rename(saved, POLICY_RC)


_apt_updated = False


def apt_install(pkgs):
    """Installs the Debian packages that are not installed yet. Raises
    RuntimeError with apt's last words when that fails."""
    global _apt_updated
    missing = [p for p in pkgs if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
    ).stdout.strip() != "install ok installed"]
    if not missing:
        return
    log(f"installing {' '.join(missing)} (apt)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with no_daemon_starts():
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            _apt_updated = True
        r = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env,
                           capture_output=True, text=True)
    if r.returncode != 0:
        tail = " / ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"apt-get install {' '.join(missing)} failed ({r.returncode}): {tail}")


# ---------------------------------------------------------------- helpers

def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def cpu_idle(window):
    """Fraction of CPU time idle over the next `window` seconds."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # idle + iowait
    t0, i0 = snap()
    time.sleep(window)
    t1, i1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def settle(a):
    """Syncs, then waits until the machine is quiet (see the module doc).
    Returns the seconds waited."""
    t = time.time()
    subprocess.run(["sync"], timeout=CMD_TIMEOUT)
    quiet = 0
    while quiet < 2 and time.time() - t < a.settle_max:
        quiet = quiet + 1 if cpu_idle(0.5) >= a.settle_idle else 0
    return time.time() - t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    kw.setdefault("timeout", CMD_TIMEOUT)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def timed(cmd, **kw):
    t = time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - t


def stop_proc(p, sig=signal.SIGTERM, timeout=60):
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"pid {p.pid} did not stop in {timeout}s; SIGKILL")
        p.kill()
        p.wait(timeout=30)


def unmount(path):
    if is_mounted(path):
        if subprocess.run(["umount", path]).returncode != 0:
            time.sleep(1)
            subprocess.run(["umount", "-l", path])


def procs_named(comm, arg_part):
    """Pids of running processes named `comm` with `arg_part` in their
    command line."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip() != comm[:15]:
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if arg_part.encode() in f.read():
                    out.append(int(d))
        except OSError:
            continue
    return sorted(out)


def rss_mb(pid):
    """Resident memory of a process in MB (10^6 bytes), None once gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def non_loopback_listeners(pids):
    """Listening TCP sockets of these pids not bound to 127.0.0.0/8."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    bad = []
    for line in out.splitlines():
        if any(f"pid={p}," in line for p in pids):
            local = line.split()[3]
            if not local.startswith("127."):
                bad.append(line.strip())
    return bad


# ---------------------------------------------------------------- systems

class System:
    """A directory to benchmark, with setup and teardown."""
    peer = False

    def __init__(self, name, path):
        self.name, self.path = name, path

    def start(self):
        pass

    def stop(self):
        pass

    def info(self):
        return {}

    def meta_pids(self):
        """Pids of this system's metadata servers (their RSS is reported)."""
        return []


class Local(System):
    def start(self):
        os.makedirs(self.path, exist_ok=True)


class Bindfs(System):
    def __init__(self, name, base):
        super().__init__(name, os.path.join(base, "mnt"))
        self.src = os.path.join(base, "src")

    def start(self):
        os.makedirs(self.src, exist_ok=True)
        os.makedirs(self.path, exist_ok=True)
        subprocess.run(["bindfs", "--no-allow-other", self.src, self.path], check=True)

    def stop(self):
        unmount(self.path)


class Avalon(System):
    def __init__(self, name, base):
        super().__init__(name, os.path.join(base, "mnt"))
        self.base = base
        self.proc = None

    def start(self):
        # Own session: a Ctrl-C reaches the harness only, which then stops
        # the cluster in order.
        self.logfile = os.path.join(os.path.dirname(self.base), "avalon-up.log")
        self.proc = subprocess.Popen([os.path.join(BIN, "avalonctl"), "up", self.base] + AVALON_UP_ARGS,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.logfile, "w"), start_new_session=True)
        deadline = time.time() + 120
        while not is_mounted(self.path):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"avalonctl up failed; see {self.logfile}")
            time.sleep(0.2)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log("avalonctl up did not stop; avalonctl down")
                subprocess.run([os.path.join(BIN, "avalonctl"), "down", self.base])
                stop_proc(self.proc, signal.SIGKILL)
        unmount(self.path)

    def meta_pids(self):
        return procs_named("avalon-mds", self.base)


class MooseFS(System):
    """mfsmaster + 3 mfschunkservers + mfsmount, all on 127.0.0.1, each with
    its own config, data dir and lock file under `base`, run in the
    foreground as children of the harness.

    MooseFS refuses a loopback master address on the chunkserver side, so
    chunkservers connect from BIND_HOST 127.0.0.1 to MASTER_HOST 0.0.0.0
    (which Linux routes to the loopback listener) and the master remaps the
    127.0.0.1 source to 0.0.0.0 (REMAP_*), the address it hands to clients,
    which again reaches the loopback listeners."""
    peer = True
    CHUNKSERVERS = 3

    def __init__(self, name, base):
        super().__init__(name, os.path.join(base, "mnt"))
        self.base = base
        self.procs = []   # (name, Popen) in start order
        self.mount_proc = None

    def _cfg(self, path, opts):
        with open(path, "w") as f:
            for k, v in opts.items():
                f.write(f"{k} = {v}\n")

    def _spawn(self, name, cmd):
        logf = open(os.path.join(self.base, f"{name}.log"), "w")
        p = subprocess.Popen(cmd, cwd=self.base, stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def start(self):
        b = self.base
        nice = os.nice(0)
        common = {"WORKING_USER": "root", "WORKING_GROUP": "root", "NICE_LEVEL": nice,
                  "DISABLE_OOM_KILLER": 0, "LOCK_MEMORY": 0}
        md = os.path.join(b, "master")
        os.makedirs(md)
        os.makedirs(self.path)
        shutil.copy("/var/lib/mfs/metadata.mfs.empty", os.path.join(md, "metadata.mfs"))
        with open(os.path.join(md, "mfsexports.cfg"), "w") as f:
            f.write("127.0.0.1 / rw,alldirs,maproot=0,mintrashtime=0\n")
        open(os.path.join(md, "mfstopology.cfg"), "w").close()
        self.ml_port, self.cs_port, self.cl_port = free_port(), free_port(), free_port()
        self._cfg(os.path.join(md, "mfsmaster.cfg"), {
            **common, "DATA_PATH": md,
            "EXPORTS_FILENAME": os.path.join(md, "mfsexports.cfg"),
            "TOPOLOGY_FILENAME": os.path.join(md, "mfstopology.cfg"),
            "MATOML_LISTEN_HOST": "127.0.0.1", "MATOML_LISTEN_PORT": self.ml_port,
            "MATOCS_LISTEN_HOST": "127.0.0.1", "MATOCS_LISTEN_PORT": self.cs_port,
            "MATOCL_LISTEN_HOST": "127.0.0.1", "MATOCL_LISTEN_PORT": self.cl_port,
            "REMAP_BITS": 32, "REMAP_SOURCE_IP_CLASS": "127.0.0.1",
            "REMAP_DESTINATION_IP_CLASS": "0.0.0.0",
            "REPLICATIONS_DELAY_INIT": 0,
        })
        self._spawn("mfsmaster", ["mfsmaster", "-f", "-c", os.path.join(md, "mfsmaster.cfg")])
        self._wait_listen(self.cl_port, "mfsmaster")
        for i in range(1, self.CHUNKSERVERS + 1):
            cd = os.path.join(b, f"cs{i}")
            os.makedirs(os.path.join(cd, "data"))
            with open(os.path.join(cd, "mfshdd.cfg"), "w") as f:
                f.write(os.path.join(cd, "data") + "\n")
            port = free_port()
            self._cfg(os.path.join(cd, "mfschunkserver.cfg"), {
                **common, "DATA_PATH": cd,
                "HDD_CONF_FILENAME": os.path.join(cd, "mfshdd.cfg"),
                "HDD_LEAVE_SPACE_DEFAULT": "1GiB",
                "BIND_HOST": "127.0.0.1", "MASTER_HOST": "0.0.0.0",
                "MASTER_PORT": self.cs_port,
                "CSSERV_LISTEN_HOST": "127.0.0.1", "CSSERV_LISTEN_PORT": port,
            })
            self._spawn(f"cs{i}", ["mfschunkserver", "-f", "-c",
                                   os.path.join(cd, "mfschunkserver.cfg")])
            self._wait_listen(port, f"cs{i}")
        self.mount_proc = self._spawn("mfsmount", [
            "mfsmount", "-f", self.path, "-H", "127.0.0.1", "-P", str(self.cl_port),
            "-o", "mfsbind=127.0.0.1"])
        deadline = time.time() + 30
        while not is_mounted(self.path):
            if self.mount_proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mfsmount failed; see {b}/mfsmount.log")
            time.sleep(0.2)
        run(["mfssetgoal", "-r", "3", self.path])
        run(["mfssettrashtime", "-r", "0", self.path])
        self._wait_goal3()
        bad = non_loopback_listeners([p.pid for _, p in self.procs])
        if bad:
            raise RuntimeError("MooseFS listens beyond loopback: " + "; ".join(bad))

    def _wait_listen(self, port, name, timeout=30):
        deadline = time.time() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            p = dict(self.procs).get(name)
            if (p and p.poll() is not None) or time.time() > deadline:
                raise RuntimeError(f"MooseFS {name} did not listen on 127.0.0.1:{port}; "
                                   f"see {self.base}/{name}.log")
            time.sleep(0.2)

    def _wait_goal3(self, timeout=60):
        """Until a freshly written chunk gets 3 valid copies: all three
        chunkservers registered and goal 3 achievable."""
        deadline = time.time() + timeout
        i = 0
        while True:
            probe = os.path.join(self.path, f".probe{i}")
            with open(probe, "wb") as f:
                f.write(os.urandom(65536))
                os.fsync(f.fileno())
            out = run(["mfscheckfile", probe])
            os.unlink(probe)
            if "chunks with 3 copies:" in out:
                return
            if time.time() > deadline:
                raise RuntimeError(f"MooseFS: no chunk with 3 copies after {timeout}s: {out.strip()}")
            i += 1
            time.sleep(1)

    def stop(self):
        unmount(self.path)
        if self.mount_proc:
            stop_proc(self.mount_proc, timeout=30)
        # chunkservers first, then the master (which saves its metadata)
        for name, p in reversed(self.procs):
            stop_proc(p, timeout=60)

    def meta_pids(self):
        return [p.pid for n, p in self.procs if n == "mfsmaster" and p.poll() is None]

    def info(self):
        v = subprocess.run(["mfsmaster", "-v"], capture_output=True, text=True).stdout.strip()
        return {"version": v, "chunkservers": self.CHUNKSERVERS, "goal": 3, "trashtime": 0}


# ---------------------------------------------------------------- workloads

def rate(n, secs):
    return n / secs if secs > 0 else float("inf")


def meta_worker(args):
    d, start, n = args
    names = [os.path.join(d, f"f{i}") for i in range(start, start + n)]
    res = {}
    t = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    res["create"] = time.perf_counter() - t
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    res["stat"] = time.perf_counter() - t
    t = time.perf_counter()
    for p in names:
        os.rename(p, p + ".r")
    res["rename"] = time.perf_counter() - t
    t = time.perf_counter()
    for p in names:
        os.unlink(p + ".r")
    res["unlink"] = time.perf_counter() - t
    return res


def bench_meta(d, a):
    out = {}
    files, workers = a.files, a.workers
    s = os.path.join(d, "single")
    os.mkdir(s)
    r = meta_worker((s, 0, files))
    for k, v in r.items():
        out[metric(f"{k}/s (1 worker)")] = rate(files, v)
    # Parallel workers, each in its own directory.
    per = max(1, files // workers)
    dirs = []
    for w in range(workers):
        dw = os.path.join(d, f"par{w}")
        os.mkdir(dw)
        dirs.append((dw, 0, per))
    # Workers get the default SIGTERM back: Pool's exit terminates them.
    with multiprocessing.Pool(workers, initializer=signal.signal,
                              initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        results = pool.map(meta_worker, dirs)
    for k in ("create", "stat", "rename", "unlink"):
        slowest = max(r[k] for r in results)
        out[metric(f"{k}/s ({workers} workers)")] = rate(per * workers, slowest)
    return out


def bench_ls(d, a):
    for i in range(a.files):
        os.close(os.open(os.path.join(d, f"e{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    drop_caches()
    t = timed(["ls", "-l", d])
    return {metric(f"ls -l entries/s ({a.files})"): rate(a.files, t)}


def bench_small(d, a):
    n, size = a.small_files, a.small_size
    data = os.urandom(size)
    names = [os.path.join(d, f"s{i}") for i in range(n)]
    t = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
    w = time.perf_counter() - t
    drop_caches()
    t = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_RDONLY)
        got = os.read(fd, size + 1)
        os.close(fd)
        if len(got) != size:
            raise RuntimeError(f"small files: {p} read back {len(got)} bytes, wrote {size}")
    r = time.perf_counter() - t
    kib = size // 1024
    return {metric(f"small {kib}K write files/s"): rate(n, w),
            metric(f"small {kib}K read files/s"): rate(n, r)}


def prepare_tree(work, entries):
    """The glibc source tarball decompressed once to a local .tar (the first
    `entries` members only when entries > 0). Returns (path, member count)."""
    apt_install(["glibc-source"])
    src = sorted(glob.glob("/usr/src/glibc/glibc-*.tar.xz"))
    if not src:
        raise RuntimeError("glibc-source installed but /usr/src/glibc/glibc-*.tar.xz missing")
    dst = os.path.join(work, "tree.tar")
    log(f"decompressing {src[-1]} to {dst}" + (f" (first {entries} entries)" if entries else ""))
    n = 0
    with tarfile.open(src[-1], "r:xz") as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            if entries and n >= entries:
                break
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
            n += 1
    return dst, n


def bench_tree(d, a):
    tar, n = a.tree_tar
    out = {}
    out[metric(f"untar {n} entries s", False)] = timed(["tar", "-xf", tar, "-C", d])
    drop_caches()
    out[metric("find s", False)] = timed(["find", d])
    drop_caches()
    out[metric("du -s s", False)] = timed(["du", "-s", d])
    out[metric("rm -rf s", False)] = timed(["rm", "-rf", os.path.join(d, os.listdir(d)[0])])
    return out


def fio(path, name, rw, bs, size, runtime=None, extra=()):
    cmd = ["fio", f"--name={name}", f"--directory={path}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--ioengine=psync", "--output-format=json", "--group_reporting",
           *extra]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    job = json.loads(run(cmd))["jobs"][0]
    part = job["write"] if rw in ("write", "randwrite") else job["read"]
    return part["bw_bytes"], part["iops"]


def bench_cached(d, a):
    out = {}
    n = a.cached_files
    names = [os.path.join(d, f"c{i}") for i in range(n)]
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    for p in names:  # first pass, not timed
        os.stat(p)
    passes, t = 0, time.perf_counter()
    while passes < 3 or (time.perf_counter() - t < 0.5 and passes < 100):
        for p in names:
            os.stat(p)
        passes += 1
    out[metric(f"warm stat/s ({n} files)")] = rate(n * passes, time.perf_counter() - t)
    keep = ["--invalidate=0"]
    fio(d, "cached", "read", "1M", a.cached_size, extra=keep)  # read once: now cached
    _, iops = fio(d, "cached", "randread", "4k", a.cached_size, runtime=a.fio_time,
                  extra=keep)
    out[metric(f"4k cached read IOPS ({a.cached_size})")] = iops
    return out


SERVER_COMMS = ("avalon-", "mfs", "bindfs")


def servers_cpu_s():
    """CPU seconds (user + system) used so far by the filesystems' own
    processes (Avalon's daemons and mount, MooseFS, bindfs): on a small
    machine CPU per byte is steadier than throughput."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        comm, rest = st[st.index("(") + 1:st.rindex(")")], st[st.rindex(")") + 2:].split()
        if comm.startswith(SERVER_COMMS):
            total += int(rest[11]) + int(rest[12])  # utime, stime
    return total / tick


def fio_size_gib(size):
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    n = size.upper().rstrip("B").rstrip("I")
    return float(n[:-1]) * units[n[-1]] / 2**30 if n[-1] in units else float(n) / 2**30


def bench_fio(d, a):
    out = {}
    gib = fio_size_gib(a.fio_size)
    cpu = servers_cpu_s()
    bw, _ = fio(d, "seq", "write", "1M", a.fio_size, extra=["--end_fsync=1"])
    out[metric("seq write MiB/s")] = bw / 2**20
    used, cpu = servers_cpu_s() - cpu, servers_cpu_s()
    if used > 0:  # none for a system without server processes (local)
        out[metric("seq write server CPU s/GiB", False)] = used / gib
    drop_caches()
    cpu = servers_cpu_s()
    bw, _ = fio(d, "seq", "read", "1M", a.fio_size)
    out[metric("seq read MiB/s")] = bw / 2**20
    used = servers_cpu_s() - cpu
    if used > 0:  # none for a system without server processes (local)
        out[metric("seq read server CPU s/GiB", False)] = used / gib
    drop_caches()
    _, iops = fio(d, "seq", "randread", "4k", a.fio_size, runtime=a.fio_time)
    out[metric("4k rand read IOPS")] = iops
    _, iops = fio(d, "seq", "randwrite", "4k", a.fio_size, runtime=a.fio_time,
                  extra=["--end_fsync=1"])
    out[metric("4k rand write IOPS")] = iops
    return out


def sync_loop(path, sync, append, secs, max_ops):
    """4 KiB pwrite + `sync` on one file, for `secs` seconds or `max_ops`
    loops: loops per second. Overwrites offset 0, or appends at the end."""
    buf = os.urandom(4096)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
        n, off = 0, 4096
        t = time.perf_counter()
        end = t + secs
        while n < max_ops:
            if append:
                os.pwrite(fd, buf, off)
                off += 4096
            else:
                os.pwrite(fd, buf, 0)
            sync(fd)
            n += 1
            if time.perf_counter() >= end:
                break
        return rate(n, time.perf_counter() - t)
    finally:
        os.close(fd)


def bench_fsync(d, a):
    """fsync-heavy loops on one file (see the module doc)."""
    out = {}
    for name, sync, append in (("overwrite 4k + fsync/s", os.fsync, False),
                               ("append 4k + fsync/s", os.fsync, True),
                               ("overwrite 4k + fdatasync/s", os.fdatasync, False)):
        p = os.path.join(d, "f-" + name.split()[0] + "-" + sync.__name__)
        out[metric(name)] = sync_loop(p, sync, append, a.sync_time, a.sync_ops)
    return out


def bench_sqlite(d, a):
    """sqlite in WAL mode (synchronous=FULL: the WAL is fsynced at every
    commit), `--sqlite-inserts` autocommit inserts of one short row."""
    import sqlite3
    db = sqlite3.connect(os.path.join(d, "bench.db"), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        n = a.sqlite_inserts
        t = time.perf_counter()
        for i in range(n):
            db.execute("INSERT INTO t (v) VALUES (?)", (f"row {i:08d}",))
        secs = time.perf_counter() - t
        if db.execute("SELECT count(*) FROM t").fetchone()[0] != n:
            raise RuntimeError("sqlite: rows missing after the inserts")
    finally:
        db.close()
    return {metric("sqlite WAL inserts/s"): rate(n, secs)}


def scale_create(args):
    """Creates files d/f{start}..; returns (seconds, files created, each
    create's latency in ms as packed floats). Stops at `deadline`."""
    d, start, n, deadline = args
    lat = array.array("f")
    t0 = time.perf_counter()
    for i in range(start, start + n):
        t = time.perf_counter()
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
        t1 = time.perf_counter()
        lat.append((t1 - t) * 1000)
        if t1 > deadline:
            break
    return time.perf_counter() - t0, len(lat), lat.tobytes()


def scale_stat(paths):
    t = time.perf_counter()
    for p in paths:
        os.stat(p)
    return time.perf_counter() - t


# Per-tenth figures of the scale workload, by system, one list per repeat.
SCALE_DETAILS = {}


def bench_scale(d, a, system):
    """8 (--workers) processes each create files in their own directory up
    to --scale-files in total, in ten steps; after each step the stat rate
    over a random sample of all files so far and the metadata servers' RSS.
    Stops after the step that passes --scale-time seconds."""
    total, workers = a.scale_files, a.workers
    dirs = [os.path.join(d, f"w{w}") for w in range(workers)]
    for dw in dirs:
        os.mkdir(dw)
    per_step = max(1, total // 10 // workers)
    done = [0] * workers
    rng = random.Random(20)
    deadline = time.perf_counter() + a.scale_time
    rows, all_lat, create_secs = [], array.array("f"), 0.0
    started = time.perf_counter()
    with multiprocessing.Pool(workers, initializer=signal.signal,
                              initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        for step in range(10):
            t = time.perf_counter()
            res = pool.map(scale_create, [(dirs[w], done[w], per_step, deadline)
                                          for w in range(workers)])
            secs = time.perf_counter() - t
            create_secs += secs
            lat = array.array("f")
            for w, (_, n, raw) in enumerate(res):
                done[w] += n
                part = array.array("f")
                part.frombytes(raw)
                lat.extend(part)
            all_lat.extend(lat)
            srt = sorted(lat)
            # Stat a sample of every file so far, in random order.
            k = min(a.scale_stats // workers, min(done)) if min(done) else 0
            sample = [[os.path.join(dirs[rng.randrange(workers)], f"f{rng.randrange(min(done))}")
                       for _ in range(k)] for _ in range(workers)]
            ts = time.perf_counter()
            pool.map(scale_stat, sample)
            stat_secs = time.perf_counter() - ts
            rss = [rss_mb(p) for p in system.meta_pids()]
            row = {"files": sum(done), "create_per_s": rate(len(lat), secs),
                   "create_max_ms": srt[-1] if srt else None,
                   "create_p99_ms": srt[int(len(srt) * 0.99)] if srt else None,
                   "stat_per_s": rate(k * workers, stat_secs) if k else None,
                   "mds_rss_mb": [round(r) for r in rss if r is not None],
                   "load": os.getloadavg()[0], "elapsed_s": time.perf_counter() - started}
            rows.append(row)
            log(f"    {row['files']:>10,} files: {fmt(row['create_per_s'])} creates/s "
                f"(max {fmt(row['create_max_ms'])} ms, p99 {fmt(row['create_p99_ms'])} ms), "
                f"{fmt(row['stat_per_s'])} stats/s, MDS RSS {row['mds_rss_mb']} MB, "
                f"load {row['load']:.1f}")
            if len(lat) < per_step * workers:
                log(f"    --scale-time {a.scale_time}s reached: stopping at {sum(done):,} files")
                break
    SCALE_DETAILS.setdefault(system.name, []).append(rows)
    srt = sorted(all_lat)
    out = {
        metric("scale create/s (first tenth)"): rows[0]["create_per_s"],
        metric("scale create/s (last tenth)"): rows[-1]["create_per_s"],
        metric("scale create/s (whole run)"): rate(len(all_lat), create_secs),
        metric("scale worst create ms", False): srt[-1],
        metric("scale p99 create ms", False): srt[int(len(srt) * 0.99)],
    }
    if rows[0]["stat_per_s"]:
        out[metric("scale stat/s (first tenth)")] = rows[0]["stat_per_s"]
        out[metric("scale stat/s (last tenth)")] = rows[-1]["stat_per_s"]
    if rows[-1]["mds_rss_mb"]:
        out[metric("scale MDS RSS MB (largest)", False)] = max(rows[-1]["mds_rss_mb"])
    return out


WORKLOADS = {"meta": bench_meta, "ls": bench_ls, "small": bench_small, "tree": bench_tree,
             "cached": bench_cached, "fio": bench_fio, "fsync": bench_fsync,
             "sqlite": bench_sqlite, "scale": bench_scale}
# Workloads that also take the System (for its server pids).
WANTS_SYSTEM = {"scale"}


# Workloads whose files stay until the system is torn down (removing
# millions of files would take longer than the workload); each repeat
# works in a directory of its own.
KEEP_FILES = {"scale"}


def run_workload(gname, s, a):
    d = os.path.join(s.path, f"bench-{gname}")
    if gname in KEEP_FILES:
        k = 1
        while os.path.exists(d):
            k += 1
            d = os.path.join(s.path, f"bench-{gname}-{k}")
    os.makedirs(d)
    try:
        if gname in WANTS_SYSTEM:
            return WORKLOADS[gname](d, a, s)
        return WORKLOADS[gname](d, a)
    finally:
        # Not after Ctrl-C: the whole temp dir goes once everything stopped.
        if gname not in KEEP_FILES and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            try:
                shutil.rmtree(d)
            except OSError as e:
                log(f"  cleaning {d}: {e}")
                subprocess.run(["rm", "-rf", d], timeout=CMD_TIMEOUT)


# ---------------------------------------------------------------- output

def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def speed_ratio(m, a, b):
    """Speed of a relative to b for metric m (>1: a is faster)."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b if METRICS.get(m, True) else b / a


def table(results, names, metrics):
    ratios = [(f"avalon/{p}", p) for p in ("bindfs", "moosefs")
              if "avalon" in names and p in names]
    w = max([28] + [len(m) + 2 for m in metrics])
    lines = [f"{'metric':<{w}}" + "".join(f"{n:>12}" for n in names)
             + "".join(f"{r:>16}" for r, _ in ratios)]
    for m in metrics:
        line = f"{m:<{w}}" + "".join(f"{fmt(results[n].get(m)):>12}" for n in names)
        for _, p in ratios:
            r = speed_ratio(m, results["avalon"].get(m), results[p].get(m))
            line += f"{(fmt(r) + 'x') if r else 'n/a':>16}"
        lines.append(line)
    if ratios:
        lines.append("ratios are speeds (time metrics inverted): >1 avalon faster, <1 slower")
    return "\n".join(lines)


COLORS = {"local": "#7f7f7f", "moosefs": "#ff7f0e", "avalon": "#1f77b4",
          "glusterfs": "#2ca02c"}


def chart(path, results, names, metrics, title):
    """Grouped horizontal bars, one group per metric, one bar per system:
    speed relative to bindfs on a log scale centred on 1 (bars to the right:
    faster than bindfs, to the left: slower)."""
    shown = [n for n in names if n != "bindfs"]
    vals = {(m, n): speed_ratio(m, results[n].get(m), results["bindfs"].get(m))
            for m in metrics for n in shown}
    present = [v for v in vals.values() if v]
    lo = 10 ** math.floor(math.log10(min(present + [0.1])))
    hi = 10 ** math.ceil(math.log10(max(present + [10])))
    lo, hi = max(lo, 1e-4), min(hi, 1e4)
    label_w, plot_w, right = 250, 560, 70
    bar_h, gap = 13, 12
    group_h = bar_h * len(shown) + gap
    top = 80
    height = top + group_h * len(metrics) + 50
    width = label_w + plot_w + right

    def x(v):
        v = min(max(v, lo), hi)
        return label_w + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
         f'{escape(title)}</text>',
         f'<text x="{width / 2}" y="37" text-anchor="middle" fill="#444">speed relative to bindfs '
         f'(log scale; right of 1x = faster than bindfs, time metrics inverted)</text>']
    # legend
    lx = label_w
    for n in shown:
        c = COLORS.get(n, "#9467bd")
        o.append(f'<rect x="{lx}" y="48" width="12" height="12" fill="{c}"/>'
                 f'<text x="{lx + 16}" y="58">{escape(n)}</text>')
        lx += 30 + 7 * len(n)
    o.append(f'<line x1="{lx}" y1="54" x2="{lx + 18}" y2="54" stroke="#d62728" '
             f'stroke-dasharray="4,3"/><text x="{lx + 22}" y="58">target: 1/1.5 of bindfs</text>')
    # grid
    bottom = top + group_h * len(metrics)
    dec = int(round(math.log10(lo)))
    while 10 ** dec <= hi * 1.0001:
        gx = x(10 ** dec)
        strong = dec == 0
        o.append(f'<line x1="{gx:.1f}" y1="{top - 5}" x2="{gx:.1f}" y2="{bottom}" '
                 f'stroke="{"#000" if strong else "#ddd"}" stroke-width="{1.5 if strong else 1}"/>')
        o.append(f'<text x="{gx:.1f}" y="{bottom + 15}" text-anchor="middle">{10.0 ** dec:g}x</text>')
        dec += 1
    tx = x(1 / 1.5)
    o.append(f'<line x1="{tx:.1f}" y1="{top - 5}" x2="{tx:.1f}" y2="{bottom}" stroke="#d62728" '
             f'stroke-dasharray="4,3"/>')
    for gi, m in enumerate(metrics):
        gy = top + gi * group_h
        if gi % 2:
            o.append(f'<rect x="0" y="{gy - gap / 2}" width="{width}" height="{group_h}" '
                     f'fill="#f5f5f5"/>')
        o.append(f'<text x="{label_w - 8}" y="{gy + bar_h * len(shown) / 2 + 4}" '
                 f'text-anchor="end">{escape(m)}</text>')
        for bi, n in enumerate(shown):
            v = vals[(m, n)]
            by = gy + bi * bar_h
            if not v:
                o.append(f'<text x="{x(1) + 4:.1f}" y="{by + bar_h - 3}" fill="#999">'
                         f'{escape(n)}: n/a</text>')
                continue
            x0, x1 = sorted((x(1), x(v)))
            o.append(f'<rect x="{x0:.1f}" y="{by + 1}" width="{max(x1 - x0, 1):.1f}" '
                     f'height="{bar_h - 2}" fill="{COLORS.get(n, "#9467bd")}">'
                     f'<title>{escape(n)} {escape(m)}: {fmt(v)}x bindfs</title></rect>')
            clipped = "+" if v > hi or v < lo else ""
            if v >= 1:
                o.append(f'<text x="{x1 + 3:.1f}" y="{by + bar_h - 3}">{fmt(v)}x{clipped}</text>')
            else:
                o.append(f'<text x="{x0 - 3:.1f}" y="{by + bar_h - 3}" text-anchor="end">'
                         f'{fmt(v)}x{clipped}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", metavar="LIST", help="comma-separated workloads to run, from: "
                    f"{','.join(GROUPS + EXTRA_GROUPS)} (default: all but {','.join(EXTRA_GROUPS)})")
    ap.add_argument("--systems", metavar="LIST", default="local,bindfs,moosefs,avalon",
                    help="comma-separated systems, from: local,bindfs,moosefs,avalon "
                    "(default: %(default)s)")
    ap.add_argument("--no-peers", action="store_true",
                    help="leave out the peer filesystems (MooseFS)")
    ap.add_argument("--repeat", metavar="K", type=int, default=1,
                    help="run everything K times (system order rotated) and report medians")
    ap.add_argument("--files", metavar="N", type=int, default=10000,
                    help="meta: files per phase; ls: directory entries (default: %(default)s)")
    ap.add_argument("--workers", metavar="W", type=int, default=8,
                    help="meta: parallel processes (default: %(default)s)")
    ap.add_argument("--scale-files", metavar="N", type=int, default=100000,
                    help="scale: files created in total (default: %(default)s)")
    ap.add_argument("--scale-stats", metavar="N", type=int, default=20000,
                    help="scale: files stat'ed after each tenth (default: %(default)s)")
    ap.add_argument("--scale-time", metavar="SECS", type=float, default=3600,
                    help="scale: stop after the tenth that passes this many seconds "
                    "(default: %(default)s)")
    ap.add_argument("--small-files", metavar="N", type=int, default=2000, help="small: files (default: %(default)s)")
    ap.add_argument("--small-size", metavar="BYTES", type=int, default=4096,
                    help="small: bytes per file (default: %(default)s)")
    ap.add_argument("--tree-entries", metavar="N", type=int, default=0,
                    help="tree: extract only the first N entries of the glibc tarball "
                    "(default: 0 = all, ~21k)")
    ap.add_argument("--cached-files", metavar="N", type=int, default=1000,
                    help="cached: files stat'ed again (default: %(default)s)")
    ap.add_argument("--cached-size", metavar="SIZE", default="64M",
                    help="cached: file size for cached 4k reads (default: %(default)s)")
    ap.add_argument("--fio-size", metavar="SIZE", default="1G", help="fio: file size (default: %(default)s)")
    ap.add_argument("--fio-time", metavar="SECS", type=int, default=20,
                    help="fio and cached: seconds per random-I/O job (default: %(default)s)")
    ap.add_argument("--sync-time", metavar="SECS", type=float, default=5,
                    help="fsync: seconds per loop (default: %(default)s)")
    ap.add_argument("--sync-ops", metavar="N", type=int, default=20000,
                    help="fsync: at most this many loops each (default: %(default)s)")
    ap.add_argument("--sqlite-inserts", metavar="N", type=int, default=1000,
                    help="sqlite: autocommit inserts (default: %(default)s)")
    ap.add_argument("--settle-idle", metavar="FRACTION", type=float, default=0.8,
                    help="CPU idle fraction that counts as quiet before each workload (default: %(default)s)")
    ap.add_argument("--settle-max", metavar="SECS", type=float, default=60,
                    help="longest wait for quiet before each workload (default: %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="write results (medians and samples) as JSON")
    ap.add_argument("--chart", metavar="FILE.svg", help="write an SVG bar chart of speed ratios to bindfs")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    ap.add_argument("--no-metrics", action="store_true",
                    help="start Avalon without its Prometheus endpoints (to measure what they cost)")
    ap.add_argument("--insecure", action="store_true",
                    help="start Avalon without TLS and keys (plaintext; to measure what TLS costs)")
    a = ap.parse_args()
    if a.no_metrics:
        AVALON_UP_ARGS.append("--no-metrics")
    if a.insecure:
        AVALON_UP_ARGS.append("--insecure")
    groups = GROUPS if not a.only else a.only.split(",")
    for g in groups:
        if g not in GROUPS + EXTRA_GROUPS:
            ap.error(f"--only: unknown workload {g!r}; choose from "
                     f"{','.join(GROUPS + EXTRA_GROUPS)}")
    wanted = a.systems.split(",")
    for s in wanted:
        if s not in ("local", "bindfs", "moosefs", "avalon"):
            ap.error(f"--systems: unknown system {s!r}")
    if a.no_peers:
        wanted = [s for s in wanted if s not in PEERS]
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root (FUSE mounts, drop_caches)")
    # SIGTERM tears down like Ctrl-C does.
    def on_term(*_):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)

    apt_install(["bindfs", "fio"])
    skipped = {}
    if "moosefs" in wanted:
        try:
            apt_install(MOOSEFS_PKGS)
        except RuntimeError as e:
            log(f"skipping moosefs: {e}")
            skipped["moosefs"] = str(e)
            wanted.remove("moosefs")
    if "avalon" in wanted and not a.no_build:
        subprocess.run(["nice", "cargo", "build", "--release", "--workspace", "--bins"],
                       cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="avalon-bench-", dir="/var/tmp")
    kinds = {"local": Local, "bindfs": Bindfs, "moosefs": MooseFS, "avalon": Avalon}
    candidates = [kinds[s](s, os.path.join(work, s)) for s in wanted]
    systems, samples, errors = [], {}, []
    started, load_before = time.time(), os.getloadavg()
    try:
        if "tree" in groups:
            a.tree_tar = prepare_tree(work, a.tree_entries)
        for s in candidates:
            log(f"starting {s.name}")
            try:
                s.start()
            except Exception as e:
                if not s.peer:
                    raise
                log(f"skipping {s.name}: could not start: {e}")
                skipped[s.name] = f"could not start: {e}"
                s.stop()
                continue
            systems.append(s)
        samples = {s.name: {} for s in systems}
        for rep in range(a.repeat):
            k = rep % len(systems)
            order = systems[k:] + systems[:k]
            for g in groups:
                for s in order:  # interleaved: each workload on every system in turn
                    waited = settle(a)
                    log(f"[{rep + 1}/{a.repeat}] {g} on {s.name}"
                        + (f" (settled {waited:.0f}s)" if waited >= 2 else ""))
                    t = time.time()
                    try:
                        r = run_workload(g, s, a)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        msg = f"{g} on {s.name} (repeat {rep + 1}): {type(e).__name__}: {e}"
                        log(f"  FAILED: {msg}")
                        errors.append(msg)
                        continue
                    log("  " + ", ".join(f"{m} {fmt(v)}" for m, v in r.items())
                        + f"  [{time.time() - t:.0f}s]")
                    for m, v in r.items():
                        samples[s.name].setdefault(m, []).append(v)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        raise SystemExit(130)
    finally:
        for s in reversed(candidates):
            try:
                s.stop()
            except Exception as e:  # keep tearing down the others
                log(f"stopping {s.name}: {e}")
        left = [s.path for s in candidates if is_mounted(s.path)]
        if left:
            log(f"still mounted, leaving {work} in place: {' '.join(left)}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    names = [s.name for s in systems]
    results = {n: {m: statistics.median(v) for m, v in samples[n].items()} for n in names}
    metrics = [m for m in METRICS if any(m in results[n] for n in names)]
    print(table(results, names, metrics))
    for n, reps in SCALE_DETAILS.items():
        for i, rows in enumerate(reps):
            print(f"\nscale on {n} (repeat {i + 1}): files, creates/s, max ms, p99 ms, "
                  "stats/s, MDS RSS MB, load")
            for r in rows:
                print(f"{r['files']:>10,} {fmt(r['create_per_s']):>8} {fmt(r['create_max_ms']):>8} "
                      f"{fmt(r['create_p99_ms']):>7} {fmt(r['stat_per_s']):>9} "
                      f"{r['mds_rss_mb']} {r['load']:.1f}")
    for e in errors:
        print(f"FAILED: {e}")
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    title = (f"Avalon bench {time.strftime('%Y-%m-%d %H:%M')}, median of {a.repeat}: "
             f"--files {a.files} --fio-size {a.fio_size}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "args": {k: v for k, v in vars(a).items() if k != "tree_tar"},
                       "tree_entries": getattr(a, "tree_tar", (None, None))[1],
                       "seconds": round(time.time() - started), "load_before": load_before,
                       "systems": {s.name: s.info() for s in systems},
                       "higher_is_better": {m: METRICS[m] for m in metrics},
                       "results": results, "samples": samples, "errors": errors,
                       "skipped": skipped, "scale_tenths": SCALE_DETAILS}, f, indent=2)
    if a.chart:
        if "bindfs" in names:
            chart(a.chart, results, names, metrics, title)
        else:
            log("--chart needs bindfs among the systems (ratios are to bindfs)")


if __name__ == "__main__":
    main()
