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
    /// Held from reading the file to storing its table: a reload that read
    /// the file before a newer one must not store its older table after.
    reloading: Mutex<()>,
    /// Run once, by the next reload, between reading the file and storing.
    #[cfg(test)]
    after_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
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
            reloading: Mutex::new(()),
            #[cfg(test)]
            after_read: Mutex::new(None),
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
        let _one_at_a_time = self.reloading.lock();
        let read = read_table(&self.path, &self.required_tools);
        #[cfg(test)]
        {
            let hook = self.after_read.lock().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        match read {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table_text(label: usize) -> String {
        let base =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prices.toml")).unwrap();
        base.replacen("label = \"2025-11\"", &format!("label = \"v{label}\""), 1)
    }

    fn label(prices: &LivePrices) -> usize {
        prices.current().version().label.trim_start_matches('v').parse().unwrap()
    }

    #[test]
    fn a_reload_that_read_an_older_file_does_not_store_it_after_a_newer_one() {
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.toml");
        std::fs::write(&path, table_text(0)).unwrap();
        let now = Utc::now();
        let prices =
            Arc::new(LivePrices::load(&path, Vec::new(), now, Arc::new(Metrics::new(false))).unwrap());
        std::fs::write(&path, table_text(1)).unwrap();
        // The first reload reads v1, then waits (at most 0.5 s) for a second
        // one, started once the file says v2, to finish.
        let (read_tx, read_rx) = channel();
        let (done_tx, done_rx) = channel::<()>();
        *prices.after_read.lock() = Some(Box::new(move || {
            read_tx.send(()).unwrap();
            let _ = done_rx.recv_timeout(Duration::from_millis(500));
        }));
        let first = std::thread::spawn({
            let prices = prices.clone();
            move || prices.reload(now, "first").map(|_| ())
        });
        read_rx.recv().unwrap();
        std::fs::write(&path, table_text(2)).unwrap();
        let second = std::thread::spawn({
            let prices = prices.clone();
            move || {
                let reloaded = prices.reload(now, "second").map(|_| ());
                let _ = done_tx.send(());
                reloaded
            }
        });
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        assert_eq!(label(&prices), 2, "the newer file's table is in force");
    }
}
