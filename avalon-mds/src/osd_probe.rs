//! Quick detection of a stopped OSD: when an up OSD has missed a couple of
//! heartbeats, the leader tries a TCP connection to its port. A refusal
//! means no process listens there (stopped, crashed, restarting), so it is
//! marked down at once instead of after `osd_down_after_ms` of silence,
//! during which clients would keep trying it. Anything else (a timeout, an
//! unreachable host) proves nothing and waits for the heartbeat rule.

use std::net::IpAddr;
use std::time::Duration;

/// Silence after which an up OSD is probed (its heartbeats come every
/// second by default).
pub const PROBE_AFTER: Duration = Duration::from_millis(1100);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The ids, among `osds` (id and address), whose port refuses connections
/// from `source` (this node's address; `None`: the kernel's choice).
pub async fn refusing(osds: Vec<(u64, String)>, source: Option<IpAddr>) -> Vec<u64> {
    let probes = osds.into_iter().map(|(id, addr)| async move {
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT,
            avalon_proto::tls::connect_tcp(&addr, source),
        );
        match attempt.await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(id),
            _ => None,
        }
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_refuses_and_a_listening_one_does_not() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let got = refusing(
            vec![
                (1, open.local_addr().unwrap().to_string()),
                (2, closed_addr),
            ],
            Some(std::net::Ipv4Addr::LOCALHOST.into()),
        )
        .await;
        assert_eq!(got, vec![2]);
    }
}
