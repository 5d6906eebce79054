//! Request ids (issue 22): one id per client operation, carried to every
//! daemon the operation reaches, so that one slow `fsync` can be followed
//! through the client's, the MDS's and the OSDs' logs.
//!
//! The client runs each FUSE operation inside [`scope`]; its gRPC calls
//! carry the id in the [`HEADER`] metadata ([`Stamp`]) and its data-port
//! requests in `RequestHeader.trace_id` (which a primary OSD forwards to
//! the replicas with the write). Servers run every request inside
//! [`serve`] ([`TraceLayer`] for gRPC): a tracing span carrying the id, so
//! every log line of the request shows it, and an info line for a request
//! slower than [`set_slow_threshold`].

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;
use tracing::Instrument;

/// The gRPC metadata key (and HTTP/2 header) with the id, 16 hex digits.
pub const HEADER: &str = "avalon-request-id";

/// Default for `slow_request_ms`.
pub const DEFAULT_SLOW_MS: u64 = 1000;

tokio::task_local! {
    /// The id of the request the current task works for.
    static CURRENT: u64;
}

/// Requests at least this slow (ms) are logged at info.
static SLOW_MS: AtomicU64 = AtomicU64::new(DEFAULT_SLOW_MS);

/// A request id, shown as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Id(pub u64);

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A new id, unique within this process and unlikely to meet another
/// process's: a per-process random seed and a counter, mixed (splitmix64
/// is a bijection, so distinct counters give distinct ids). Never 0.
pub fn fresh() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let seed = *SEED.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.max(1)
}

/// The id of the request the current task works for, if any.
pub fn current() -> Option<u64> {
    CURRENT.try_with(|v| *v).ok()
}

/// Runs `f` as part of request `id` (its calls carry the id).
pub async fn scope<F: Future>(id: u64, f: F) -> F::Output {
    CURRENT.scope(id, f).await
}

/// Sets the slow-request threshold (`slow_request_ms`).
pub fn set_slow_threshold(ms: u64) {
    SLOW_MS.store(ms, Ordering::Relaxed);
}

/// The slow-request threshold.
pub fn slow_threshold() -> Duration {
    Duration::from_millis(SLOW_MS.load(Ordering::Relaxed))
}

/// The id in a header value, if it is one.
pub fn parse(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    u64::from_str_radix(s, 16).ok().filter(|&id| id != 0)
}

/// Serves `f` as request `id` (0: a fresh one): inside a span carrying
/// the id and with the id as the task's current one, logging it at info
/// with `what` if it took at least the slow threshold.
pub async fn serve<F: Future>(id: u64, what: &str, f: F) -> F::Output {
    let id = if id == 0 { fresh() } else { id };
    let span = tracing::info_span!("req", rid = %Id(id));
    let start = Instant::now();
    let out = CURRENT.scope(id, f).instrument(span.clone()).await;
    let took = start.elapsed();
    if took >= slow_threshold() {
        span.in_scope(|| {
            tracing::info!(request = what, ms = took.as_millis() as u64, "slow request")
        });
    }
    out
}

/// [`serve`], unless the task already serves a request (a gRPC call the
/// [`TraceLayer`] wrapped), which `f` is then part of.
pub async fn serve_unless_served<F: Future>(id: u64, what: &str, f: F) -> F::Output {
    if current().is_some() {
        f.await
    } else {
        serve(id, what, f).await
    }
}

/// Client side: puts the current request's id (or a fresh one, for a
/// call made outside any request) into each call's metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamp;

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let id = current().unwrap_or_else(fresh);
        // 16 hex digits are always a valid header value.
        if let Ok(v) = Id(id).to_string().parse() {
            req.metadata_mut().insert(HEADER, v);
        }
        // The caller's groups, on the retry the MDS asked them for.
        if let Some(g) = crate::caller::groups_metadata() {
            req.metadata_mut().insert(crate::caller::GROUPS_KEY, g);
        }
        Ok(req)
    }
}

/// A channel whose calls carry request ids.
pub type Traced = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Stamp>;

/// Server side: serves every gRPC request through [`serve`], with the id
/// of its [`HEADER`] (a fresh one without).
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// The service [`TraceLayer`] makes.
#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Trace<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = crate::recall_mark::BoxFut<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get(HEADER)
            .and_then(|v| parse(v.as_bytes()))
            .unwrap_or(0);
        let uri = req.uri().clone();
        let fut = self.inner.call(req);
        Box::pin(async move { serve(id, uri.path(), fut).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_round_trip() {
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|_| fresh()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.into_iter().take(100) {
            let shown = Id(id).to_string();
            assert_eq!(shown.len(), 16);
            assert_eq!(parse(shown.as_bytes()), Some(id));
        }
        assert_eq!(parse(b"0000000000000000"), None);
        assert_eq!(parse(b"not hex"), None);
    }

    #[tokio::test]
    async fn the_current_id_is_the_scope_s_and_calls_carry_it() {
        assert_eq!(current(), None);
        let got = scope(0xabc, async {
            let mut s = Stamp;
            let req = tonic::service::Interceptor::call(&mut s, tonic::Request::new(())).unwrap();
            (current(), req.metadata().get(HEADER).cloned())
        })
        .await;
        assert_eq!(got.0, Some(0xabc));
        assert_eq!(got.1.unwrap().to_str().unwrap(), "0000000000000abc");
        // Outside a scope every call gets an id of its own.
        let mut s = Stamp;
        let req = tonic::service::Interceptor::call(&mut s, tonic::Request::new(())).unwrap();
        assert!(parse(req.metadata().get(HEADER).unwrap().as_bytes()).is_some());
    }

    #[tokio::test]
    async fn serve_sets_the_id_and_nests_once() {
        let inner = serve(7, "test", async {
            serve_unless_served(9, "inner", async { current() }).await
        })
        .await;
        assert_eq!(inner, Some(7), "a served request keeps its id");
        let alone = serve_unless_served(9, "alone", async { current() }).await;
        assert_eq!(alone, Some(9));
        let fresh_one = serve(0, "fresh", async { current() }).await;
        assert!(fresh_one.is_some_and(|id| id != 0));
    }
}
