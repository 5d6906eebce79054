//! Chunk placement: chunk → placement group → ordered replica set of OSDs.
//!
//! A pure function of the cluster map, so clients, OSDs and the MDS compute
//! the same answer without asking anyone. Consecutive chunks of a file land
//! on consecutive placement groups, which spreads a large file's I/O over
//! many OSDs (striping). A PG's members are chosen by rendezvous hashing over
//! the OSDs that are not `out`, so adding or removing one OSD moves only the
//! PGs that must move.

use crate::pb::{ClusterMap, OsdInfo, OsdState};

/// splitmix64: a fast, well-mixed, stable 64-bit hash step.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Placement group of chunk `index` of inode `ino`.
pub fn pg_of(ino: u64, index: u64, pg_count: u32) -> u32 {
    let pg_count = u64::from(pg_count.max(1));
    ((mix(ino) % pg_count + index % pg_count) % pg_count) as u32
}

/// Weighted rendezvous score of `osd` for `pg`: `-w / ln(u)` with `u` a
/// hash of (pg, osd) in (0, 1) and `w` the OSD's capacity, so an OSD's
/// share of PGs is proportional to its capacity and adding or removing one
/// OSD moves only the PGs that must move.
fn score(pg: u32, o: &OsdInfo) -> f64 {
    let h = mix(mix(u64::from(pg)) ^ o.id);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    // Capacity in GiB (at least a tiny weight, so a 0 report still counts).
    let w = (o.capacity_bytes as f64 / (1u64 << 30) as f64).max(1e-3);
    -w / u.ln()
}

