//! O_APPEND as a file's only writer, fenced by the metadata lease.
//!
//! A session the MDS answered "only writer" (an open or create reply, or a
//! delegation it created the file under) appends at the end of file as it
//! knows it and commits the size later. That is sound while another opener
//! must first make it commit (a shared-write demand, which the MDS waits
//! for while the session is alive). Once its lease broke (a partition, a
//! failover slower than the lease), the MDS may have gone on without it:
//! another session may have appended at that same end. So, from the break
//! on, this session neither sends nor commits those appends unconfirmed:
//! a conditional commit (`CommitWriteRequest.expect_size`) takes them only
//! if the MDS's size is still where they started, after telling the other
//! writers to commit theirs; the file then goes to shared-write mode (its
//! appends reserve their ranges at the MDS). If the size moved, the
//! appends are dropped and the file's fsync and close fail with EIO: they
//! were never acknowledged, and writing them would overwrite records that
//! were.

use crate::client::Client;
use crate::error::{ClientError, Result};
use avalon_proto::pb;

impl Client {
    /// Records that an MDS answer asked for under lease generation
    /// `before` (`MetaCache::lease_held` when the request left) makes this
    /// session `ino`'s only writer; the lease must still be that one.
    pub(crate) fn note_sole(&self, ino: u64, before: Option<u64>) {
        let held = before.filter(|_| self.meta.lease_held() == before);
        self.open_files.note_sole(ino, held);
    }

    /// True unless this session is `ino`'s only writer under the lease it
    /// holds now, unbroken since the MDS said so.
    pub(crate) fn sole_lapsed(&self, ino: u64) -> bool {
        let lease = self.meta.lease_held();
        self.open_files
            .files
            .get(&ino)
            .is_none_or(|st| st.sole_gen.is_none() || st.sole_gen != lease)
    }

    /// True if appends made to `ino` as its only writer are pending and
    /// must be confirmed before they are sent or committed. The lease is
    /// read only for such a file: every chunk send and commit asks.
    pub(crate) fn appends_unconfirmed(&self, ino: u64) -> bool {
        let Some(sole_gen) = self
            .open_files
            .files
            .get(&ino)
            .filter(|st| st.append_base.is_some())
            .map(|st| st.sole_gen)
        else {
            return false;
        };
        sole_gen.is_none() || sole_gen != self.meta.lease_held()
    }

    /// The error of a send of `ino`'s buffered data that may not go out:
    /// the file is fenced (buffered before the fence), or it holds appends
    /// not confirmed yet. None: it may go.
    pub(crate) fn held_back(&self, ino: u64) -> Option<ClientError> {
        let fenced_now = self.open_files.files.get(&ino).map(|st| st.fenced)?;
        if fenced_now {
            return Some(fenced(ino));
        }
        self.appends_unconfirmed(ino).then(|| {
            ClientError::posix(
                libc::EIO,
                format!("appends to inode {ino} not confirmed since the metadata lease broke"),
            )
        })
    }

