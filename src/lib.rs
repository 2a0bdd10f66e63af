//! creditgate: a usage-metering API gateway.
//!
//! Module map:
//! - [`app`] — wiring: config, listeners, shutdown.
//! - [`admin`] — the admin listener: health and readiness.
//! - [`config`] — gateway config: strict raw types, then validated types.
//! - [`demo`] — `creditgate demo`: mock upstream and gateway in one process.
//! - [`mock`] — the mock upstream used by the demo, tests and load harness.
//! - [`proxy`] — the data path as named phases.
//! - [`server`] — the accept loop shared by all listeners.
//! - [`telemetry`] — logging setup.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod mock;
pub mod proxy;
pub mod server;
pub mod telemetry;
