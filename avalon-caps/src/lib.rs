//! Avalon's capability engine: which client session may do what with an
//! inode without asking the MDS (cache attributes, names, a listing or
//! data; buffer attribute changes or writes; create names under a
//! directory delegation), for how long (the session's lease), and how the
//! MDS takes those rights back.
//!
//! The engine is pure: no async, sockets, clocks or threads. Time comes in
//! as milliseconds ([`Millis`]), messages come in as values, and every call
//! returns the commands its shell must carry out, in order (openraft's
//! Engine style). [`mds::Mds`] is the MDS side, [`client::Client`] the
//! client side, [`rights`] the rights and their compatibility table, and
//! [`link`] the ordered, at-most-once delivery both sides rely on.

pub mod client;
pub mod link;
pub mod mds;
pub mod msg;
pub mod rights;

/// Time in milliseconds, from any fixed origin the shell chooses.
pub type Millis = u64;
/// A client session, as the MDS numbers them (never reused).
pub type SessionId = u64;
/// An inode number.
pub type Ino = u64;

pub use client::{Client, ClientCmd, Decision, Op};
pub use mds::{Mds, MdsCmd};
pub use msg::{InoRange, ToClient, ToMds};
pub use rights::{compatible, Right, Rights};
