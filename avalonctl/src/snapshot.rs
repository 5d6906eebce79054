//! `avalonctl snapshot`: create, list and remove directory snapshots
//! through the MDS leader (admin only; on a mount, root may also use
//! `mkdir DIR/.snap/NAME` and `rmdir`).

use anyhow::anyhow;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb;
use avalon_proto::tls::ClientTls;
use std::time::Duration;

/// How long one snapshot RPC may take: a create waits for the writers
/// below the directory to store what they buffered, across elections.
const RPC_TIMEOUT: Duration = Duration::from_secs(90);

fn request(dir: &str, name: &str) -> pb::SnapshotCreateRequest {
    pb::SnapshotCreateRequest {
        header: None,
        ino: 0,
        path: dir.into(),
        name: name.as_bytes().to_vec().into(),
        uid: 0,
        has_cred: false,
    }
}

/// Takes snapshot `name` of directory `dir` (a path from the filesystem root).
pub async fn create(
    tls: &ClientTls,
    addrs: &[String],
    dir: &str,
    name: &str,
) -> anyhow::Result<pb::SnapshotInfo> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = request(dir, name);
    conn.call_within(RPC_TIMEOUT, |mut c| {
        let r = req.clone();
        async move { c.snapshot_create(r).await }
    })
    .await
    .map_err(|s| anyhow!("snapshot {name} of {dir}: {}", s.message()))
}

/// Removes snapshot `name` of directory `dir`.
pub async fn remove(
    tls: &ClientTls,
    addrs: &[String],
    dir: &str,
    name: &str,
) -> anyhow::Result<()> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = request(dir, name);
    conn.call_within(RPC_TIMEOUT, |mut c| {
        let r = req.clone();
        async move { c.snapshot_remove(r).await }
    })
    .await
    .map_err(|s| anyhow!("removing snapshot {name} of {dir}: {}", s.message()))?;
    Ok(())
}

/// The snapshots of directory `dir`, or all of them with `None`.
pub async fn list(
    tls: &ClientTls,
    addrs: &[String],
    dir: Option<&str>,
) -> anyhow::Result<Vec<pb::SnapshotInfo>> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = pb::SnapshotListRequest {
        header: None,
        ino: 0,
        path: dir.unwrap_or_default().into(),
    };
    let r = conn
        .call_within(RPC_TIMEOUT, |mut c| {
            let r = req.clone();
            async move { c.snapshot_list(r).await }
        })
        .await
        .map_err(|s| anyhow!("listing snapshots: {}", s.message()))?;
    Ok(r.snapshots)
}

/// The listing as a table: ID, CREATED (UTC), INODES, DIR/.snap/NAME.
pub fn render(snaps: &[pb::SnapshotInfo]) -> String {
    let mut out = format!(
        "{:>8}  {:<19}  {:>10}  PATH\n",
        "ID", "CREATED (UTC)", "INODES"
    );
    for s in snaps {
        out.push_str(&format!(
            "{:>8}  {:<19}  {:>10}  {}/.snap/{}\n",
            s.id,
            crate::trash::utc(s.created_ns),
            s.inodes,
            s.path.trim_end_matches('/'),
            String::from_utf8_lossy(&s.name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let s = pb::SnapshotInfo {
            id: 3,
            dir: 7,
            path: "/a/b".into(),
            name: b"daily".to_vec().into(),
            created_ns: 0,
            inodes: 12,
        };
        let root = pb::SnapshotInfo {
            path: "/".into(),
            ..s.clone()
        };
        let t = render(&[s, root]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].ends_with("  1970-01-01 00:00:00          12  /a/b/.snap/daily"));
        assert!(lines[2].ends_with(" /.snap/daily"), "{}", lines[2]);
    }
}
