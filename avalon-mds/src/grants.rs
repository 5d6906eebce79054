//! Write grants (CephFS's `max_size`): a session may grow a file up to a
//! size the MDS recorded in its Raft state without committing each fsync's
//! size and times; they ride on its next commit (close, setattr, a
//! shared-write demand). When the session is lost, the leader reads the
//! chunks' stored lengths and versions from the OSDs (`ObjectExtents`;
//! a sync write makes the length durable with the data) and commits the
//! recovered size, with mtime and ctime at the recovery's time, before it
//! forgets the session ([`recover_session`], proposed as
//! [`Op::RecoverGrants`]). Grants of sessions dropped otherwise (an
//! identity revoked, an expiry proposed before a grant was read) are
//! recovered by [`recover_orphans`] once any lease of theirs ran out.
//! A holder that does not answer another session's demand (dead, or cut
//! off) has its grant of that file recovered the same way
//! ([`recover_one`]) once it can no longer act on its lease, before the
//! other session reads the file's attributes: a dead writer's fsynced size
//! is never hidden, and an append of another mount never lands on it.
//!
//! Fencing: the client answers an fsync from a grant only if the OSDs
//! acknowledged its data while its session lease held (counted from the
//! heartbeat's sending, so it ends before the MDS's view of the session);
//! the leader reads the OSDs only after the session timed out (or a lease
//! time after its grant was orphaned), so every fsync answered that way
//! is on the OSDs the leader reads; a write that lands later was never
//! acknowledged.

use crate::command::{Op, OsdState};
use crate::leases::Change;
use crate::namespace::State;
use crate::node::MdsNode;
use avalon_proto::pb::{ObjectExtentsRequest, RequestHeader};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Grants by (inode, session): the size up to which the session may have
/// grown the file without committing it.
pub type Grants = BTreeMap<(u64, u64), u64>;

/// Reads the state's trailing grants; a state written before they existed
/// ends before them: none.
pub fn absent_as_default<'de, D: Deserializer<'de>>(d: D) -> Result<Grants, D::Error> {
    Ok(Grants::deserialize(d).unwrap_or_default())
}

/// Headroom of a grant past the size it is asked for: at least 4 MiB (one
/// default chunk), an eighth for large files, so that an appender asks for
/// a larger grant (one Raft write) once per eighth of growth.
pub fn max_size_for(size: u64) -> u64 {
    let room = (size / 8).max(4 << 20);
    size.saturating_add(room)
        .min(avalon_proto::limits::MAX_FILE_SIZE)
}

/// Applies a grant change of `session` on `ino` (`max_size` 0: drop it);
/// returns the size it reaches now (0: none). A session that is gone gets
/// none.
pub fn set(s: &mut State, ino: u64, session: u64, max_size: u64) -> u64 {
    if max_size == 0 || !s.sessions.contains_key(&session) {
        s.grants.remove(&(ino, session));
        return 0;
    }
    let g = s.grants.entry((ino, session)).or_insert(0);
    *g = (*g).max(max_size);
    *g
}

/// Grants on `inos` held by sessions other than `sid`: (holder, inode).
pub fn held_by_others(s: &State, sid: u64, inos: &[u64]) -> Vec<(u64, u64)> {
    if s.grants.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &ino in inos {
        for (&(_, holder), _) in s.grants.range((ino, 0)..=(ino, u64::MAX)) {
            if holder != sid {
                out.push((holder, ino));
            }
        }
    }
    out
}

/// The grants of `session`: (inode, max_size, committed size, chunk
/// size; 0 when the inode is gone).
fn of_session(s: &State, session: u64) -> Vec<(u64, u64, u64, u64)> {
    s.grants
        .iter()
        .filter(|((_, sid), _)| *sid == session)
        .map(|(&(ino, _), &max)| {
            let (size, cs) = s.inodes.get(&ino).map_or((0, 0), |i| {
                let cs = match i.attr.chunk_size {
                    0 => avalon_proto::limits::DEFAULT_CHUNK_SIZE,
                    c => c,
                };
                (i.attr.size, u64::from(cs))
            });
            (ino, max, size, cs)
        })
        .collect()
}

/// Whether `session` holds grants (leader's applied state).
pub fn holds(node: &MdsNode, session: u64) -> bool {
    node.read_local(|s| s.grants.keys().any(|(_, sid)| *sid == session))
}

/// How long one OSD may take to answer.
const OSD_WAIT: Duration = Duration::from_secs(5);

