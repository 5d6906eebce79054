//! The OSD's error type and its one conversion to a gRPC status.

use crate::chunk_store::StoreError;
use avalon_proto::errno;
use tonic::Status;

/// Errors of the OSD service.
#[derive(Debug, thiserror::Error)]
pub enum OsdError {
    /// From the chunk store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not registered with the MDS yet: no id, no cluster map.
    #[error("OSD is not registered with the metadata service yet")]
    NotReady,
    /// The request was placed with a cluster map that disagrees with ours.
    #[error("{0}")]
    StaleMap(String),
    /// Fewer than the write quorum of copies succeeded.
    #[error("write quorum not reached: {acks} of {need} copies succeeded; {detail}")]
    Quorum {
        acks: u32,
        need: u32,
        detail: String,
    },
    /// This OSD cannot serve the chunk yet (peering, recovering, marked
    /// down): the client should try another replica.
    #[error("{0}")]
    Peering(String),
    /// The metadata service could not be reached.
    #[error("metadata service unavailable: {0}")]
    Mds(String),
    /// A disk of the chunk's placement group is full (or a copy failed
    /// with ENOSPC): the client's write fails with ENOSPC.
    #[error("no space: {0}")]
    NoSpace(String),
}

/// Metadata key set on every status an OSD answers with, so that a client
/// can tell "this OSD answered: try it again" (peering, quorum) from "this
/// OSD could not be reached: try another member".
pub const ANSWERED_KEY: &str = avalon_proto::errno::OSD_ANSWERED_KEY;

impl From<OsdError> for Status {
    fn from(e: OsdError) -> Status {
        let mut s = status_of(e);
        s.metadata_mut().insert(
            ANSWERED_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        s
    }
}

fn status_of(e: OsdError) -> Status {
    {
        let msg = e.to_string();
        match e {
            OsdError::Store(StoreError::InvalidArgument(_)) | OsdError::InvalidArgument(_) => {
                errno::status(libc::EINVAL, msg)
            }
            OsdError::Store(StoreError::Corruption { .. }) => Status::data_loss(msg),
            OsdError::Store(StoreError::StaleVersion { .. })
            | OsdError::Store(StoreError::VersionGap { .. }) => Status::aborted(msg),
            OsdError::Store(StoreError::Io { source, .. }) => match source.raw_os_error() {
                Some(code @ (libc::ENOSPC | libc::EDQUOT)) => errno::status(code, msg),
                _ => Status::internal(msg),
            },
            OsdError::Store(StoreError::Internal(_)) => Status::internal(msg),
            OsdError::NotReady
            | OsdError::Quorum { .. }
            | OsdError::Mds(_)
            | OsdError::Peering(_) => Status::unavailable(msg),
            OsdError::StaleMap(_) => Status::failed_precondition(msg),
            OsdError::NoSpace(_) => errno::status(libc::ENOSPC, msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes() {
        let s: Status = OsdError::Store(StoreError::Corruption {
            ino: 1,
            index: 2,
            detail: "x".into(),
        })
        .into();
        assert_eq!(s.code(), Code::DataLoss);
        assert!(s.message().contains("corrupt"));
        let s: Status = OsdError::InvalidArgument("bad".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(errno::errno_of(&s), libc::EINVAL);
        let s: Status = OsdError::Store(StoreError::Io {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        })
        .into();
        assert_eq!(errno::errno_of(&s), libc::ENOSPC);
        let s: Status = OsdError::Quorum {
            acks: 1,
            need: 2,
            detail: "d".into(),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        let s: Status = OsdError::NoSpace("osd 2 is full".into()).into();
        assert_eq!(errno::errno_of(&s), libc::ENOSPC);
        assert_eq!(s.code(), Code::ResourceExhausted);
    }
}
