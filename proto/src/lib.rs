//! Avalon's wire protocol: the generated gRPC services and messages, plus the
//! few pure functions every component must agree on (chunk placement, the
//! errno codec, protocol limits).

pub mod backoff;
pub mod caller;
pub mod chunk_cap;
pub mod cluster_status;
pub mod config_example;
pub mod data_conn;
pub mod data_format;
pub mod data_wire;
pub mod disk_usage;
pub mod errno;
pub mod limits;
pub mod locks;
pub mod log_output;
pub mod man_page;
pub mod mds_conn;
pub mod metrics_http;
pub mod op_metrics;
pub mod placement;
pub mod recall_mark;
pub mod request_id;
pub mod tls;
pub mod tls_records;
pub mod version;

/// Generated protobuf messages and tonic services (`avalon.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("avalon.v1");
}
