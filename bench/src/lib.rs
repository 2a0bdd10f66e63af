//! Benchmarks for creditgate. The criterion micro-benchmarks live in
//! `benches/`; this library is the load harness `creditgate-load`
//! (`src/main.rs` parses the flags and calls [`harness::run`]).
//!
//! - [`settings`] — flags and the defaults each profile gives them
//! - [`mix`]      — the request mix: request number → request, holds and costs
//! - [`tenants`]  — seeding orgs, users, apps and keys; which wallet pays
//! - [`client`]   — the HTTP client and admin API calls
//! - [`gateway`]  — running a creditgate process: config, write-through switch, SIGTERM, verify
//! - [`nginx`]    — the nginx pass-through baseline
//! - [`bare`]     — the bare hyper proxy, the reference row every mode is a ratio to
//! - [`cpu`]      — process CPU time from /proc
//! - [`drive`]    — closed- and open-loop load, request ids, progress lines
//! - [`stats`]    — samples, percentiles, medians with their spread
//! - [`sse`]      — per-event delay of paced streams
//! - [`audit`]    — the books against the mock's usage and the price file
//! - [`report`]   — the human table and the JSON report
//! - [`reports`]  — `creditgate-reports`: admin reports on a 1M-entry store against proxy p99
//! - [`harness`]  — the whole run

pub mod audit;
pub mod bare;
pub mod client;
pub mod cluster;
pub mod cpu;
pub mod drive;
pub mod gateway;
pub mod harness;
pub mod mix;
pub mod nginx;
pub mod report;
pub mod reports;
pub mod settings;
pub mod sse;
pub mod stats;
pub mod tenants;