    /// Confirms this session's pending appends to `ino` after its lease
    /// broke (see the module doc) and puts the file in shared-write mode.
    /// EIO if the MDS's size moved meanwhile: the file is fenced.
    pub(crate) async fn confirm_sole_writes(&self, ino: u64) -> Result<()> {
        let _turn = self.confirming.lock().await;
        let lease = self.meta.lease_held();
        let (size, base) = match self.open_files.files.get(&ino) {
            Some(st) if st.fenced => return Err(fenced(ino)),
            Some(st) if st.sole_gen.is_some() && st.sole_gen == lease => return Ok(()),
            Some(st) => (st.size, st.append_base),
            None => return Ok(()),
        };
        let Some(mut base) = base else {
            // Nothing to confirm: later appends reserve their ranges.
            self.open_files.set_shared(ino);
            return Ok(());
        };
        let mut size = size;
        // A refusal may come from this client's own commits (one on its
        // way, or a delegated one the request's barrier sent first): once
        // those are noted, it asks again from the size they left.
        for _ in 0..3 {
            match self.confirm_once(ino, base, size).await {
                Err(e) if e.errno() == libc::ESTALE => {}
                r => return r,
            }
            self.own_commits_done(ino).await;
            match self.open_files.known(ino) {
                Some(st) if st.append_base.is_none() => {
                    self.open_files.set_shared(ino);
                    return Ok(());
                }
                Some(st) if st.append_base != Some(base) => {
                    base = st.append_base.unwrap_or(base);
                    size = st.size;
                }
                _ => break,
            }
        }
        tracing::info!(ino, base, size, "appends refused");
        let mut st = self.open_files.files.entry(ino).or_default();
        st.give_up_growth();
        st.dirty = false;
        drop(st);
        Err(self.fence(
            ino,
            "appends made as the only writer are lost: another writer appended meanwhile",
        ))
    }

    /// Fences `ino` (`why`: for the log): what is buffered is dropped,
    /// each handle open reports EIO once, later writes go through in
    /// shared-write mode.
    pub(crate) fn fence(&self, ino: u64, why: &str) -> ClientError {
        tracing::warn!(ino, "{why}");
        let mut st = self.open_files.files.entry(ino).or_default();
        st.fenced = true;
        st.fences = st.fences.wrapping_add(1);
        st.append_base = None;
        st.shared = true;
        fenced(ino)
    }

    /// Waits (at most 2 s) until no size commit of this client for `ino`
    /// is under way, and a little more for a delegated one being noted.
    async fn own_commits_done(&self, ino: u64) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let busy = self
                .open_files
                .known(ino)
                .is_some_and(|st| st.commits_started != st.commits_done);
            if !busy || std::time::Instant::now() >= until {
                return;
            }
        }
    }

    /// One conditional commit of `size` if the MDS holds `base`; ESTALE if
    /// not (nothing changed then).
    async fn confirm_once(&self, ino: u64, base: u64, size: u64) -> Result<()> {
        tracing::info!(
            ino,
            base,
            size,
            "confirming appends made as the only writer"
        );
        let req = pb::CommitWriteRequest {
            header: self.session.header(),
            ino,
            size,
            expect_size: Some(base),
            ..Default::default()
        };
        self.meta.forget_attr(ino);
        let r = self
            .rpc(req, |mut c, r| async move { c.commit_write(r).await })
            .await
            .map_err(ClientError::from);
        r?;
        let mut st = self.open_files.files.entry(ino).or_default();
        st.committed(size);
        st.append_base = None;
        st.shared = true;
        Ok(())
    }
}

impl Client {
    /// Handle `fh` of `ino` was opened: fences from now on are its to report.
    pub fn note_handle(&self, fh: u64, ino: u64) {
        let fences = self.open_files.known(ino).map_or(0, |st| st.fences);
        self.seen_fences.insert(fh, (ino, fences));
    }

    /// EIO, once, if `ino` was fenced since handle `fh` last reported it
    /// (at fsync and close: the handle's writes may be among those lost).
    pub fn fence_error(&self, fh: u64) -> Result<()> {
        let Some(mut seen) = self.seen_fences.get_mut(&fh) else {
            return Ok(());
        };
        let ino = seen.0;
        let now = self.open_files.known(ino).map_or(0, |st| st.fences);
        if now == seen.1 {
            return Ok(());
        }
        seen.1 = now;
        Err(fenced(ino))
    }

    /// Handle `fh` was released.
    pub fn forget_handle(&self, fh: u64) {
        self.seen_fences.remove(&fh);
    }
}

/// The error of a fenced file's buffered writes, fsync and close.
fn fenced(ino: u64) -> ClientError {
    ClientError::posix(
        libc::EIO,
        format!("appends to inode {ino} made before the metadata lease broke were not confirmed"),
    )
}
