//! A connection to the metadata service that follows its leader.
//!
//! Holds the configured MDS addresses and a channel to the node believed to
//! be the leader. A call that fails with "not leader" (carrying a hint) or
//! with a transport error is retried on the hinted node or the next address,
//! with a short backoff, until the call's deadline. Because mutations carry a
//! request id that the MDS deduplicates, retrying them is safe.

use crate::backoff::Backoff;
use crate::errno::{has_errno, leader_hint};
use crate::limits::MAX_MESSAGE_BYTES;
use crate::pb::meta_client::MetaClient;
use crate::recall_mark::{mark_of, MarkGate};
use crate::request_id::{Stamp, Traced};
use crate::tls::{ClientTls, Dial};
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tonic::{Code, Status};

/// First pause before trying again when no node named a leader.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest such pause. While a new leader is elected every node answers
/// at once ("not leader", or a refused connection for a dead one), so a
/// short pause costs only cheap round trips, and it is the most a client
/// can lag behind the election: at 500 ms it was a quarter of a
/// failover.
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// Leader-following client of the `Meta` service.
pub struct MdsConn {
    addrs: Vec<String>,
    current: Mutex<Option<(String, MetaClient<Traced>)>>,
    /// How long one call keeps retrying across failovers.
    pub retry_for: Duration,
    next: Mutex<usize>,
    tls: ClientTls,
    /// Passes each reply's recall mark (a client's; see `recall_mark.rs`).
    gate: OnceLock<Arc<dyn MarkGate>>,
    /// The leader the nodes last named ("not leader" hints). When it
    /// changes, calls in flight on another node give up there and go to
    /// it: a former leader paused (SIGSTOP, a VM stall) keeps their
    /// connections open and would hold them until it wakes, deposed.
    named: tokio::sync::watch::Sender<Option<String>>,
}

impl MdsConn {
    /// A connection over `addrs` (`host:port` each) with `tls`; nothing is
    /// dialed yet.
    pub fn new(addrs: Vec<String>, tls: ClientTls) -> Self {
        MdsConn {
            tls,
            addrs,
            current: Mutex::new(None),
            retry_for: Duration::from_secs(30),
            next: Mutex::new(0),
            gate: OnceLock::new(),
            named: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Makes every reply wait at `gate` for the recalls its mark names
    /// before the caller sees it (set once).
    pub fn set_gate(&self, gate: Arc<dyn MarkGate>) {
        let _ = self.gate.set(gate);
    }

    async fn pass(&self, md: &tonic::metadata::MetadataMap) {
        if let Some(g) = self.gate.get() {
            let mark = mark_of(md);
            if mark != 0 {
                if let Some(wait) = g.pass(mark) {
                    wait.await;
                }
            }
        }
    }

    /// The TLS its connections use.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }

    /// The configured addresses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    fn client_for(&self, addr: &str) -> Result<MetaClient<Traced>, Status> {
        let ch = self.tls.channel(addr, Dial::Mds, Duration::from_secs(2))?;
        Ok(MetaClient::with_interceptor(ch, Stamp)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn pick(&self) -> Result<(String, MetaClient<Traced>), Status> {
        if let Some(c) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(c.clone());
        }
        if self.addrs.is_empty() {
            return Err(Status::invalid_argument("no MDS addresses given"));
        }
        let i = {
            let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let i = *n % self.addrs.len();
            *n = n.wrapping_add(1);
            i
        };
        let addr = self.addrs[i].clone();
        let c = self.client_for(&addr)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr.clone(), c.clone()));
        Ok((addr, c))
    }

