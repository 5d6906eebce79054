//! Avalon's chaos harness: a local cluster (3 MDS, 3 OSDs, each on its own
//! loopback address) with two FUSE mounts, a workload of clients doing
//! real syscalls on the mounts while a nemesis injects faults, and
//! checkers over the recorded history.

pub mod check;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod partition;
pub mod report;
pub mod run;
pub mod workload;