/// Reads, for each grant of `session`, the size its chunks show on the
/// OSDs: the largest `index * chunk_size + length` over the newest copy of
/// each chunk from the committed size's chunk up to the grant's
/// `max_size`, as (inode, that `max_size`, size). Every up OSD must answer
/// (one that does not may hold the only copy the leader can reach): an
/// error otherwise, to retry.
pub async fn recover_sizes(
    node: &MdsNode,
    session: u64,
    only: Option<u64>,
) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let (grants, osds) = node.read_local(|s| {
        let osds: Vec<(u64, String)> = s
            .osds
            .values()
            .filter(|o| o.state == OsdState::Up)
            .map(|o| (o.id, o.addr.clone()))
            .collect();
        let mut grants = of_session(s, session);
        if let Some(ino) = only {
            grants.retain(|g| g.0 == ino);
        }
        (grants, osds)
    });
    let mut out = Vec::with_capacity(grants.len());
    for (ino, max, size, cs) in grants {
        if cs == 0 {
            // The inode is gone: the grant just goes.
            out.push((ino, max, 0));
            continue;
        }
        let from = size / cs;
        let count = max.div_ceil(cs).saturating_sub(from).max(1);
        // Per chunk index: (version, length) of the newest copy.
        let mut newest: HashMap<u64, (u64, u64)> = HashMap::new();
        for (id, addr) in &osds {
            let mut c = crate::gc::osd_client(node, *id, addr)?;
            let mut at = from;
            loop {
                let req = ObjectExtentsRequest {
                    header: Some(RequestHeader::default()),
                    ino,
                    from_index: at,
                    max_chunks: count.min(4096) as u32,
                };
                let r = tokio::time::timeout(OSD_WAIT, c.object_extents(req))
                    .await
                    .map_err(|_| anyhow::anyhow!("OSD {id} at {addr}: ObjectExtents timed out"))?
                    .map_err(|e| anyhow::anyhow!("OSD {id} at {addr}: {}", e.message()))?
                    .into_inner();
                let mut last = at;
                for ch in &r.chunks {
                    last = ch.index;
                    if ch.index >= from + count {
                        break;
                    }
                    if ch.version == 0 && ch.length == 0 && !ch.data.is_empty() {
                        // An OSD without the fields, or corrupt metadata:
                        // the data ranges' end bounds the length.
                        let end = ch.data.iter().map(|d| d.end.min(cs)).max().unwrap_or(0);
                        let e = newest.entry(ch.index).or_insert((0, 0));
                        if e.0 == 0 {
                            e.1 = e.1.max(end);
                        }
                        continue;
                    }
                    let e = newest.entry(ch.index).or_insert((0, 0));
                    if ch.version > e.0 {
                        *e = (ch.version, ch.length.min(cs));
                    }
                }
                if !r.truncated || last + 1 >= from + count {
                    break;
                }
                at = last + 1;
            }
        }
        let stored = newest
            .iter()
            .filter(|(_, (_, len))| *len > 0)
            .map(|(index, (_, len))| index.saturating_mul(cs).saturating_add(*len))
            .max()
            .unwrap_or(0);
        out.push((ino, max, stored.max(size)));
    }
    Ok(out)
}

/// Recovers `session`'s grants and forgets the session in one log entry.
/// Returns false if the OSDs could not all be read (the caller retries).
pub async fn recover_session(node: &MdsNode, session: u64) -> bool {
    recover(node, session, None).await
}

/// Recovers `session`'s grant of `ino` alone and keeps the session: its
/// holder did not answer a demand and can no longer act on its lease.
/// False if the OSDs could not all be read or the commit failed.
pub async fn recover_one(node: &MdsNode, session: u64, ino: u64) -> bool {
    recover(node, session, Some(ino)).await
}

/// Reads the sizes of `session`'s grants (of `only` that file, keeping
/// the session; else all of them, forgetting the session) from the OSDs
/// and commits them.
async fn recover(node: &MdsNode, session: u64, only: Option<u64>) -> bool {
    let mut read = match recover_sizes(node, session, only).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(session, ?only, error = %e, "write grants not recovered yet");
            return false;
        }
    };
    if only.is_some() {
        // A live holder may have been granted more while the OSDs were
        // read: that grant is newer than what was read, and stays.
        node.read_local(|s| {
            read.retain(|(ino, max, _)| s.grants.get(&(*ino, session)) == Some(max));
        });
        if read.is_empty() {
            return true;
        }
    }
    let sizes: Vec<(u64, u64)> = read.into_iter().map(|(ino, _, size)| (ino, size)).collect();
    tracing::info!(
        session,
        ?sizes,
        ?only,
        "recovered the sizes of writes a lost or silent session fsynced"
    );
    // Sessions caching these files' attributes drop them before the
    // recovered ones count as written (as for any commit).
    let changes: Vec<Change> = sizes.iter().map(|(ino, _)| Change::data(*ino)).collect();
    let announced = node
        .leases
        .announce(0, changes.iter().map(|c| c.ino).collect());
    let op = Op::RecoverGrants {
        session,
        sizes,
        keep_session: only.is_some(),
    };
    match node.write(None, op).await {
        Ok(_) => {
            node.leases.recall(0, &changes, Some(announced)).await;
            true
        }
        Err(e) => {
            tracing::warn!(session, error = %e, "write grant recovery not committed");
            false
        }
    }
}

/// Grants whose session is gone (revoked, or expired by an older path):
/// recovered once `wait` passed since this leader first saw each (any
/// lease of theirs has run out by then). `seen` keeps those sightings.
pub async fn recover_orphans(
    node: &MdsNode,
    seen: &mut HashMap<u64, std::time::Instant>,
    wait: Duration,
) {
    let gone: Vec<u64> = node.read_local(|s| {
        let mut v: Vec<u64> = s
            .grants
            .keys()
            .map(|(_, sid)| *sid)
            .filter(|sid| !s.sessions.contains_key(sid))
            .collect();
        v.dedup();
        v
    });
    seen.retain(|sid, _| gone.contains(sid));
    let now = std::time::Instant::now();
    for sid in gone {
        let first = *seen.entry(sid).or_insert(now);
        if first.elapsed() >= wait {
            recover_session(node, sid).await;
        }
    }
}
