//! Protocol limits shared by clients and servers.

/// Longest file name in bytes (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest symlink target in bytes (PATH_MAX).
pub const PATH_MAX: usize = 4096;
/// Longest xattr name in bytes (XATTR_NAME_MAX).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest xattr value in bytes (XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: usize = 65536;
/// Default chunk size of regular files.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Largest chunk size a layout may ask for.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Smallest chunk size a layout may ask for.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest gRPC message any component accepts (a chunk plus headers).
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_SIZE as usize + (1 << 20);
/// Largest file size (2^63 - 1, what off_t can address).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Hard links per inode (EMLINK above).
pub const LINK_MAX: u32 = 65000;
/// Default number of placement groups.
pub const DEFAULT_PG_COUNT: u32 = 128;
/// Root directory inode.
pub const ROOT_INO: u64 = 1;

/// Checks a directory entry name: 1..=NAME_MAX bytes, no `/`, no NUL, not
/// `.` or `..`. Returns the errno to fail with.
pub fn check_name(name: &[u8]) -> Result<(), i32> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(libc::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(libc::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(check_name(b"a"), Ok(()));
        assert_eq!(check_name(&[0xff, 0xfe]), Ok(()));
        assert_eq!(check_name(b""), Err(libc::EINVAL));
        assert_eq!(check_name(b"."), Err(libc::EINVAL));
        assert_eq!(check_name(b"a/b"), Err(libc::EINVAL));
        assert_eq!(check_name(b"a\0"), Err(libc::EINVAL));
        assert_eq!(check_name(&[b'x'; 255]), Ok(()));
        assert_eq!(check_name(&[b'x'; 256]), Err(libc::ENAMETOOLONG));
    }
}
