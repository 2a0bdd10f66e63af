//! creditgate: a usage-metering API gateway.
//!
//! Module map:
//! - [`alerts`] — balance alerts delivered as signed webhooks; recent 402s per wallet.
//! - [`app`] — wiring: config, listeners, shutdown.
//! - [`catalog`] — importing LiteLLM's public price catalog into a price table.
//! - [`admin`] — the admin listener: health, readiness, `/admin/v1` and the `/ui/` dashboard.
//! - [`clock`] — the injectable clock time-dependent rules read.
//! - [`cluster`] — cluster mode: shared credit in PostgreSQL through leases.
//! - [`config`] — gateway config: strict raw types, then validated types.
//! - [`demo`] — `creditgate demo`: mock upstream and gateway in one process.
//! - [`ledger`] — orgs, wallets, lots, holds, limits, entries (pure, no I/O).
//! - [`meter`] — usage extraction from JSON bodies, SSE streams, tool headers.
//! - [`mock`] — the mock upstream used by the demo, tests and load harness.
//! - [`pricing`] — the price table: schema, validation, cost functions (pure).
//! - [`proxy`] — the data path as named phases.
//! - [`rate_window`] — sliding-window request counts for per-key caps.
//! - [`server`] — the accept loop shared by all listeners.
//! - [`store`] — the storage interface, its sled backend, group commit, checkpoints and retention.
//! - [`telemetry`] — logging setup.

// The fuzzers run without a sanitizer on the strength of this (.ci/run).
#![forbid(unsafe_code)]

pub mod admin;
pub mod alerts;
pub mod app;
pub mod catalog;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod ledger;
pub mod meter;
pub mod mock;
pub mod pricing;
pub mod proxy;
pub mod rate_window;
pub mod server;
pub mod store;
pub mod supervise;
pub mod telemetry;
