//! The recall mark: every MDS reply to a client session says how many
//! recalls the leader had sent that session when the reply was made. The
//! client applies those recalls before it uses the reply, so that a fresh
//! answer never meets a stale cached name it was already told to drop (two
//! names for one inode in the kernel's cache make it answer a rename as a
//! no-op without asking).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;

/// The response header (or trailers-only status header) with the mark.
pub const HEADER: &str = "avalon-recall-mark";

tokio::task_local! {
    /// The session the request being served answers (0: none).
    static REPLY_SID: Cell<u64>;
}

/// Names the session the current request's reply goes to (0: the reply
/// carries no mark). Called by the handlers; a no-op outside the layer.
pub fn reply_to(sid: u64) {
    let _ = REPLY_SID.try_with(|c| c.set(sid));
}

/// The mark of a reply's metadata (0: none).
pub fn mark_of(md: &tonic::metadata::MetadataMap) -> u64 {
    md.get(HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The recalls sent to a session so far; None while a change the
/// session must be told of, announced before the reply was made, has its
/// recalls still unsent. The second argument is where "before" ends,
/// kept between the calls for one reply (0 on the first).
pub type SentRecalls = Arc<dyn Fn(u64, &mut u64) -> Option<u64> + Send + Sync>;

/// How often a reply waiting for a change's recalls to go out looks again.
const UNSENT_POLL: Duration = Duration::from_millis(1);

/// How long a reply waits for them at most (a change stuck behind a new
/// leader's wait): then it goes with the mark it has.
const UNSENT_WAIT: Duration = Duration::from_secs(1);

/// Adds the mark to the replies of handlers that called [`reply_to`].
#[derive(Clone)]
pub struct RecallMarkLayer(pub SentRecalls);

impl<S> tower::Layer<S> for RecallMarkLayer {
    type Service = RecallMark<S>;

    fn layer(&self, inner: S) -> RecallMark<S> {
        RecallMark {
            inner,
            sent: self.0.clone(),
        }
    }
}

/// The service [`RecallMarkLayer`] makes.
#[derive(Clone)]
pub struct RecallMark<S> {
    inner: S,
    sent: SentRecalls,
}

/// A boxed future that can be sent between threads.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RecallMark<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFut<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let sent = self.sent.clone();
        Box::pin(REPLY_SID.scope(Cell::new(0), async move {
            let mut r = fut.await?;
            // Read after the reply was made: every recall sent before it
            // is counted (a later one too, which only costs a wait), and
            // those of a change under way to what the session holds are
            // waited for (the reply may have read the change).
            let sid = REPLY_SID.with(Cell::get);
            if sid != 0 {
                let give_up = Instant::now() + UNSENT_WAIT;
                let mut horizon = 0;
                let mark = loop {
                    match sent(sid, &mut horizon) {
                        Some(m) => break m,
                        None if Instant::now() < give_up => tokio::time::sleep(UNSENT_POLL).await,
                        None => break u64::MAX,
                    }
                };
                if mark == u64::MAX {
                    tracing::debug!(
                        sid,
                        "a change's recalls stayed unsent; the reply goes without its mark"
                    );
                } else if mark != 0 {
                    r.headers_mut()
                        .insert(HEADER, http::HeaderValue::from(mark));
                }
            }
            Ok(r)
        }))
    }
}

/// What a client does with a reply's mark before it uses the reply.
pub trait MarkGate: Send + Sync {
    /// None if the recalls up to `mark` are applied (or cannot be waited
    /// for); else a future that resolves once they are, or once the client
    /// gave up waiting and dropped what it caches.
    fn pass(&self, mark: u64) -> Option<BoxFut<()>>;
}
