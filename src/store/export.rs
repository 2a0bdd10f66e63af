//! Export files: old records moved out of the hot store, one file per day.
//!
//! # Format (`creditgate-ledger-export-1`)
//!
//! For each UTC day `D` an export directory holds two files:
//!
//! - `ledger-D.jsonl.gz` — gzip-compressed JSON Lines. The first line is a
//!   header object: `{"format": "creditgate-ledger-export-1", "day": "D",
//!   "describes": "..."}`. Every following line is one ledger record exactly
//!   as the store keeps it: `{"seq": N, "body": {KIND: {...}}}` where `KIND`
//!   is `org`, `user`, `app`, `key` (a new version of that entity) or
//!   `entry` (a balance change), amounts as exact decimal strings. Records
//!   are in sequence order.
//! - `ledger-D.manifest.json` — what the file must contain: `format`,
//!   `day`, `file`, `first_seq`, `last_seq`, `records`, `entries`, `bytes`
//!   and `sha256` of the compressed file, and the sums of `granted`,
//!   `debited` and `written_off` (decimal strings) in total and per wallet
//!   (`pool:ORG` / `lite:USER`), with each wallet's last `balance_after`.
//!   A day's `written_off` is net of write-offs taken back for late debits
//!   (`write_off_reversed` entries), so it can be negative.
//!
//! A record belongs to the day of the newest entry at or before it in
//! sequence order (entity records carry no time; records before the first
//! entry go with it), so each day is a contiguous range of sequence numbers
//! and files never overlap. Only whole days are written: a day is exported
//! once every record of it is known.
//!
//! Each file is written to a temporary name, fsynced, renamed into place, and
//! the directory fsynced, manifest last: a day whose manifest exists is
//! complete. Writing the same day again (after a crash between export and
//! prune) produces the same bytes.

use std::collections::BTreeMap;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use flate2::write::GzEncoder;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ledger::journal::{Record, RecordBody};
use crate::ledger::Totals;
use crate::store::checkpoint::sync_dir;
use crate::store::StoreError;

/// The format and its version, in every header line and manifest.
pub const FORMAT: &str = "creditgate-ledger-export-1";
const DESCRIBES: &str = "one ledger record per following line, in sequence order: {seq, body: {org|user|app|key|entry: ...}}; amounts are exact decimal strings; see the manifest beside this file for counts, sums and the sha256 of this file";

/// Why an export could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A day file exists with other records; it is never overwritten.
    #[error("{path} already exists and differs: {reason}; move it aside to export that day again")]
    Conflict {
        /// The existing file.
        path: PathBuf,
        /// How it differs.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_owned();
    move |source| ExportError::Io { path, source }
}

/// Sums of one wallet (or all) in a day file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletSums {
    /// Grants, purchases and adjustments (signed).
    pub granted: Decimal,
    /// Debits.
    pub debited: Decimal,
    /// Write-offs.
    pub written_off: Decimal,
    /// Entries of the wallet in the file.
    pub entries: u64,
    /// The wallet's balance after its last entry in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_balance_after: Option<Decimal>,
}

impl WalletSums {
    fn add(&mut self, kind: &crate::ledger::entry::EntryKind, amount: Decimal) {
        let mut totals = Totals::default();
        totals.count(kind, amount);
        self.granted += totals.granted;
        self.debited += totals.debited;
        self.written_off += totals.written_off;
        self.entries += 1;
    }
}

/// What a day file must contain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The UTC day.
    pub day: NaiveDate,
    /// The data file's name, beside the manifest.
    pub file: String,
    /// First and last sequence number in the file.
    pub first_seq: u64,
    /// See `first_seq`.
    pub last_seq: u64,
    /// Records in the file (after the header line).
    pub records: u64,
    /// Of which ledger entries.
    pub entries: u64,
    /// Size of the compressed file.
    pub bytes: u64,
    /// SHA-256 of the compressed file, hex.
    pub sha256: String,
    /// Sums over every entry in the file.
    pub total: WalletSums,
    /// Sums per wallet.
    pub wallets: BTreeMap<String, WalletSums>,
}

/// The name of the data file of `day`.
pub fn file_name(day: NaiveDate) -> String {
    format!("ledger-{day}.jsonl.gz")
}

