//! The price table in force, swapped atomically on reload.
//!
//! This is the one part of `pricing` that touches the outside world: it reads
//! the price file. A reload parses and validates the whole file first; only a
//! valid table that prices every tool the routes name replaces the current
//! one, so a broken or half-written file never changes prices. Requests take
//! an `Arc` snapshot of the table and keep it from hold to settle, so a reload
//! in between does not change the version a request is settled with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{PriceFileErrors, PriceTable, MAX_PRICE_FILE_BYTES};
use crate::clock::Clock;
use crate::telemetry::metrics::{Metrics, ResultLabels};

/// Why a price file could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum PriceLoadError {
    #[error("cannot read price file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("price file {path} is {size} bytes; the limit is {MAX_PRICE_FILE_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{0}")]
    Invalid(PriceFileErrors),
    #[error(
        "{file}: routes name tools the file does not price: {missing:?} (add a [tools.NAME] table for each)"
    )]
    MissingTools { file: String, missing: Vec<String> },
}

/// What the admin API shows about the table in force and the last reload.
#[derive(Debug, Clone, Serialize)]
pub struct PriceStatus {
    pub file: String,
    pub version: String,
    pub label: String,
    pub content_hash: String,
    /// The file's `as_of` date and its age in whole days (none without one).
    pub as_of: Option<chrono::NaiveDate>,
    pub age_days: Option<i64>,
    /// The table-wide markup in percent (`[markup] percent`; "0" without
    /// one). Models and tools may set their own.
    pub markup_percent: String,
    pub loaded_at: DateTime<Utc>,
    pub last_reload_at: DateTime<Utc>,
    pub last_reload_error: Option<String>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

pub struct LivePrices {
    path: PathBuf,
    /// Tools that routes charge for; a table that lacks one is refused.
    required_tools: Vec<String>,
    current: ArcSwap<PriceTable>,
    status: Mutex<(DateTime<Utc>, DateTime<Utc>, Option<String>)>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    metrics: Arc<Metrics>,
}

impl LivePrices {
    /// Load the initial table; an error here stops the gateway from starting.
    pub fn load(
        path: &Path,
        required_tools: Vec<String>,
        now: DateTime<Utc>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PriceLoadError> {
        let table = read_table(path, &required_tools)?;
        metrics.set_price_version(table.version());
        Ok(LivePrices {
            path: path.to_owned(),
            required_tools,
            current: ArcSwap::from_pointee(table),
            status: Mutex::new((now, now, None)),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            metrics,
        })
    }

    /// The table in force. Cheap: no lock, one reference-count increment.
    pub fn current(&self) -> Arc<PriceTable> {
        self.current.load_full()
    }

    /// Re-read the file and swap the new table in if it is valid. On error
    /// the old table stays in force and the error is kept for the status.
    pub fn reload(
        &self,
        now: DateTime<Utc>,
        trigger: &'static str,
    ) -> Result<Arc<PriceTable>, PriceLoadError> {
        match read_table(&self.path, &self.required_tools) {
            Ok(table) => {
                let old = self.current();
                let changed = old.version() != table.version();
                let table = Arc::new(table);
                if changed {
                    self.current.store(table.clone());
                    self.metrics.set_price_version(table.version());
                }
                let mut status = self.status.lock();
                if changed {
                    status.0 = now;
                }
                status.1 = now;
                status.2 = None;
                drop(status);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.price_reloads.get_or_create(&ResultLabels { result: "ok" }).inc();
                tracing::info!(trigger, version = %table.version(), changed, "price table reloaded");
                Ok(if changed { table } else { old })
            }
            Err(error) => {
                let mut status = self.status.lock();
                status.1 = now;
                status.2 = Some(error.to_string());
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.price_reloads.get_or_create(&ResultLabels { result: "failed" }).inc();
                tracing::error!(trigger, %error, "price table reload failed; the previous table stays in force");
                Err(error)
            }
        }
    }

    pub fn status(&self, now: DateTime<Utc>) -> PriceStatus {
        let table = self.current();
        let as_of = table.version().as_of;
        let (loaded_at, last_reload_at, last_reload_error) = self.status.lock().clone();
        PriceStatus {
            file: self.path.display().to_string(),
            version: table.version().to_string(),
            label: table.version().label.clone(),
            content_hash: table.version().content_hash.clone(),
            as_of,
            age_days: as_of.map(|date| (now.date_naive() - date).num_days()),
            markup_percent: table.markup().percent().to_string(),
            loaded_at,
            last_reload_at,
            last_reload_error,
            reloads_ok: self.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.reloads_failed.load(Ordering::Relaxed),
        }
    }

    /// Watch the file and reload when it changes. Polls its metadata every
    /// `interval` and reloads only once a change has stayed the same for one
    /// whole interval, so a file still being written is not read half-way.
    /// Polling (rather than inotify) follows editors that write a temporary
    /// file and rename it over the original, and works on any filesystem.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) {
        let mut seen = fingerprint(&self.path);
        let mut pending: Option<Fingerprint> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
            let now_print = fingerprint(&self.path);
            if now_print == seen {
                pending = None;
                continue;
            }
            if pending.as_ref() == Some(&now_print) {
                // Stable for a whole interval: the write is finished.
                let _ = self.reload(clock.now(), "file change");
                seen = now_print;
                pending = None;
            } else {
                pending = Some(now_print);
            }
        }
    }
}

/// What changes when a file is rewritten or replaced.
type Fingerprint = Option<(SystemTime, u64, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

fn read_table(path: &Path, required_tools: &[String]) -> Result<PriceTable, PriceLoadError> {
    let size = std::fs::metadata(path)
        .map_err(|source| PriceLoadError::Read { path: path.to_owned(), source })?
        .len();
    if size > MAX_PRICE_FILE_BYTES as u64 {
        return Err(PriceLoadError::TooLarge { path: path.to_owned(), size });
    }
    let text = std::fs::read_to_string(path)
        .map_err(|source| PriceLoadError::Read { path: path.to_owned(), source })?;
    let file = path.display().to_string();
    let table = PriceTable::parse(&file, &text).map_err(PriceLoadError::Invalid)?;
    let missing: Vec<String> = required_tools.iter().filter(|t| !table.has_tool(t)).cloned().collect();
    if !missing.is_empty() {
        return Err(PriceLoadError::MissingTools { file, missing });
    }
    Ok(table)
}
