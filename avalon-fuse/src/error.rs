//! Client errors, and the one place where they become errnos.

use avalon_proto::errno;

/// What can go wrong in a client operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a definite POSIX error.
    #[error("{message} (errno {errno})")]
    Posix { errno: i32, message: String },
    /// The cluster could not be reached or could not serve the request.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// Input from the kernel or the user that the protocol cannot carry.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// This client and the MDS speak incompatible protocol versions.
    #[error("{0}")]
    Refused(String),
    /// A directory quota above the file or directory is full (EDQUOT).
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
}

impl ClientError {
    /// A POSIX error with a message.
    pub fn posix(errno: i32, message: impl Into<String>) -> Self {
        ClientError::Posix {
            errno,
            message: message.into(),
        }
    }

    /// The errno the kernel (and so the application) sees.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Posix { errno, .. } => *errno,
            ClientError::Unavailable(_) | ClientError::Refused(_) => libc::EIO,
            ClientError::Invalid(_) => libc::EINVAL,
            ClientError::QuotaExceeded(_) => libc::EDQUOT,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        if avalon_proto::version::is_refusal(&s) {
            ClientError::Refused(s.message().to_string())
        } else if errno::has_errno(&s) && errno::errno_of(&s) == libc::EDQUOT {
            ClientError::QuotaExceeded(s.message().to_string())
        } else if errno::has_errno(&s) {
            ClientError::Posix {
                errno: errno::errno_of(&s),
                message: s.message().to_string(),
            }
        } else {
            match s.code() {
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                    ClientError::Invalid(s.message().to_string())
                }
                tonic::Code::NotFound
                | tonic::Code::AlreadyExists
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::ResourceExhausted => ClientError::Posix {
                    errno: errno::errno_of(&s),
                    message: s.message().to_string(),
                },
                _ => ClientError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
            }
        }
    }
}

/// Result of a client operation.
pub type Result<T> = std::result::Result<T, ClientError>;