fn manifest_name(day: NaiveDate) -> String {
    format!("ledger-{day}.manifest.json")
}

/// Which days to write.
#[derive(Clone, Copy, Debug)]
pub struct ExportPlan {
    /// Records up to this one are not read (already pruned or exported).
    pub after: u64,
    /// Records above this one are not exported; a day reaching past it is
    /// incomplete and left for later.
    pub through: u64,
    /// Only days before this one (whole days older than the retention).
    pub before: NaiveDate,
    /// Days before this one are read (to place records) but not written.
    pub from: Option<NaiveDate>,
}

/// Counts and checksums a file's bytes as they are written.
struct Hashing {
    file: std::fs::File,
    sha: Sha256,
    bytes: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.file.write(buf)?;
        self.sha.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// One day being written.
struct DayFile {
    day: NaiveDate,
    temp: PathBuf,
    out: Option<GzEncoder<Hashing>>,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    total: WalletSums,
    wallets: BTreeMap<String, WalletSums>,
    /// Whether the test pause ran for this day.
    paused: bool,
}

impl DayFile {
    fn open(dir: &Path, day: NaiveDate, write: bool) -> Result<DayFile, ExportError> {
        let temp = dir.join(format!(".{}.tmp", file_name(day)));
        let out = if write {
            let file = std::fs::File::create(&temp).map_err(io(&temp))?;
            let mut out =
                GzEncoder::new(Hashing { file, sha: Sha256::new(), bytes: 0 }, flate2::Compression::fast());
            let header = serde_json::json!({"format": FORMAT, "day": day, "describes": DESCRIBES});
            writeln!(out, "{header}").map_err(io(&temp))?;
            Some(out)
        } else {
            None
        };
        Ok(DayFile {
            day,
            temp,
            out,
            first_seq: 0,
            last_seq: 0,
            records: 0,
            total: WalletSums::default(),
            wallets: BTreeMap::new(),
            paused: false,
        })
    }

    fn push(&mut self, record: &Record) -> Result<(), ExportError> {
        let Some(out) = &mut self.out else {
            return Ok(());
        };
        // A record is plain data: serializing it cannot fail.
        let line = serde_json::to_string(record).unwrap_or_default();
        writeln!(out, "{line}").map_err(io(&self.temp))?;
        if self.records == 0 {
            self.first_seq = record.seq;
        }
        self.records += 1;
        self.last_seq = record.seq;
        if let RecordBody::Entry(entry) = &record.body {
            self.total.add(&entry.kind, entry.amount);
            let wallet = self.wallets.entry(entry.wallet.to_string()).or_default();
            wallet.add(&entry.kind, entry.amount);
            wallet.last_balance_after = Some(entry.balance_after);
        }
        Ok(())
    }

    /// Makes the file and then its manifest durable under their names.
    fn finish(self, dir: &Path) -> Result<Option<Manifest>, ExportError> {
        let Some(out) = self.out else {
            return Ok(None);
        };
        let hashing = out.finish().map_err(io(&self.temp))?;
        hashing.file.sync_all().map_err(io(&self.temp))?;
        let path = dir.join(file_name(self.day));
        // Files are append-only: the same day is written again only with
        // the same records (a retry after a crash between export and prune).
        let existing = std::fs::read(dir.join(manifest_name(self.day)))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok());
        if let Some(existing) =
            existing.filter(|m| (m.first_seq, m.last_seq) != (self.first_seq, self.last_seq))
        {
            let _ = std::fs::remove_file(&self.temp);
            return Err(ExportError::Conflict {
                path,
                reason: format!(
                    "it holds records {}..={}, this export {}..={}",
                    existing.first_seq, existing.last_seq, self.first_seq, self.last_seq
                ),
            });
        }
        std::fs::rename(&self.temp, &path).map_err(io(&path))?;
        let manifest = Manifest {
            format: FORMAT.into(),
            day: self.day,
            file: file_name(self.day),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            records: self.records,
            entries: self.total.entries,
            bytes: hashing.bytes,
            sha256: hex::encode(hashing.sha.finalize()),
            total: self.total,
            wallets: self.wallets,
        };
        write_durably(
            dir,
            &manifest_name(self.day),
            &serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
        )?;
        Ok(Some(manifest))
    }