/// The OSDs of a placement group, primary first: the `replicas` OSDs with
/// the highest weighted rendezvous score among those not marked out, at
/// most one per failure domain while there are enough distinct domains
/// (then the best remaining OSDs fill up).
pub fn pg_members(map: &ClusterMap, pg: u32) -> Vec<&OsdInfo> {
    let mut scored: Vec<(f64, &OsdInfo)> = map
        .osds
        .iter()
        .filter(|o| o.state != OsdState::Out as i32)
        .map(|o| (score(pg, o), o))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    let want = map.replicas.max(1) as usize;
    let mut picked: Vec<usize> = Vec::with_capacity(want);
    let mut domains: Vec<&str> = Vec::with_capacity(want);
    for (i, (_, o)) in scored.iter().enumerate() {
        if picked.len() == want {
            break;
        }
        if !domains.contains(&o.failure_domain.as_str()) {
            domains.push(&o.failure_domain);
            picked.push(i);
        }
    }
    for i in 0..scored.len() {
        if picked.len() == want {
            break;
        }
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked.sort_unstable();
    picked.into_iter().map(|i| scored[i].1).collect()
}

/// The OSDs holding chunk `index` of `ino`, primary first.
pub fn chunk_members(map: &ClusterMap, ino: u64, index: u64) -> Vec<&OsdInfo> {
    pg_members(map, pg_of(ino, index, map.pg_count))
}

/// Splits the byte range `[offset, offset+len)` of a file into per-chunk
/// pieces `(chunk index, offset in chunk, length)`. Saturates instead of
/// overflowing near `u64::MAX`.
pub fn split_range(offset: u64, len: u64, chunk_size: u32) -> Vec<(u64, u32, u32)> {
    let cs = u64::from(chunk_size.max(1));
    let end = offset.saturating_add(len);
    let mut out = Vec::with_capacity((len / cs + 2) as usize);
    let mut pos = offset;
    while pos < end {
        let index = pos / cs;
        let in_chunk = pos % cs;
        let n = (cs - in_chunk).min(end - pos);
        out.push((index, in_chunk as u32, n as u32));
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(n: u64) -> ClusterMap {
        ClusterMap {
            epoch: 1,
            pg_count: 128,
            replicas: 3,
            write_quorum: 2,
            osds: (1..=n)
                .map(|id| OsdInfo {
                    id,
                    addr: format!("127.0.0.1:{}", 7000 + id),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn members_are_distinct_and_spread() {
        let m = map(5);
        let mut primaries = std::collections::HashMap::new();
        for pg in 0..m.pg_count {
            let mem = pg_members(&m, pg);
            assert_eq!(mem.len(), 3);
            let mut ids: Vec<u64> = mem.iter().map(|o| o.id).collect();
            ids.dedup();
            assert_eq!(ids.len(), 3);
            *primaries.entry(mem[0].id).or_insert(0) += 1;
        }
        assert_eq!(primaries.len(), 5, "every OSD is primary of some PG");
    }

    #[test]
    fn consecutive_chunks_on_different_pgs() {
        let pgs: Vec<u32> = (0..8).map(|i| pg_of(42, i, 128)).collect();
        let mut d = pgs.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 8);
    }

    #[test]
    fn capacity_weighs_share() {
        let mut m = map(4);
        for o in &mut m.osds {
            o.capacity_bytes = 100 << 30;
        }
        m.osds[3].capacity_bytes = 300 << 30;
        m.pg_count = 2048;
        m.replicas = 1;
        let mut n = [0usize; 4];
        for pg in 0..m.pg_count {
            n[(pg_members(&m, pg)[0].id - 1) as usize] += 1;
        }
        // Expected shares 1/6, 1/6, 1/6, 1/2 of 2048.
        assert!(n[3] > 900 && n[3] < 1150, "{n:?}");
        for k in &n[..3] {
            assert!(*k > 250 && *k < 440, "{n:?}");
        }
    }

    #[test]
    fn adding_an_osd_moves_only_its_share() {
        let m4 = map(4);
        let m5 = map(5);
        let mut moved = 0;
        for pg in 0..m4.pg_count {
            let a: Vec<u64> = pg_members(&m4, pg).iter().map(|o| o.id).collect();
            let b: Vec<u64> = pg_members(&m5, pg).iter().map(|o| o.id).collect();
            let changed = a.iter().filter(|id| !b.contains(id)).count();
            assert!(changed <= 1, "pg {pg}: {a:?} -> {b:?}");
            if changed == 1 {
                assert!(b.contains(&5));
                moved += 1;
            }
        }
        // Roughly 3/5 of the PGs get the new OSD as a member.
        assert!(moved > 50 && moved < 105, "{moved}");
    }

    #[test]
    fn failure_domains_are_spread_when_possible() {
        let mut m = map(6);
        for o in &mut m.osds {
            o.failure_domain = format!("rack{}", (o.id - 1) / 2);
        }
        for pg in 0..m.pg_count {
            let mem = pg_members(&m, pg);
            let mut d: Vec<&str> = mem.iter().map(|o| o.failure_domain.as_str()).collect();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "pg {pg}");
        }
        // Two domains for three replicas: both used, third fills up.
        for o in &mut m.osds {
            o.failure_domain = format!("rack{}", o.id % 2);
        }
        for pg in 0..m.pg_count {
            let mem = pg_members(&m, pg);
            assert_eq!(mem.len(), 3);
            let mut d: Vec<&str> = mem.iter().map(|o| o.failure_domain.as_str()).collect();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 2, "pg {pg}");
        }
    }

    #[test]
    fn out_osds_are_skipped() {
        let mut m = map(4);
        m.osds[0].state = OsdState::Out as i32;
        for pg in 0..m.pg_count {
            assert!(pg_members(&m, pg).iter().all(|o| o.id != 1));
        }
    }

    proptest! {
        #[test]
        fn split_covers_range(offset in 0u64..(1 << 40), len in 0u64..(64 << 20), cs in 1u32..(8 << 20)) {
            let parts = split_range(offset, len, cs);
            let total: u64 = parts.iter().map(|p| u64::from(p.2)).sum();
            prop_assert_eq!(total, len);
            let mut pos = offset;
            for (idx, off, n) in parts {
                prop_assert_eq!(idx * u64::from(cs) + u64::from(off), pos);
                prop_assert!(u64::from(off) + u64::from(n) <= u64::from(cs));
                prop_assert!(n > 0);
                pos += u64::from(n);
            }
        }

        #[test]
        fn split_never_overflows(offset in any::<u64>(), len in any::<u64>()) {
            let parts = split_range(offset, len.min(1 << 30), 4 << 20);
            for (_, off, n) in parts { prop_assert!(u64::from(off) + u64::from(n) <= 4 << 20); }
        }
    }
}
