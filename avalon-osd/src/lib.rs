//! Avalon object storage daemon.
pub mod chunk_store;
