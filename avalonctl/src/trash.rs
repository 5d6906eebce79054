//! `avalonctl trash`: list, restore and purge what directories with a
//! retention (`avalon.trash_seconds`) kept of removed files, through the
//! MDS leader (admin only).

use anyhow::anyhow;
use avalon_proto::mds_conn::MdsConn;
use avalon_proto::pb;
use avalon_proto::tls::ClientTls;
use std::time::Duration;

/// How long one trash RPC may take, retries across elections included.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The entries whose original path is `path` or below it ("" or "/":
/// all), the first 10000 by id; and whether more match.
pub async fn list(
    tls: &ClientTls,
    addrs: &[String],
    path: &str,
) -> anyhow::Result<(Vec<pb::TrashEntry>, bool)> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = pb::TrashListRequest { path: path.into() };
    let r = conn
        .call_within(RPC_TIMEOUT, |mut c| {
            let r = req.clone();
            async move { c.trash_list(r).await }
        })
        .await
        .map_err(|s| anyhow!("listing the trash: {}", s.message()))?;
    Ok((r.entries, r.more))
}

/// Restores entry `id` (at its original path, or at `to`).
pub async fn restore(
    tls: &ClientTls,
    addrs: &[String],
    id: u64,
    to: Option<&str>,
) -> anyhow::Result<pb::TrashRestoreReply> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = pb::TrashRestoreRequest {
        header: None,
        id,
        to: to.unwrap_or_default().into(),
    };
    conn.call_within(RPC_TIMEOUT, |mut c| {
        let r = req.clone();
        async move { c.trash_restore(r).await }
    })
    .await
    .map_err(|s| anyhow!("restoring trash entry {id}: {}", s.message()))
}

/// Frees entries `ids`, or all with `all`; returns how many went.
pub async fn purge(
    tls: &ClientTls,
    addrs: &[String],
    ids: Vec<u64>,
    all: bool,
) -> anyhow::Result<u64> {
    let conn = MdsConn::new(addrs.to_vec(), tls.clone());
    let req = pb::TrashPurgeRequest {
        header: None,
        ids,
        all,
    };
    let r = conn
        .call_within(RPC_TIMEOUT, |mut c| {
            let r = req.clone();
            async move { c.trash_purge(r).await }
        })
        .await
        .map_err(|s| anyhow!("purging the trash: {}", s.message()))?;
    Ok(r.purged)
}

/// A time in ns since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(ns: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{ns} ns"),
    }
}

/// The listing as a table: ID, SIZE, DELETED, EXPIRES (UTC), PATH (a
/// directory's path ends with `/`).
pub fn render(entries: &[pb::TrashEntry]) -> String {
    let mut out = format!(
        "{:>8}  {:>12}  {:<19}  {:<19}  PATH\n",
        "ID", "SIZE", "DELETED (UTC)", "EXPIRES (UTC)"
    );
    for e in entries {
        let a = e.attr.unwrap_or_default();
        let dir = a.mode & libc::S_IFMT == libc::S_IFDIR;
        out.push_str(&format!(
            "{:>8}  {:>12}  {:<19}  {:<19}  {}{}\n",
            e.id,
            if dir {
                "-".to_string()
            } else {
                a.size.to_string()
            },
            utc(e.deleted_ns),
            utc(e.expires_ns),
            e.path,
            if dir { "/" } else { "" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400 * 1_000_000_000), "2000-02-29 00:00:00");
        assert_eq!(
            utc(1_796_601_845 * 1_000_000_000 + 5),
            "2026-12-07 00:04:05"
        );
    }

    #[test]
    fn render_marks_directories() {
        let e = |id, path: &str, mode| pb::TrashEntry {
            id,
            path: path.into(),
            attr: Some(pb::Attr {
                mode,
                size: 42,
                ..Default::default()
            }),
            deleted_ns: 0,
            expires_ns: 60_000_000_000,
        };
        let out = render(&[
            e(1, "/a/f", libc::S_IFREG | 0o644),
            e(2, "/a", libc::S_IFDIR),
        ]);
        assert!(out.contains("/a/f\n") && out.contains(" 42 "), "{out}");
        assert!(out.contains("/a/\n"), "{out}");
        assert!(out.contains("1970-01-01 00:01:00"), "{out}");
    }
}