    fn abandon(self) {
        drop(self.out);
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Writes `bytes` to `dir/name` through a temporary file, fsyncing file and
/// directory.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
    file.write_all(bytes).map_err(io(&temp))?;
    file.sync_all().map_err(io(&temp))?;
    let path = dir.join(name);
    std::fs::rename(&temp, &path).map_err(io(&path))?;
    sync_dir(dir).map_err(io(dir))
}

/// What an export run wrote.
#[derive(Debug, Default)]
pub struct Exported {
    /// The manifests of the days written.
    pub days: Vec<Manifest>,
    /// Every record up to this one is in a complete day (written, or before
    /// `from`); 0 when none is.
    pub complete_through: u64,
}

/// Writes the whole days `plan` selects from `records` (the store's records
/// after `plan.after`, in sequence order) into `dir`. `pause` runs after the
/// first record of each day file (a test hook).
pub fn export_days(
    records: impl Iterator<Item = Result<Record, StoreError>>,
    dir: &Path,
    plan: ExportPlan,
    pause: &dyn Fn(),
) -> Result<Exported, ExportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Days already exported from before `after` are closed: a record after
    // them whose time is a moment earlier (another wallet's clock) still
    // belongs after them, never in a second file for their day.
    let floor = read_manifests(dir)
        .into_iter()
        .filter(|manifest| manifest.last_seq <= plan.after)
        .filter_map(|manifest| manifest.day.succ_opt())
        .max()
        .unwrap_or(NaiveDate::MIN);
    let mut exported = Exported::default();
    let mut current: Option<DayFile> = None;
    // Entity records before the first entry, waiting for a day.
    let mut waiting: Vec<Record> = Vec::new();
    for record in records {
        let record = record?;
        if record.seq <= plan.after {
            continue;
        }
        let day = match &record.body {
            RecordBody::Entry(entry) => {
                let own = entry.at.date_naive().max(floor);
                Some(current.as_ref().map_or(own, |c| c.day.max(own)))
            }
            _ => None,
        };
        let past_limit = record.seq > plan.through;
        let starts_new_day = day.is_some_and(|day| current.as_ref().is_none_or(|c| day > c.day));
        if past_limit || day.is_some_and(|day| day >= plan.before) {
            // The day in progress is whole only if this record opens a later one.
            match current.take() {
                Some(day_file) if starts_new_day => finish_day(day_file, dir, &mut exported)?,
                Some(day_file) => day_file.abandon(),
                None => {}
            }
            return Ok(exported);
        }
        if let (Some(day), true) = (day, starts_new_day) {
            if let Some(done) = current.take() {
                finish_day(done, dir, &mut exported)?;
            }
            let mut opened = DayFile::open(dir, day, plan.from.is_none_or(|from| day >= from))?;
            for early in waiting.drain(..) {
                opened.last_seq = early.seq;
                opened.push(&early)?;
            }
            current = Some(opened);
        }
        match &mut current {
            Some(day_file) => {
                day_file.push(&record)?;
                day_file.last_seq = record.seq;
                if day_file.out.is_some() && !day_file.paused {
                    day_file.paused = true;
                    pause();
                }
            }
            None => waiting.push(record),
        }
    }
    // The store ends inside a day before `before`: that day is over.
    if let Some(day_file) = current.take() {
        finish_day(day_file, dir, &mut exported)?;
    }
    Ok(exported)
}

fn finish_day(day_file: DayFile, dir: &Path, exported: &mut Exported) -> Result<(), ExportError> {
    let last = day_file.last_seq;
    exported.days.extend(day_file.finish(dir)?);
    exported.complete_through = exported.complete_through.max(last);
    Ok(())
}

/// What reading an export directory found.
#[derive(Debug, Default)]
pub struct ExportCheck {
    /// Manifests read, in sequence order.
    pub manifests: Vec<Manifest>,
    /// Every way a file disagrees with its manifest (or is unreadable).
    pub problems: Vec<String>,
}

