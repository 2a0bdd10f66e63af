//! The admin API through its real listener, against a single node (the
//! suite is `admin_api/suite.rs`; `admin_api_cluster.rs` runs it against a
//! cluster replica).
#![allow(clippy::unwrap_used)]

mod common;

#[path = "admin_api/suite.rs"]
mod suite;
