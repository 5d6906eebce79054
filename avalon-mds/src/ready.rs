//! systemd readiness: READY=1 once this node is in the raft group (a member
//! of the current membership that knows a leader), so that "active" of a
//! Type=notify unit means "serving". Without NOTIFY_SOCKET every call is a
//! no-op.

use openraft::{BasicNode, RaftMetrics};
use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Waits until node `id` is a member with a known leader, then tells
/// systemd it is ready; gives up quietly on `stop`.
pub async fn notify_when_member(
    mut metrics: watch::Receiver<RaftMetrics<u64, BasicNode>>,
    id: u64,
    stop: CancellationToken,
) {
    // A failed notification is logged, never fatal: the node serves anyway.
    let send = |state: &[NotifyState]| {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    };
    send(&[NotifyState::Status("waiting to join the raft group")]);
    loop {
        let leader = {
            let m = metrics.borrow_and_update();
            let member = m.membership_config.membership().get_node(&id).is_some();
            m.current_leader.filter(|_| member)
        };
        if let Some(leader) = leader {
            let status = format!("in the raft group (leader {leader})");
            send(&[NotifyState::Ready, NotifyState::Status(&status)]);
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}
