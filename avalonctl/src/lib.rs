//! Library side of `avalonctl`: starting and stopping local clusters (used by
//! `avalonctl up` and by the end-to-end test harness) and reading cluster
//! status.

pub mod local_cluster;
pub mod mds_admin;
pub mod status;
