//! MDS membership changes: `Raft.AddMds` / `Raft.RemoveMds` sent to the
//! current leader (found through `Meta.Status`), retried across elections.

use anyhow::{bail, Context};
use avalon_proto::pb::{self, meta_client::MetaClient, raft_client::RaftClient};
use avalon_proto::tls::{ClientTls, Dial};
use std::time::{Duration, Instant};

/// Status of one MDS, if it answers within `timeout`.
pub async fn status_of(tls: &ClientTls, addr: &str, timeout: Duration) -> Option<pb::StatusReply> {
    let ch = tls.channel(addr, Dial::Mds, timeout).ok()?;
    let mut c = MetaClient::new(ch);
    match tokio::time::timeout(timeout, c.status(pb::Empty {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// The leader's (id, address), as any of `addrs` (or the members they
/// name) reports it.
pub async fn find_leader(tls: &ClientTls, addrs: &[String]) -> Option<(u64, String)> {
    let mut seen: Vec<String> = addrs.to_vec();
    let mut i = 0;
    while i < seen.len() && i < 32 {
        let addr = seen[i].clone();
        i += 1;
        let Some(s) = status_of(tls, &addr, Duration::from_secs(2)).await else {
            continue;
        };
        let Some(me) = s.self_ else { continue };
        if me.role == "leader" {
            return Some((me.id, addr));
        }
        for m in &s.members {
            if m.id == me.leader_id && me.leader_id != 0 {
                if let Some(l) = status_of(tls, &m.addr, Duration::from_secs(2)).await {
                    if l.self_.is_some_and(|x| x.role == "leader") {
                        return Some((m.id, m.addr.clone()));
                    }
                }
            }
            if !seen.contains(&m.addr) {
                seen.push(m.addr.clone());
            }
        }
    }
    None
}

fn retriable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

async fn on_leader<F, Fut>(
    tls: &ClientTls,
    addrs: &[String],
    timeout: Duration,
    what: &str,
    f: F,
) -> anyhow::Result<()>
where
    F: Fn(RaftClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let err = match find_leader(tls, addrs).await {
            None => "no MDS leader found".to_string(),
            Some((_, addr)) => {
                let ch = tls
                    .channel(&addr, Dial::Mds, Duration::from_secs(2))
                    .map_err(|e| anyhow::anyhow!("{addr}: {}", e.message()))?;
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left.max(Duration::from_secs(1)), f(RaftClient::new(ch)))
                    .await
                {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(s)) if retriable(&s) => format!("{addr}: {}", s.message()),
                    Ok(Err(s)) => bail!("{what} failed at {addr}: {:?}: {}", s.code(), s.message()),
                    Err(_) => format!("{addr}: timed out"),
                }
            }
        };
        if Instant::now() >= deadline {
            bail!("{what} failed: {err}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Adds MDS `id` at `addr` (already running with `--join`) to the group:
/// it joins as a learner, catches up, then becomes a voter.
pub async fn add_mds(
    tls: &ClientTls,
    addrs: &[String],
    id: u64,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    if id == 0 || addr.is_empty() {
        bail!("need an id >= 1 and an address");
    }
    // The new node must answer before the leader starts replicating to it.
    let deadline = Instant::now() + timeout;
    while status_of(tls, addr, Duration::from_secs(1)).await.is_none() {
        if Instant::now() >= deadline {
            bail!("the new MDS at {addr} does not answer");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = addr.to_string();
    on_leader(tls, addrs, timeout, "AddMds", |mut c| {
        let addr = addr.clone();
        async move {
            c.add_mds(pb::AddMdsRequest { id, addr }).await?;
            Ok(())
        }
    })
    .await
    .with_context(|| format!("adding MDS {id}"))
}

/// Removes MDS `id` from the group (it may be the leader).
pub async fn remove_mds(
    tls: &ClientTls,
    addrs: &[String],
    id: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    // A retry after an attempt whose answer was lost finds it removed.
    let tried = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    on_leader(tls, addrs, timeout, "RemoveMds", |mut c| {
        let tried = tried.clone();
        async move {
            let again = tried.swap(true, std::sync::atomic::Ordering::SeqCst);
            match c.remove_mds(pb::RemoveMdsRequest { id }).await {
                Ok(_) => Ok(()),
                Err(s) if again && s.code() == tonic::Code::NotFound => Ok(()),
                Err(s) => Err(s),
            }
        }
    })
    .await
    .with_context(|| format!("removing MDS {id}"))
}
