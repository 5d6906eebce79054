#!/usr/bin/env python3
"""Avalon benchmark harness.

Starts its own Avalon cluster (3 MDS, 3 OSDs, n=3 m=2 on 127.0.0.1) and, in
the same run, a local directory and a FUSE passthrough (bindfs over a local
directory), then runs the same workloads on each, interleaved, and prints
figures and ratios to the passthrough. `--json FILE` writes the results.

    bench/bench.py                      # everything, default sizes
    bench/bench.py --only meta --files 2000
    bench/bench.py --only fio --fio-size 256M --json /tmp/b.json

Workloads:
  meta   create / stat / rename / unlink of --files files, one worker and
         --workers parallel processes; `ls -l` of the created directory
  fio    sequential write and read (bs=1M, --fio-size), 4k random read and
         write (--fio-time seconds each)

Run as root (FUSE mounts). Packages it needs (bindfs, fio) are installed
with apt when missing. Peers (MooseFS, GlusterFS) are future work.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AVALON_BIN_DIR") or os.path.join(ROOT, "target", "release")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ensure_packages():
    missing = [p for p, c in (("bindfs", "bindfs"), ("fio", "fio")) if shutil.which(c) is None]
    if missing:
        log(f"installing {' '.join(missing)} (apt)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)


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


class System:
    """A directory to benchmark, with setup and teardown."""

    def __init__(self, name, path):
        self.name, self.path = name, path

    def start(self):
        pass

    def stop(self):
        pass


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
        subprocess.run(["umount", self.path])


class Avalon(System):
    def __init__(self, name, base):
        super().__init__(name, os.path.join(base, "mnt"))
        self.base = base
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([os.path.join(BIN, "avalonctl"), "up", self.base],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(os.path.dirname(self.base), "avalon-up.log"), "w"))
        deadline = time.time() + 120
        while not is_mounted(self.path):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("avalonctl up failed; see avalon-up.log")
            time.sleep(0.2)

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=120)


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


def bench_meta(sysm, files, workers):
    out = {}
    base = os.path.join(sysm.path, "meta")
    os.makedirs(base, exist_ok=True)
    # Single worker.
    d = os.path.join(base, "single")
    os.mkdir(d)
    r = meta_worker((d, 0, files))
    for k, v in r.items():
        out[f"{k}/s (1 worker)"] = rate(files, v)
    # Parallel workers, each in its own directory.
    per = files // workers
    dirs = []
    for w in range(workers):
        dw = os.path.join(base, f"par{w}")
        os.mkdir(dw)
        dirs.append((dw, 0, per))
    t0 = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(meta_worker, dirs)
    for k in ("create", "stat", "rename", "unlink"):
        slowest = max(r[k] for r in results)
        out[f"{k}/s ({workers} workers)"] = rate(per * workers, slowest)
    _ = t0
    # ls -l of a directory of `files` entries.
    d = os.path.join(base, "ls")
    os.mkdir(d)
    for i in range(files):
        os.close(os.open(os.path.join(d, f"e{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    drop_caches()
    t = time.perf_counter()
    subprocess.run(["ls", "-l", d], stdout=subprocess.DEVNULL, check=True)
    out["ls -l entries/s"] = rate(files, time.perf_counter() - t)
    shutil.rmtree(base)
    return out


def fio(path, name, rw, bs, size, runtime=None, extra=()):
    cmd = ["fio", f"--name={name}", f"--directory={path}", f"--rw={rw}", f"--bs={bs}",
           f"--size={size}", "--ioengine=psync", "--output-format=json", "--group_reporting",
           *extra]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed on {path}: {r.stderr.strip()}")
    job = json.loads(r.stdout)["jobs"][0]
    part = job["write"] if rw in ("write", "randwrite") else job["read"]
    return part["bw_bytes"], part["iops"]


def bench_fio(sysm, size, secs):
    out = {}
    d = os.path.join(sysm.path, "fio")
    os.makedirs(d, exist_ok=True)
    bw, _ = fio(d, "seq", "write", "1M", size, extra=["--end_fsync=1"])
    out["seq write MiB/s"] = bw / 2**20
    drop_caches()
    bw, _ = fio(d, "seq", "read", "1M", size)
    out["seq read MiB/s"] = bw / 2**20
    drop_caches()
    _, iops = fio(d, "seq", "randread", "4k", size, runtime=secs)
    out["4k rand read IOPS"] = iops
    _, iops = fio(d, "seq", "randwrite", "4k", size, runtime=secs, extra=["--end_fsync=1"])
    out["4k rand write IOPS"] = iops
    shutil.rmtree(d)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["meta", "fio"], help="run one workload group")
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--fio-size", default="1G")
    ap.add_argument("--fio-time", type=int, default=20)
    ap.add_argument("--systems", default="local,bindfs,avalon")
    ap.add_argument("--json", help="write results as JSON to this file")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root (FUSE mounts)")
    ensure_packages()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="avalon-bench-", dir="/var/tmp")
    kinds = {"local": lambda: Local("local", os.path.join(work, "local")),
             "bindfs": lambda: Bindfs("bindfs", os.path.join(work, "bindfs")),
             "avalon": lambda: Avalon("avalon", os.path.join(work, "avalon"))}
    systems = [kinds[s]() for s in args.systems.split(",")]
    results = {s.name: {} for s in systems}
    try:
        for s in systems:
            log(f"starting {s.name}")
            s.start()
        groups = [("meta", lambda s: bench_meta(s, args.files, args.workers)),
                  ("fio", lambda s: bench_fio(s, args.fio_size, args.fio_time))]
        for gname, fn in groups:
            if args.only and args.only != gname:
                continue
            for s in systems:  # interleaved: each workload on every system in turn
                log(f"{gname} on {s.name}")
                results[s.name].update(fn(s))
    finally:
        for s in reversed(systems):
            try:
                s.stop()
            except Exception as e:  # keep tearing down the others
                log(f"stopping {s.name}: {e}")
        shutil.rmtree(work, ignore_errors=True)

    names = [s.name for s in systems]
    metrics = list(next(iter(results.values())).keys())
    ref = "bindfs" if "bindfs" in results else None
    head = f"{'metric':<28}" + "".join(f"{n:>12}" for n in names)
    if ref and "avalon" in results:
        head += f"{'avalon/bindfs':>15}"
    print(head)
    for m in metrics:
        line = f"{m:<28}" + "".join(f"{results[n].get(m, float('nan')):>12.1f}" for n in names)
        if ref and "avalon" in results:
            line += f"{results['avalon'][m] / results[ref][m]:>14.2f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
