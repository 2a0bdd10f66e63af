//! The price table in force, swapped atomically on reload.
//!
//! This is the one part of `pricing` that touches the outside world: it reads
//! the price file. A reload parses and validates the whole file first; only a
//! valid table that prices every tool the routes name replaces the current
//! one, so a broken or half-written file never changes prices. Requests take
//! an `Arc` snapshot of the table and keep it from hold to settle, so a reload
//! in between does not change the version a request is settled with.
//!
//! A file cut short while it was written (a writer killed, a full disk, a
//! copy dropped) can still be valid TOML: cut at a line end, it drops the
//! prices and the `[markup]` that came after the cut, and an unset price is
//! free. So a reload that would leave unset a price the table in force sets
//! is refused; an operator who means it states the price (or removes the
//! entry). A copy of the file in force is kept in the data directory, so a
//! restart on a cut file is refused the same way.

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
use crate::config::RequiredTools;
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
    #[error(
        "{file}: prices per unit tools that a route serves without a units_header: {tools:?}; that \
         route would charge every call 0 units (set the route's units_header to the header the \
         upstream counts in, or price the tool per_call only)"
    )]
    UnitsNotCounted { file: String, tools: Vec<String> },
    #[error(
        "{file}: prices the table in force sets are missing (a file cut short while written?): {}; \
         state each as you mean it (\"0\" for free, the inherited price to inherit it), or remove \
         the whole entry{}",
        unset.join(", "),
        kept.as_ref().map(|kept| format!("; or delete {} to accept the file as it is", kept.display())).unwrap_or_default()
    )]
    PricesUnset { file: String, unset: Vec<String>, kept: Option<PathBuf> },
    #[error("cannot keep a copy of the price file in force at {path}: {source}")]
    Keep { path: PathBuf, source: std::io::Error },
    #[error("price file {path} changed while it was read; it is read again once it stays the same")]
    ChangedWhileRead { path: PathBuf },
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
    required_tools: RequiredTools,
    current: ArcSwap<PriceTable>,
    /// The text of the file the table in force was read from, to compare a
    /// new file with.
    text_in_force: Mutex<String>,
    /// Where a copy of that text is kept across restarts ([`LivePrices::keep_in`]).
    kept: Option<PathBuf>,
    /// The file as it was when loaded: what the watcher compares with
    /// first, so a change made between the load and the watcher's start is
    /// seen (before, the watcher took the file as it found it at its start
    /// to be the one in force).
    loaded_print: Fingerprint,
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
        required_tools: RequiredTools,
        now: DateTime<Utc>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PriceLoadError> {
        let (table, text, loaded_print) = read_table(path, &required_tools)?;
        metrics.set_price_version(table.version());
        Ok(LivePrices {
            path: path.to_owned(),
            required_tools,
            current: ArcSwap::from_pointee(table),
            text_in_force: Mutex::new(text),
            kept: None,
            loaded_print,
            reloading: Mutex::new(()),
            #[cfg(test)]
            after_read: Mutex::new(None),
            status: Mutex::new((now, now, None)),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            metrics,
        })
    }

    /// Keeps a copy of the file in force in `dir` from now on, and refuses
    /// the file just loaded if it leaves unset a price the copy kept from
    /// the last run sets (a file cut short, then a restart).
    pub fn keep_in(mut self, dir: &Path) -> Result<Self, PriceLoadError> {
        let kept = dir.join(KEPT_FILE);
        if let Ok(before) = std::fs::read_to_string(&kept) {
            let unset = unset_prices(&before, &self.text_in_force.lock());
            if !unset.is_empty() {
                let file = self.path.display().to_string();
                return Err(PriceLoadError::PricesUnset { file, unset, kept: Some(kept) });
            }
        }
        write_kept(&kept, &self.text_in_force.lock())
            .map_err(|source| PriceLoadError::Keep { path: kept.clone(), source })?;
        self.kept = Some(kept);
        Ok(self)
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
        let read = read_table(&self.path, &self.required_tools).and_then(|(table, text, _)| {
            let unset = unset_prices(&self.text_in_force.lock(), &text);
            if unset.is_empty() {
                Ok((table, text))
            } else {
                let file = self.path.display().to_string();
                Err(PriceLoadError::PricesUnset { file, unset, kept: None })
            }
        });
        #[cfg(test)]
        {
            let hook = self.after_read.lock().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        match read {
            Ok((table, text)) => {
                let old = self.current();
                let changed = old.version() != table.version();
                let table = Arc::new(table);
                if changed {
                    if let Some(kept) = &self.kept {
                        if let Err(error) = write_kept(kept, &text) {
                            tracing::warn!(%error, path = %kept.display(), "cannot keep a copy of the price file in force");
                        }
                    }
                    *self.text_in_force.lock() = text;
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
        let mut seen = self.loaded_print;
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

/// The copy of the price file in force, in the data directory.
const KEPT_FILE: &str = "prices-in-force.toml";

/// Writes the copy whole or not at all: a temporary file renamed over it.
fn write_kept(kept: &Path, text: &str) -> std::io::Result<()> {
    let temporary = kept.with_extension("toml.tmp");
    std::fs::write(&temporary, text)?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, kept)
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

/// The file's table, its text, and its fingerprint as read.
fn read_table(
    path: &Path,
    required_tools: &RequiredTools,
) -> Result<(PriceTable, String, Fingerprint), PriceLoadError> {
    let size = std::fs::metadata(path)
        .map_err(|source| PriceLoadError::Read { path: path.to_owned(), source })?
        .len();
    if size > MAX_PRICE_FILE_BYTES as u64 {
        return Err(PriceLoadError::TooLarge { path: path.to_owned(), size });
    }
    let before = fingerprint(path);
    let text = std::fs::read_to_string(path)
        .map_err(|source| PriceLoadError::Read { path: path.to_owned(), source })?;
    // A writer still at it (SIGHUP and the admin API do not wait for the
    // file to settle, as the watcher does).
    if fingerprint(path) != before {
        return Err(PriceLoadError::ChangedWhileRead { path: path.to_owned() });
    }
    let file = path.display().to_string();
    let table = PriceTable::parse(&file, &text).map_err(PriceLoadError::Invalid)?;
    let missing: Vec<String> = required_tools.names.iter().filter(|t| !table.has_tool(t)).cloned().collect();
    if !missing.is_empty() {
        return Err(PriceLoadError::MissingTools { file, missing });
    }
    let uncounted: Vec<String> =
        required_tools.without_units.iter().filter(|t| table.charges_per_unit(t)).cloned().collect();
    if !uncounted.is_empty() {
        return Err(PriceLoadError::UnitsNotCounted { file, tools: uncounted });
    }
    Ok((table, text, before))
}

/// The prices `old` sets that `new` leaves unset, in entries both have:
/// each `*_per_mtok`, `per_request`, `per_call` and `per_unit`, an entry's
/// `markup_percent` and the table's `[markup] percent`, unless it was "0";
/// a service tier's or the long context's multipliers (unset, a call served
/// at the tier, or past the size, is charged base prices); and a model's
/// `hidden_reasoning = true` (unset, a broken stream is charged what it
/// showed). Unset, each is free (or follows the input price). Removed entries are not listed: a model or
/// tool with no price is refused, not served free.
fn unset_prices(old: &str, new: &str) -> Vec<String> {
    const PRICES: [&str; 5] = ["per_request", "per_call", "per_unit", "markup_percent", "percent"];
    let Ok(changes) = super::diff::diff(old, new) else { return Vec::new() };
    changes
        .into_iter()
        .filter_map(|change| match change {
            // A price that was "0" is no lower unset, nor a flag that was false.
            super::diff::Change::Changed { kind, name, field, old: Some(old), new: None }
                if !old.parse::<rust_decimal::Decimal>().is_ok_and(|old| old.is_zero()) && old != "false" =>
            {
                let leaf = field.rsplit('.').next().unwrap_or(&field);
                let charges = leaf.ends_with("_per_mtok")
                    || PRICES.contains(&leaf)
                    || field.starts_with("service_tiers.")
                    || field.starts_with("long_context.")
                    || field == "hidden_reasoning";
                charges.then(|| format!("{kind} {name}: {field}"))
            }
            _ => None,
        })
        .collect()
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
    fn a_reload_that_unsets_a_tier_a_long_context_or_hidden_reasoning_is_listed() {
        let old = "label = \"a\"\n[models.m]\ninput_per_mtok = \"1\"\noutput_per_mtok = \"2\"\n\
                   default_max_output_tokens = 10\nhidden_reasoning = true\n\
                   service_tiers.priority = { input = \"1.7\", output = \"1.7\" }\n\
                   long_context = { above_input_tokens = 200000, input = \"2\", output = \"1.5\" }\n";
        let new = "label = \"b\"\n[models.m]\ninput_per_mtok = \"1\"\noutput_per_mtok = \"2\"\n\
                   default_max_output_tokens = 10\n";
        let unset = unset_prices(old, new);
        for field in ["service_tiers.priority.input", "long_context.input", "hidden_reasoning"] {
            assert!(unset.iter().any(|listed| listed.ends_with(field)), "{field}: {unset:?}");
        }
        // Lowering or keeping them is a price change, not a cut.
        assert!(unset_prices(old, &old.replace("1.7", "1.5")).is_empty());
    }

    #[tokio::test]
    async fn a_change_made_before_the_watcher_starts_is_put_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.toml");
        std::fs::write(&path, table_text(0)).unwrap();
        let prices = Arc::new(
            LivePrices::load(&path, RequiredTools::default(), Utc::now(), Arc::new(Metrics::new(false)))
                .unwrap(),
        );
        // Changed in place after the load, before the watcher's first look
        // (to another length, so coarse file times cannot hide it).
        std::fs::write(&path, table_text(10)).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let stop = CancellationToken::new();
        let watching = tokio::spawn(prices.clone().watch(Duration::from_millis(10), clock, stop.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while label(&prices) != 10 {
            assert!(std::time::Instant::now() < deadline, "the change was never put in force");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        watching.await.unwrap();
    }

    #[test]
    fn a_reload_that_read_an_older_file_does_not_store_it_after_a_newer_one() {
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.toml");
        std::fs::write(&path, table_text(0)).unwrap();
        let now = Utc::now();
        let prices = Arc::new(
            LivePrices::load(&path, RequiredTools::default(), now, Arc::new(Metrics::new(false))).unwrap(),
        );
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

    #[test]
    fn a_file_cut_short_at_a_line_end_does_not_unset_prices_in_force() {
        // Before, a file cut at a line end was put in force when it was
        // still valid TOML: the prices after the cut (an output price, the
        // `[markup]` at the end) were unset, so free.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.toml");
        let full = format!("{}\n[markup]\npercent = \"20\"\n", table_text(0));
        std::fs::write(&path, &full).unwrap();
        let now = Utc::now();
        let prices =
            LivePrices::load(&path, RequiredTools::default(), now, Arc::new(Metrics::new(false))).unwrap();
        let version = prices.current().version().clone();
        // Cut before the markup, then before mock-claude's output price.
        let before_markup = &full[..full.find("[markup]").unwrap()];
        let output = full.find("output_per_mtok = \"15\"").unwrap();
        let before_output = &full[..output];
        for (cut, missing) in [
            (before_markup.to_owned(), "table [markup]: percent"),
            (before_output.to_owned(), "model mock-claude: output_per_mtok"),
            (full.replacen("per_request = \"0.0001\"\n", "", 1), "model mock-gpt: per_request"),
        ] {
            std::fs::write(&path, &cut).unwrap();
            let error = prices.reload(now, "test").map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(missing), "{error}");
            assert_eq!(prices.current().version(), &version, "the table in force stays");
        }
        assert_eq!(prices.current().markup().percent().to_string(), "20");
        // Set free on purpose, and with the markup dropped as "0": put in force.
        let meant = full.replacen("output_per_mtok = \"15\"", "output_per_mtok = \"0\"", 1).replacen(
            "percent = \"20\"",
            "percent = \"0\"",
            1,
        );
        std::fs::write(&path, &meant).unwrap();
        prices.reload(now, "test").unwrap();
        assert_ne!(prices.current().version(), &version);
        // And from there a file without the `[markup]` that was "0" anyway.
        let version = prices.current().version().clone();
        let without = &meant[..meant.find("[markup]").unwrap()];
        std::fs::write(&path, without).unwrap();
        prices.reload(now, "test").unwrap();
        assert_ne!(prices.current().version(), &version, "a price that was 0 may go unset");
    }

    #[test]
    fn a_restart_on_a_file_cut_short_is_refused_by_the_copy_kept_in_the_data_directory() {
        // Before, only a live reload compared the file with the one in force:
        // a cut refused by the reload was put in force by the next restart.
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = (dir.path().join("prices.toml"), dir.path().join("data"));
        std::fs::create_dir_all(&data).unwrap();
        let full = format!("{}\n[markup]\npercent = \"20\"\n", table_text(0));
        std::fs::write(&path, &full).unwrap();
        let now = Utc::now();
        let load = || LivePrices::load(&path, RequiredTools::default(), now, Arc::new(Metrics::new(false)));
        let prices = load().unwrap().keep_in(&data).unwrap();
        // A reload in force is kept too.
        let raised = full.replacen("percent = \"20\"", "percent = \"25\"", 1);
        std::fs::write(&path, &raised).unwrap();
        prices.reload(now, "test").unwrap();
        drop(prices);
        std::fs::write(&path, &raised[..raised.find("[markup]").unwrap()]).unwrap();
        let error = load().unwrap().keep_in(&data).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("[markup]: percent") && error.contains("prices-in-force.toml"), "{error}");
        // The whole file starts; deleting the copy accepts the cut one on purpose.
        std::fs::write(&path, &raised).unwrap();
        assert_eq!(load().unwrap().keep_in(&data).unwrap().current().markup().percent().to_string(), "25");
        std::fs::write(&path, &raised[..raised.find("[markup]").unwrap()]).unwrap();
        std::fs::remove_file(data.join(KEPT_FILE)).unwrap();
        assert!(load().unwrap().keep_in(&data).unwrap().current().markup().is_none());
    }
}
