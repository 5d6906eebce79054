//! The Avalon client: a library that turns POSIX operations into MDS and OSD
//! RPCs ([`client::Client`], [`data_path`]), and the thin FUSE adapter over
//! it ([`fs::AvalonFs`]).

pub mod acl;
pub mod attr;
pub mod changing_names;
pub mod chunk_cache;
pub mod chunk_caps;
pub mod client;
pub mod data_path;
pub mod delegation;
pub mod dir_read_ahead;
pub mod dir_stream;
pub mod error;
pub mod fs;
pub mod locks;
pub mod log_file;
pub mod lost_changes;
pub mod meta_cache;
pub mod metrics;
pub mod mount_source;
pub mod moved_names;
pub mod open_files;
pub mod osd_io;
pub mod page_cache;
pub mod recall;
pub mod session;
pub mod snapshots;
pub mod sync_marks;
pub mod write_buffer;