/// Reads every day in `dir` in sequence order, checking each file against
/// its manifest (size, sha256, format, counts, sums, order), and hands each
/// record to `each`.
pub fn read_exports(dir: &Path, mut each: impl FnMut(Record)) -> Result<ExportCheck, ExportError> {
    let mut check = ExportCheck::default();
    let mut manifests = Vec::new();
    for (name, parsed) in manifest_files(dir).map_err(io(dir))? {
        match parsed {
            Ok(manifest) => manifests.push(manifest),
            Err(error) => check.problems.push(format!("{name}: {error}")),
        }
    }
    manifests.sort_by_key(|m| m.first_seq);
    let mut previous_last = 0;
    for manifest in manifests {
        if manifest.first_seq <= previous_last && previous_last > 0 {
            check.problems.push(format!("{}: overlaps the day before", manifest.file));
        }
        previous_last = manifest.last_seq;
        check.problems.extend(check_day(dir, &manifest, &mut each)?);
        check.manifests.push(manifest);
    }
    Ok(check)
}

/// Every manifest file in `dir` by name, parsed or with why not.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<(String, Result<Manifest, String>)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("ledger-") && name.ends_with(".manifest.json")) {
            continue;
        }
        let parsed = std::fs::read(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).map_err(|e| e.to_string()));
        found.push((name, parsed));
    }
    Ok(found)
}

/// The manifests in `dir` that parse (none when it does not exist).
fn read_manifests(dir: &Path) -> Vec<Manifest> {
    manifest_files(dir).unwrap_or_default().into_iter().filter_map(|(_, parsed)| parsed.ok()).collect()
}

/// Checks one day file against its manifest; returns the problems found.
fn check_day(
    dir: &Path,
    manifest: &Manifest,
    each: &mut impl FnMut(Record),
) -> Result<Vec<String>, ExportError> {
    let name = &manifest.file;
    let mut problems = Vec::new();
    if manifest.format != FORMAT {
        problems.push(format!("{name}: format {:?} is not {FORMAT}", manifest.format));
        return Ok(problems);
    }
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) => return Ok(vec![format!("{name}: {error}")]),
    };
    if bytes.len() as u64 != manifest.bytes || hex::encode(Sha256::digest(&bytes)) != manifest.sha256 {
        problems.push(format!("{name}: size or sha256 differs from the manifest"));
    }
    let mut text = String::new();
    if let Err(error) = flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_string(&mut text) {
        problems.push(format!("{name}: does not decompress: {error}"));
        return Ok(problems);
    }
    let mut lines = text.lines();
    let header_ok = lines
        .next()
        .and_then(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .is_some_and(|header| header["format"] == FORMAT);
    if !header_ok {
        problems.push(format!("{name}: the first line is not a {FORMAT} header"));
    }
    let mut total = WalletSums::default();
    let mut wallets: BTreeMap<String, WalletSums> = BTreeMap::new();
    let (mut records, mut first, mut last) = (0_u64, None, 0);
    for (number, line) in lines.enumerate() {
        let record: Record = match serde_json::from_str(line) {
            Ok(record) => record,
            Err(error) => {
                problems.push(format!("{name}: line {} does not parse: {error}", number + 2));
                continue;
            }
        };
        if record.seq <= last && records > 0 {
            problems.push(format!("{name}: record {} is out of order", record.seq));
        }
        first.get_or_insert(record.seq);
        last = record.seq;
        records += 1;
        if let RecordBody::Entry(entry) = &record.body {
            total.add(&entry.kind, entry.amount);
            let wallet = wallets.entry(entry.wallet.to_string()).or_default();
            wallet.add(&entry.kind, entry.amount);
            wallet.last_balance_after = Some(entry.balance_after);
        }
        each(record);
    }
    let counted = (first.unwrap_or(0), last, records, total.entries);
    let claimed = (manifest.first_seq, manifest.last_seq, manifest.records, manifest.entries);
    if counted != claimed {
        problems.push(format!(
            "{name}: (first, last, records, entries) are {counted:?}, manifest says {claimed:?}"
        ));
    }
    if total != manifest.total || wallets != manifest.wallets {
        problems.push(format!("{name}: sums differ from the manifest"));
    }
    Ok(problems)
}

/// The days already exported in `dir` (by manifest), for reports.
pub fn exported_days(dir: &Path) -> Vec<NaiveDate> {
    let mut days: Vec<NaiveDate> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_prefix("ledger-")?.strip_suffix(".manifest.json")?.parse().ok()
        })
        .collect();
    days.sort();
    days
}

