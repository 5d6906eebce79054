//! Delegated changes the MDS will never apply: refused (a retry cannot
//! fix them) or queued by a session the MDS expired. Each is logged by
//! name and inode, and the files and directories they touch report an
//! error at their next fsync or close (see `delegation.rs`).

use avalon_proto::pb::{self, delegated_op::Op as D};
use std::collections::HashMap;
use std::sync::Mutex;

/// Inodes remembered with a loss at most (the log names every change).
const KEEP_MAX: usize = 1 << 16;

/// What this client lost of its delegated changes.
#[derive(Default)]
pub struct LostChanges {
    st: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Inode → errno its next fsync or close reports.
    inos: HashMap<u64, i32>,
    /// Losses recorded so far: a request that waited for the queue while
    /// this moved must not act as if the changes before it were applied.
    events: u64,
}

impl LostChanges {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `lost` (each change with the errno the MDS gave it, 0
    /// if it refused the whole batch) will never be applied because of
    /// `why`: every change is logged, and the inodes they touch report
    /// `report` at their next fsync or close.
    pub fn record(&self, lost: &[(&pb::DelegatedOp, i32)], report: i32, why: &str) {
        if lost.is_empty() {
            return;
        }
        tracing::error!(
            lost = lost.len(),
            reason = why,
            "delegated changes lost: the MDS will not apply them; fsync or close of the \
             files and directories they touch reports the error"
        );
        let mut st = self.lock();
        st.events += 1;
        for (op, errno) in lost {
            let Some(op) = &op.op else { continue };
            tracing::error!(change = %describe(op), mds_errno = errno, "lost delegated change");
            for ino in touched(op).into_iter().flatten() {
                if st.inos.len() < KEEP_MAX || st.inos.contains_key(&ino) {
                    st.inos.insert(ino, report);
                }
            }
        }
    }

    /// How many losses were recorded so far.
    pub fn events(&self) -> u64 {
        self.lock().events
    }

    /// The errno to report for `ino`, once, if a change touching it was
    /// lost.
    pub fn take(&self, ino: u64) -> Option<i32> {
        self.lock().inos.remove(&ino)
    }
}

/// The inodes whose fsync or close answers for a change: what it creates
/// or changes, and the directories whose entries it changes.
fn touched(op: &D) -> [Option<u64>; 2] {
    match op {
        D::Create(c) => [Some(c.ino), Some(c.parent)],
        D::SetAttr(a) => [Some(a.ino), None],
        D::CommitWrite(w) => [Some(w.ino), None],
        D::Unlink(u) | D::Rmdir(u) => [Some(u.parent), None],
        D::Rename(m) => [Some(m.parent), Some(m.new_parent)],
    }
}

/// A change in words, for the log.
fn describe(op: &D) -> String {
    let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    match op {
        D::Create(c) => format!(
            "create of {:?} (inode {}, mode {:o}) in directory {}",
            name(&c.name),
            c.ino,
            c.mode,
            c.parent
        ),
        D::SetAttr(a) => format!("attribute change of inode {}", a.ino),
        D::CommitWrite(w) => format!("size {} of inode {}", w.size, w.ino),
        D::Unlink(u) => format!("unlink of {:?} in directory {}", name(&u.name), u.parent),
        D::Rmdir(u) => format!("rmdir of {:?} in directory {}", name(&u.name), u.parent),
        D::Rename(m) => format!(
            "rename of {:?} in directory {} to {:?} in directory {}",
            name(&m.name),
            m.parent,
            name(&m.new_name),
            m.new_parent
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn create(ino: u64, parent: u64, name: &str) -> pb::DelegatedOp {
        pb::DelegatedOp {
            now_ns: 1,
            op: Some(D::Create(pb::CreateAs {
                ino,
                parent,
                name: Bytes::copy_from_slice(name.as_bytes()),
                mode: libc::S_IFREG | 0o644,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_loss_is_reported_once_for_each_inode_it_touches() {
        let l = LostChanges::default();
        assert_eq!(l.events(), 0);
        l.record(&[], libc::EIO, "nothing");
        assert_eq!(l.events(), 0, "no changes, no loss");
        let (a, b) = (create(10, 2, "a"), create(11, 10, "b"));
        l.record(&[(&a, 0), (&b, libc::ENOENT)], libc::EIO, "refused");
        assert_eq!(l.events(), 1);
        for ino in [2, 10, 11] {
            assert_eq!(l.take(ino), Some(libc::EIO), "inode {ino}");
            assert_eq!(l.take(ino), None, "inode {ino} reported twice");
        }
        assert_eq!(l.take(3), None);
        let r = pb::DelegatedOp {
            now_ns: 1,
            op: Some(D::Rename(pb::RenameRequest {
                parent: 4,
                name: Bytes::from_static(b"x"),
                new_parent: 5,
                new_name: Bytes::from_static(b"y"),
                ..Default::default()
            })),
        };
        l.record(&[(&r, 0)], libc::ENOSPC, "full");
        assert_eq!(l.events(), 2);
        assert_eq!(
            (l.take(4), l.take(5)),
            (Some(libc::ENOSPC), Some(libc::ENOSPC))
        );
    }
}
