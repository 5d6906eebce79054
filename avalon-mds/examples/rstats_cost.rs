//! What keeping recursive statistics costs per metadata operation (issue
//! 24: "the metadata rates of bench.py stay within 5% with rstats on").
//! Whole-cluster runs cannot resolve 5% on this machine, so this times
//! the state machine directly: a create, a rename and an unlink applied
//! as the MDS applies them (rstats included), next to the rstats hooks
//! alone that each of them runs (`linked` + `touched` for a create,
//! `moved` + `touched` for a rename between directories, `unlinking` +
//! `touched` for an unlink), walking the same tree. The hooks' share of
//! the apply is an upper bound on their share of the MDS's work, which
//! also encodes, logs and fsyncs every operation.
//!
//! `cargo run --release -p avalon-mds --example rstats_cost [FILES] [DEPTH]`

use avalon_mds::command::{Layout, MetaCommand, Op, Reply};
use avalon_mds::namespace::State;
use avalon_mds::rstats;
use avalon_proto::limits::ROOT_INO;
use std::time::Instant;

/// Workers' directories, as bench.py's meta phase makes them.
const WORKERS: u64 = 8;

fn apply(s: &mut State, now: &mut i64, op: Op) -> Reply {
    *now += 1_000;
    match s
        .apply(&MetaCommand {
            now_ns: *now,
            session_id: 0,
            request_id: 0,
            op,
        })
        .0
    {
        Ok(r) => r,
        Err(e) => panic!("apply failed: errno {e}"),
    }
}

fn ino_of(r: Reply) -> u64 {
    match r {
        Reply::Attr(a) => a.ino,
        other => panic!("expected attributes, got {other:?}"),
    }
}

fn mkdir(s: &mut State, now: &mut i64, parent: u64, name: &str) -> u64 {
    ino_of(apply(
        s,
        now,
        Op::Mkdir {
            parent,
            name: name.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ))
}

fn create(parent: u64, name: &str) -> Op {
    Op::Mknod {
        parent,
        name: name.into(),
        mode: libc::S_IFREG | 0o644,
        rdev: 0,
        uid: 0,
        gid: 0,
        exclusive: true,
        layout: Layout::default(),
    }
}

fn ns_per(start: Instant, n: u64) -> f64 {
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let files: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let depth: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let mut s = State::new();
    let mut now = 1_000_000i64;
    // ROOT/l1/l2/.../w0..w7: the workers' directories sit `depth` deep.
    let mut top = ROOT_INO;
    for d in 1..depth {
        top = mkdir(&mut s, &mut now, top, &format!("l{d}"));
    }
    let dirs: Vec<u64> = (0..WORKERS)
        .map(|w| mkdir(&mut s, &mut now, top, &format!("w{w}")))
        .collect();
    let other: Vec<u64> = (0..WORKERS)
        .map(|w| mkdir(&mut s, &mut now, top, &format!("x{w}")))
        .collect();
    let dir = |i: u64| dirs[(i % WORKERS) as usize];

    let t = Instant::now();
    let inos: Vec<u64> = (0..files)
        .map(|i| ino_of(apply(&mut s, &mut now, create(dir(i), &format!("f{i}")))))
        .collect();
    let create_ns = ns_per(t, files);

    // The hooks a create runs, on the same inodes (counts go up twice:
    // the figures are garbage, the walks are the same).
    let t = Instant::now();
    for (i, &ino) in inos.iter().enumerate() {
        now += 1_000;
        rstats::linked(&mut s, dir(i as u64), ino, now);
        rstats::touched(&mut s, dir(i as u64), now);
    }
    let create_hooks_ns = ns_per(t, files);

    let t = Instant::now();
    for i in 0..files {
        let op = Op::Rename {
            parent: dir(i),
            name: format!("f{i}").into(),
            new_parent: other[(i % WORKERS) as usize],
            new_name: format!("g{i}").into(),
            flags: 0,
            guard: None,
        };
        apply(&mut s, &mut now, op);
    }
    let rename_ns = ns_per(t, files);

    // A rename's hooks, moving each file back and forth so every call
    // walks both directories' ancestors.
    let t = Instant::now();
    for (i, &ino) in inos.iter().enumerate() {
        let (a, b) = (other[i % WORKERS as usize], dir(i as u64));
        now += 1_000;
        let (from, to) = if i % 2 == 0 { (a, b) } else { (b, a) };
        rstats::moved(&mut s, ino, from, to, now);
        rstats::touched(&mut s, from, now);
        rstats::touched(&mut s, to, now);
    }
    let rename_hooks_ns = ns_per(t, files);
    // Put the primary directories back where the namespace has them.
    for (i, &ino) in inos.iter().enumerate() {
        if i % 2 == 0 {
            rstats::moved(&mut s, ino, dir(i as u64), other[i % WORKERS as usize], now);
        }
    }

    // An unlink's hooks, timed before the unlinks (they need the entries);
    // each is undone by a `linked`, which is counted too: an upper bound.
    let t = Instant::now();
    for (i, &ino) in inos.iter().enumerate() {
        let p = other[i % WORKERS as usize];
        now += 1_000;
        rstats::unlinking(&mut s, p, ino, now);
        rstats::linked(&mut s, p, ino, now);
        rstats::touched(&mut s, p, now);
    }
    let unlink_hooks_ns = ns_per(t, files);

    let t = Instant::now();
    for i in 0..files {
        let op = Op::Unlink {
            parent: other[(i % WORKERS) as usize],
            name: format!("g{i}").into(),
            guard: None,
        };
        apply(&mut s, &mut now, op);
    }
    let unlink_ns = ns_per(t, files);

    println!("{files} files, workers' directories {depth} deep");
    for (op, whole, hooks) in [
        ("create", create_ns, create_hooks_ns),
        ("rename", rename_ns, rename_hooks_ns),
        ("unlink", unlink_ns, unlink_hooks_ns),
    ] {
        println!(
            "{op}: apply {whole:.0} ns, rstats hooks {hooks:.0} ns ({:.1}% of the apply)",
            100.0 * hooks / whole
        );
    }
}
