//! Cluster-wide settings (`avalonctl pool`): show them, change replicas and
//! write quorum through the MDS leader (a raft entry), then follow the
//! OSDs' re-replication.

use anyhow::{anyhow, bail};
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb;
use avalon_proto::tls::ClientTls;
use std::time::Duration;

/// How long one settings RPC may take, retries across elections included.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster's stored settings.
pub async fn get(tls: &ClientTls, addrs: &[String]) -> anyhow::Result<pb::ClusterSettings> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    conn.call_within(RPC_TIMEOUT, |mut c| async move {
        c.get_settings(pb::Empty {}).await
    })
    .await
    .map_err(|s| anyhow!("reading the cluster settings: {}", s.message()))
}

/// Sets replicas (and the write quorum; 0 keeps the current one, capped at
/// `replicas`); returns the settings now in force.
pub async fn set_replicas(
    tls: &ClientTls,
    addrs: &[String],
    replicas: u32,
    write_quorum: u32,
) -> anyhow::Result<pb::ClusterSettings> {
    if replicas == 0 {
        bail!("replicas must be >= 1");
    }
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = pb::SetReplicasRequest {
        header: None,
        replicas,
        write_quorum,
    };
    conn.call_within(RPC_TIMEOUT, |mut c| {
        let r = req.clone();
        async move { c.set_replicas(r).await }
    })
    .await
    .map_err(|s| anyhow!("setting replicas to {replicas}: {}", s.message()))
}

/// The settings as `avalonctl pool show` prints them.
pub fn render(s: &pb::ClusterSettings) -> String {
    format!(
        "cluster id:          {}\n\
         replicas:            {}\n\
         write quorum:        {}\n\
         placement groups:    {}\n\
         chunk size:          {} bytes\n\
         failure-domain rule: {}\n",
        s.cluster_id, s.replicas, s.write_quorum, s.pg_count, s.chunk_size, s.failure_domain_rule
    )
}

/// Percentage of the work of a re-replication that is done: the lower of
/// the share of PG copies peered under the current map and the share of
/// the largest byte backlog seen that has been copied.
pub fn percent_done(pg_copies: u32, peering: u32, bytes_left: u64, peak_bytes: u64) -> u64 {
    let pgs = if pg_copies == 0 {
        100
    } else {
        u64::from(pg_copies.saturating_sub(peering)) * 100 / u64::from(pg_copies)
    };
    let bytes = (bytes_left * 100)
        .checked_div(peak_bytes)
        .map_or(100, |left| 100u64.saturating_sub(left));
    pgs.min(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_the_slower_of_pgs_and_bytes() {
        assert_eq!(percent_done(0, 0, 0, 0), 100);
        assert_eq!(percent_done(100, 50, 0, 0), 50);
        assert_eq!(percent_done(100, 0, 25, 100), 75);
        assert_eq!(percent_done(100, 10, 75, 100), 25);
        assert_eq!(percent_done(100, 200, 0, 0), 0);
    }

    #[test]
    fn render_names_every_setting() {
        let s = pb::ClusterSettings {
            cluster_id: "abc".into(),
            pg_count: 256,
            replicas: 3,
            write_quorum: 2,
            chunk_size: 4 << 20,
            failure_domain_rule: "spread".into(),
        };
        let out = render(&s);
        for want in ["abc", "replicas:            3", "256", "4194304", "spread"] {
            assert!(out.contains(want), "{want} missing in {out}");
        }
    }
}