/// `creditgate ledger export --from --to`: writes the whole days `from..=to`
/// still in the store at `ledger_dir` (records already pruned are in the
/// exports already) to `out`. A day not over at `now` is not written.
pub fn export_range(
    ledger_dir: &Path,
    out: &Path,
    from: NaiveDate,
    to: NaiveDate,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Manifest>, ExportError> {
    use crate::store::Store as _;
    let store = crate::store::SledStore::open(ledger_dir)?;
    let before = to.succ_opt().unwrap_or(NaiveDate::MAX).min(now.date_naive());
    let after = store.pruned_through();
    let plan = ExportPlan { after, through: u64::MAX, before, from: Some(from) };
    Ok(export_days(store.records_after(after), out, plan, &|| {})?.days)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono_tz::Tz;
    use rust_decimal_macros::dec;

    use super::*;
    use crate::ledger::entity::Plan;
    use crate::ledger::ids::{Owner, WalletId};
    use crate::ledger::limit::Limits;
    use crate::ledger::testkit::{at, details, key, ledger, org, purchase, request, term, user};
    use crate::ledger::SpendContext;

    /// Records of one org spending on three days.
    fn three_days() -> Vec<Record> {
        let (ledger, journal) = ledger();
        let first = at("2027-03-01T12:00:00Z");
        let org = org(&ledger, Tz::UTC, Some(term("2027-01-01", 1, dec!(100), 0, dec!(0))), first);
        let user = user(&ledger, org, Plan::Pro, dec!(0), first);
        let key = key(&ledger, org, Owner::User(user), Limits::NONE, first);
        ledger.purchase(purchase(org, dec!(5), "p"), first).unwrap();
        for day in 0..3 {
            let now = first + chrono::TimeDelta::days(day);
            for _ in 0..4 {
                let hold = ledger.hold(
                    WalletId::Pool(org),
                    request(),
                    dec!(1),
                    SpendContext { key, end_user: None },
                    now,
                );
                hold.unwrap().settle(dec!(0.25), details(), now).unwrap();
            }
        }
        journal.records()
    }

    fn plan(after: u64, before: &str) -> ExportPlan {
        ExportPlan { after, through: u64::MAX, before: before.parse().unwrap(), from: None }
    }

    #[test]
    fn days_are_whole_closed_and_never_rewritten_with_other_records() {
        // Proves only whole days before the cut are written, with manifests
        // that match; that a record after an exported day whose time is a
        // moment earlier joins the next day instead of reopening the old
        // one; and that a day file is never replaced by different records.
        let mut records = three_days();
        let dir = tempfile::tempdir().unwrap();
        let first =
            export_days(records.clone().into_iter().map(Ok), dir.path(), plan(0, "2027-03-02"), &|| {})
                .unwrap();
        assert_eq!(first.days.len(), 1, "only the first whole day: {:?}", first.days);
        let day_one = first.days[0].clone();
        assert_eq!((day_one.first_seq, day_one.entries), (1, 6), "entities go with the first day's entries");
        assert_eq!(first.complete_through, day_one.last_seq);
        // A day-two record stamped a moment before midnight of day one.
        let straggler =
            records.iter_mut().find(|r| r.seq > day_one.last_seq && matches!(r.body, RecordBody::Entry(_)));
        let Some(Record { body: RecordBody::Entry(entry), .. }) = straggler else {
            panic!("the fixture has no day-two entry to make a straggler of");
        };
        entry.at = at("2027-03-01T23:59:59Z");
        let second = export_days(
            records.clone().into_iter().map(Ok),
            dir.path(),
            plan(day_one.last_seq, "2027-03-03"),
            &|| {},
        )
        .unwrap();
        let days: Vec<String> = second.days.iter().map(|m| m.day.to_string()).collect();
        assert_eq!(days, ["2027-03-02"], "the straggler joins day two");
        let check = read_exports(dir.path(), |_| {}).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.manifests[0], day_one, "day one is untouched");
        // The same day again from another starting point is refused.
        let refused = export_days(
            records.into_iter().map(Ok),
            dir.path(),
            plan(day_one.last_seq + 1, "2027-03-03"),
            &|| {},
        );
        assert!(matches!(refused, Err(ExportError::Conflict { .. })), "{refused:?}");
    }
}
