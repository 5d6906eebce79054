//! Library side of `avalonctl`: starting and stopping local clusters (used by
//! `avalonctl up` and by the end-to-end test harness) and reading cluster
//! status, the cluster-wide settings (`pool`) and the trash.

pub mod dir_quota;
pub mod keys;
pub mod local_cluster;
pub mod mds_admin;
pub mod pool;
pub mod snapshot;
pub mod trash;
/// Cluster status (shared with the MDS status page, so it lives in the protocol crate).
pub use avalon_proto::cluster_status as status;
