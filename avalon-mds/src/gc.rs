//! Data garbage collection: the leader asks every up OSD to delete the
//! objects of removed inodes, then drops them from the queue via raft.
//! Each round first expires the trash entries that are due (`trash.rs`),
//! whose data then goes the same way, and tells the OSDs to trim the
//! clones of removed snapshots (`snapshots.rs`). A removed file that a
//! snapshot still holds is deleted with that snapshot's id as `snap_seq`:
//! the OSDs keep what the snapshot saw as clones.

use crate::command::{Op, OsdState};
use crate::node::MdsNode;
use avalon_proto::pb::osd_client::OsdClient;
use avalon_proto::pb::{DeleteObjectsRequest, RequestHeader, TrimSnapshotsRequest};
use avalon_proto::request_id::{self, Stamp};
use std::collections::BTreeMap;
use std::time::Duration;

/// A gRPC client of OSD `id` at `addr`, stamping request ids (the GC's,
/// snapshot trims' and grant recoveries' calls).
pub(crate) fn osd_client(
    node: &MdsNode,
    id: u64,
    addr: &str,
) -> anyhow::Result<
    OsdClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Stamp>>,
> {
    let ch = node
        .tls
        .channel(addr, avalon_proto::tls::Dial::Osd, Duration::from_secs(2))
        .map_err(|e| anyhow::anyhow!("OSD {id} at {addr}: {}", e.message()))?;
    Ok(OsdClient::with_interceptor(ch, Stamp))
}

/// Inodes sent per DeleteObjects call.
const BATCH: usize = 1024;

/// Leader-only loop; returns when the node shuts down.
pub async fn gc_loop(node: &MdsNode) {
    let period = Duration::from_millis(node.cfg.gc_interval_ms.max(10));
    let mut told = None;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if !node.is_leader() {
            continue;
        }
        // One request id per pass: its lines here and the OSDs' lines for
        // its deletes carry it.
        request_id::scope(request_id::fresh(), async {
            if let Err(e) = expire_trash(node).await {
                tracing::debug!(error = %e, "trash expiry not proposed");
            }
            if let Err(e) = gc_once(node).await {
                tracing::debug!(error = %e, "GC round incomplete");
            }
            if let Err(e) = trim_snapshots(node, &mut told).await {
                tracing::debug!(error = %e, "snapshot trim incomplete");
            }
        })
        .await
    }
}

/// Proposes the removal of the trash entries due by this leader's clock
/// (the command carries the time: every replica frees the same ones).
/// Returns how many went.
pub async fn expire_trash(node: &MdsNode) -> anyhow::Result<u64> {
    let due = node.read_local(crate::trash::next_expiry);
    if due.is_none_or(|t| t > crate::node::now_ns()) {
        return Ok(0);
    }
    match node.write(None, Op::TrashExpire).await? {
        crate::command::Reply::Count(n) => {
            tracing::info!(entries = n, "expired trash entries freed");
            Ok(n)
        }
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// One GC round: deletes one batch of queued inodes on all up OSDs.
/// Returns how many inodes were removed from the queue.
pub async fn gc_once(node: &MdsNode) -> anyhow::Result<usize> {
    let (inos, by_seq, osds) = node.read_local(|s| {
        let inos: Vec<u64> = s.gc_queue.iter().take(BATCH).copied().collect();
        // One DeleteObjects per snap_seq: the newest snapshot holding each.
        let mut by_seq: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for &i in &inos {
            by_seq
                .entry(crate::snapshots::seq_of(s, i))
                .or_default()
                .push(i);
        }
        (inos, by_seq, up_osds(s))
    });
    if inos.is_empty() {
        return Ok(0);
    }
    // Down OSDs still hold data of these inodes; they must be cleaned when
    // they come back (later: per-OSD GC cursors in the state machine).
    for (id, addr) in &osds {
        let mut c = osd_client(node, *id, addr)?;
        for (&snap_seq, inos) in &by_seq {
            let req = DeleteObjectsRequest {
                header: Some(RequestHeader::default()),
                inos: inos.clone(),
                snap_seq,
            };
            tokio::time::timeout(Duration::from_secs(10), c.delete_objects(req))
                .await
                .map_err(|_| anyhow::anyhow!("OSD {id} at {addr}: DeleteObjects timed out"))?
                .map_err(|e| anyhow::anyhow!("OSD {id} at {addr}: {}", e.message()))?;
        }
    }
    let n = inos.len();
    node.write(None, Op::GcDone { inos }).await?;
    tracing::debug!(inodes = n, osds = osds.len(), "GC round done");
    Ok(n)
}

/// The up OSDs: (id, address).
fn up_osds(s: &crate::namespace::State) -> Vec<(u64, String)> {
    s.osds
        .values()
        .filter(|o| o.state == OsdState::Up)
        .map(|o| (o.id, o.addr.clone()))
        .collect()
}

/// How often the live snapshot ids are told again to every up OSD once
/// some snapshot was removed: an OSD down at the trim, or one that copied
/// a clone back from such an OSD while peering, drops what no live
/// snapshot needs within this time.
const RETRIM: Duration = Duration::from_secs(60);

/// After snapshots were removed: tells every up OSD the live snapshot ids
/// (and the newest id allocated), so that it drops the clones only removed
/// snapshots needed, then records that the OSDs were told; and again every
/// [`RETRIM`] (`told`: when this leader last told them all). True if a
/// trim was done.
pub async fn trim_snapshots(
    node: &MdsNode,
    told: &mut Option<std::time::Instant>,
) -> anyhow::Result<bool> {
    let (due, removals, live, newest, osds) = node.read_local(|s| {
        (
            crate::snapshots::trim_due(s),
            s.snapshots.removals,
            s.snapshots.by_id.keys().copied().collect::<Vec<u64>>(),
            s.snapshots.last_id,
            up_osds(s),
        )
    });
    let again = removals > 0 && told.is_none_or(|t| t.elapsed() >= RETRIM);
    if !due && !again {
        return Ok(false);
    }
    // Down OSDs keep their clones until a later trim (as the GC's deletes).
    let (mut clones, mut bytes) = (0, 0);
    for (id, addr) in &osds {
        let mut c = osd_client(node, *id, addr)?;
        let req = TrimSnapshotsRequest {
            header: Some(RequestHeader::default()),
            live: live.clone(),
            newest,
        };
        let r = tokio::time::timeout(Duration::from_secs(30), c.trim_snapshots(req))
            .await
            .map_err(|_| anyhow::anyhow!("OSD {id} at {addr}: TrimSnapshots timed out"))?
            .map_err(|e| anyhow::anyhow!("OSD {id} at {addr}: {}", e.message()))?
            .into_inner();
        clones += r.clones;
        bytes += r.bytes;
    }
    if due {
        node.write(None, Op::SnapTrimmed { removals }).await?;
    }
    *told = Some(std::time::Instant::now());
    if due || clones > 0 {
        tracing::info!(clones, bytes, osds = osds.len(), "snapshot clones trimmed");
    }
    Ok(true)
}