    fn switch(&self, failed: &str, hint: Option<String>) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().is_some_and(|(a, _)| a != failed) {
            return; // someone already moved on
        }
        metrics::counter!("avalon_mds_conn_failovers_total").increment(1);
        *cur = match hint.filter(|h| h != failed) {
            Some(h) => {
                self.named.send_if_modified(|n| {
                    let new = n.as_deref() != Some(h.as_str());
                    if new {
                        *n = Some(h.clone());
                    }
                    new
                });
                self.client_for(&h).ok().map(|c| (h, c))
            }
            None => None,
        };
    }

    /// Resolves once the nodes name a leader other than `addr` (a call in
    /// flight there is then answered by nobody who could still commit).
    async fn leader_moved_from(&self, addr: &str) -> String {
        let mut rx = self.named.subscribe();
        rx.borrow_and_update();
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(n) = rx.borrow_and_update().clone().filter(|n| n != addr) {
                return n;
            }
        }
    }

    /// Runs `f` against the leader, retrying on other nodes while the
    /// cluster has no reachable leader, for at most `retry_for`.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(MetaClient<Traced>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_within(self.retry_for, &mut f).await
    }

    /// [`MdsConn::call`] for one request message, cloned for each attempt:
    /// `conn.request(req, |mut c, r| async move { c.mknod(r).await })`.
    pub async fn request<R, T, F, Fut>(&self, req: R, mut f: F) -> Result<T, Status>
    where
        R: Clone,
        F: FnMut(MetaClient<Traced>, R) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(|c| f(c, req.clone())).await
    }

    /// [`MdsConn::call`] with an explicit retry budget.
    pub async fn call_within<T, F, Fut>(&self, budget: Duration, f: F) -> Result<T, Status>
    where
        F: FnMut(MetaClient<Traced>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_each(budget, None, f).await
    }

    /// [`MdsConn::request`] where a node that does not answer one attempt
    /// within `attempt` counts as unreachable: the call moves on to the
    /// others, which name the leader once one is elected. For short
    /// requests that must not wait on a leader that stopped without
    /// closing its connections (paused, hung): heartbeats, which tell a
    /// new leader in time which files this client writes.
    pub async fn request_each_within<R, T, F, Fut>(
        &self,
        attempt: Duration,
        req: R,
        mut f: F,
    ) -> Result<T, Status>
    where
        R: Clone,
        F: FnMut(MetaClient<Traced>, R) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_each(self.retry_for, Some(attempt), |c| f(c, req.clone()))
            .await
    }

    async fn call_each<T, F, Fut>(
        &self,
        budget: Duration,
        attempt: Option<Duration>,
        mut f: F,
    ) -> Result<T, Status>
    where
        F: FnMut(MetaClient<Traced>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + budget;
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        loop {
            let (addr, client) = self.pick()?;
            let call = async {
                match attempt {
                    None => f(client).await,
                    Some(a) => tokio::time::timeout(a, f(client))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Status::deadline_exceeded(format!(
                                "{addr} did not answer within {a:?}"
                            )))
                        }),
                }
            };
            // Another call may learn first that the leader moved: this one
            // goes there too. Mutations carry request ids that the new
            // leader deduplicates, and a deposed node commits nothing.
            let answer = tokio::select! {
                a = call => a,
                to = self.leader_moved_from(&addr) => {
                    metrics::counter!("avalon_mds_conn_retries_total").increment(1);
                    tracing::debug!(from = %addr, %to, "the leader moved; asking it");
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(format!(
                            "the metadata leader kept moving (last to {to}) for {budget:?}"
                        )));
                    }
                    continue;
                }
            };
            let err = match answer {
                Ok(r) => {
                    self.pass(r.metadata()).await;
                    return Ok(r.into_inner());
                }
                Err(e) => e,
            };
            // The MDS needs the caller's groups to decide: once, at once.
            if crate::caller::asks_groups(&err) && crate::caller::load_groups() {
                continue;
            }
            if has_errno(&err) || !retryable(&err) {
                self.pass(err.metadata()).await;
                return Err(err);
            }
            let hint = leader_hint(&err);
            tracing::debug!(%addr, code = ?err.code(), msg = err.message(), ?hint, "MDS call failed; retrying");
            let hinted = hint.is_some();
            metrics::counter!("avalon_mds_conn_retries_total").increment(1);
            self.switch(&addr, hint);
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "no metadata leader reachable at {} within {:?}: {}",
                    self.addrs.join(","),
                    budget,
                    err.message()
                )));
            }
            if !hinted {
                backoff.wait().await;
            }
        }
    }
}

fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted => true,
        // A connection torn down under the call (an MDS stopping while a
        // session stream holds its HTTP/2 connection open): tonic reports
        // the h2 error as Internal. Mutations carry request ids, so the
        // retry is applied at most once.
        Code::Internal => s.message().starts_with("h2 protocol error"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_on_a_former_leader_give_up_once_another_is_named() {
        let a = "127.0.0.1:1".to_string();
        let b = "127.0.0.1:2".to_string();
        let conn = MdsConn::new(vec![a.clone(), b.clone()], ClientTls::plaintext());
        assert_eq!(conn.pick().unwrap().0, a);
        let waiting = conn.leader_moved_from(&a);
        tokio::pin!(waiting);
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        // Naming the node the call is on moves nothing.
        conn.named.send_replace(Some(a.clone()));
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        conn.switch(&a, Some(b.clone()));
        assert_eq!(waiting.await, b);
        assert_eq!(conn.pick().unwrap().0, b);
    }

    /// Polls `f` once: its output if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(20), f)
            .await
            .ok()
    }

    #[test]
    fn torn_connections_are_retried_but_not_internal_errors() {
        assert!(retryable(&Status::unavailable("not the leader")));
        assert!(retryable(&Status::internal(
            "h2 protocol error: http2 error"
        )));
        assert!(!retryable(&Status::internal("state machine failed")));
        assert!(!retryable(&Status::invalid_argument("bad name")));
    }
}
