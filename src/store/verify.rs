//! `verify_store`: the offline audit behind `creditgate ledger verify`.
//!
//! Two checks, the second only when given the export directory:
//!
//! 1. **Live records against the newest checkpoint.** The auditor starts
//!    each wallet from the checkpoint's sums and balance and checks every
//!    entry the store holds after it; the ledger is rebuilt the way a
//!    restart does (checkpoint, then replay) and compared with the auditor.
//!    With no checkpoint, this is the full replay from the first record.
//!    While the store still holds every record the checkpoint covers (none
//!    pruned), the checkpoint must also be the state those records make: a
//!    wrong one that adds up would pass the rest, which start from it.
//! 2. **The whole history across the cut.** Every export day file is checked
//!    against its manifest (size, sha256, counts, sums), and a second ledger
//!    is rebuilt from nothing: every exported record, then the store's
//!    records after them. Every wallet's balance must equal granted -
//!    debited - written_off over all time, and that ledger must agree with
//!    the one from the checkpoint, wallet by wallet.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::ledger::journal::{NullJournal, Record, RecordBody};
use crate::ledger::snapshot::LedgerSnapshot;
use crate::ledger::{Audit, AuditReport, Ledger, LedgerConfig, Mismatch, Replayer};
use crate::store::{checkpoint, export, SledStore, Store, StoreError};

/// What the audit of a data directory found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records read from the store.
    pub records: usize,
    /// The checkpoint the live check started from (0: none, full replay).
    pub checkpoint_seq: u64,
    /// Records up to this one were pruned from the store.
    pub pruned_through: u64,
    /// The auditor's findings: per-wallet balances recomputed from entries
    /// and every mismatch (entries that do not add up, and wallets whose
    /// replayed state differs from their entries).
    pub audit: AuditReport,
    /// With exports: the audit of the whole history from the first record.
    pub full_history: Option<FullHistory>,
}

/// The check across the cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FullHistory {
    /// Day files read.
    pub days: usize,
    /// Records read from them.
    pub exported_records: usize,
    /// The audit of every entry ever made.
    pub audit: AuditReport,
    /// Files that disagree with their manifests, and a history that does
    /// not reach the store's pruned records.
    pub problems: Vec<String>,
}

impl Report {
    /// True when the ledger is sound.
    pub fn is_clean(&self) -> bool {
        self.audit.is_clean()
            && self.full_history.as_ref().is_none_or(|full| full.audit.is_clean() && full.problems.is_empty())
    }
}

/// Audits the store at `dir` (see the module doc); with `exports`, the
/// whole history too. Needs the gateway stopped (sled allows one process per
/// directory). A store that cannot be read is an error; a ledger that does
/// not add up is a report with mismatches.
pub fn verify_store(dir: &Path, exports: Option<&Path>) -> Result<Report, StoreError> {
    let store = SledStore::open(dir)?;
    let (snapshot, _) = checkpoint::load_newest(&checkpoint::dir_of(dir))
        .map_err(|error| StoreError::Corrupt { reason: error.to_string() })?;
    let mut report = verify_from(&store, snapshot.as_ref())?;
    if let Some(exports) = exports {
        report.full_history = Some(verify_history(&store, exports, snapshot.as_ref())?);
    }
    Ok(report)
}

fn verify_from<S: Store>(store: &S, snapshot: Option<&LedgerSnapshot>) -> Result<Report, StoreError> {
    let covered = snapshot.map_or(0, |s| s.seq);
    let pruned_through = store.pruned_through();
    let mut audit = snapshot.map(Audit::starting_from).unwrap_or_default();
    let mut records = 0;
    let mut failure = None;
    let stream = store
        .records_after(covered)
        .map_while(|record| record.map_err(|error| failure = Some(error)).ok())
        .inspect(|record| {
            records += 1;
            if let RecordBody::Entry(entry) = &record.body {
                audit.add(entry);
            }
        });
    let replayed = Ledger::restore_from(LedgerConfig::default(), Arc::new(NullJournal), snapshot, stream);
    if let Some(error) = failure {
        return Err(error);
    }
    let mut audit = finish(replayed.as_ref().map_err(ToString::to_string), audit);
    if pruned_through > covered {
        audit.mismatches.push(problem(format!(
            "records up to {pruned_through} were pruned but the newest valid checkpoint covers only {covered}"
        )));
    }
    // The checkpoint is where both the replay and the auditor started: a
    // wrong one that adds up would pass them both. While the store still
    // holds every record it covers, it must be the state they make.
    if let (Some(snapshot), 0) = (snapshot, pruned_through) {
        if let Some(difference) = checkpoint_against_records(store, snapshot)? {
            audit.mismatches.push(problem(difference));
        }
    }
    Ok(Report { records, checkpoint_seq: covered, pruned_through, audit, full_history: None })
}

/// Rebuilds the ledger from the first record through `snapshot.seq` and
/// names the first part of the checkpoint that differs from it, if any.
fn checkpoint_against_records<S: Store>(
    store: &S,
    snapshot: &LedgerSnapshot,
) -> Result<Option<String>, StoreError> {
    let mut failure = None;
    let stream = store
        .records_after(0)
        .map_while(|record| record.map_err(|error| failure = Some(error)).ok())
        // Not `take_while`: a store written before the writer ordered its
        // records may hold a few a segment out of place.
        .filter(|record| record.seq <= snapshot.seq);
    let rebuilt = Ledger::restore_from(LedgerConfig::default(), Arc::new(NullJournal), None, stream);
    if let Some(error) = failure {
        return Err(error);
    }
    let mut rebuilt = match rebuilt {
        Ok(ledger) => ledger.snapshot(snapshot.seq),
        Err(error) => return Ok(Some(format!("the records the checkpoint covers do not replay: {error}"))),
    };
    // Lots that expired are remembered for a while (to restore one whose
    // write-off is reversed), and checkpoints from before they were kept
    // carry none, nor do those the historian built from one: no money.
    let mut snapshot = snapshot.clone();
    for wallet in rebuilt.wallets.iter_mut().chain(snapshot.wallets.iter_mut()) {
        wallet.expired.clear();
    }
    if rebuilt == snapshot {
        return Ok(None);
    }
    let part = if rebuilt.wallets != snapshot.wallets {
        let wallet = rebuilt
            .wallets
            .iter()
            .zip(&snapshot.wallets)
            .find(|(made, kept)| made != kept)
            .map_or_else(|| "their number".to_owned(), |(made, _)| format!("wallet {:?}", made.wallet));
        format!("its wallets ({wallet})")
    } else if rebuilt.keys != snapshot.keys {
        "its keys".to_owned()
    } else if (&rebuilt.orgs, &rebuilt.users, &rebuilt.apps)
        != (&snapshot.orgs, &snapshot.users, &snapshot.apps)
    {
        "its organizations, users or applications".to_owned()
    } else {
        "its idempotency keys".to_owned()
    };
    Ok(Some(format!(
        "the checkpoint at {} is not the state the records it covers make: {part} differ",
        snapshot.seq
    )))
}

fn finish(replayed: Result<&Ledger, String>, audit: Audit) -> AuditReport {
    match replayed {
        Ok(ledger) => ledger.compare_with(audit),
        Err(error) => {
            let mut report = audit.finish();
            report.mismatches.push(problem(format!("replay stopped: {error}")));
            report
        }
    }
}

fn problem(problem: String) -> Mismatch {
    Mismatch { wallet: None, entry: None, problem }
}

/// The whole history: exports, then the store after them; see the module doc.
fn verify_history<S: Store>(
    store: &S,
    exports: &Path,
    snapshot: Option<&LedgerSnapshot>,
) -> Result<FullHistory, StoreError> {
    let ledger = Ledger::new(LedgerConfig::default(), Arc::new(NullJournal));
    let mut replayer = Replayer::default();
    let mut audit = Audit::default();
    let mut replay_error: Option<String> = None;
    let mut exported_records = 0;
    let mut feed = |record: Record| {
        if let RecordBody::Entry(entry) = &record.body {
            audit.add(entry);
        }
        if replay_error.is_none() {
            if let Err(error) = replayer.apply(&ledger, record) {
                replay_error = Some(error.to_string());
            }
        }
    };
    let (days, mut problems, exported_through) = if exports.exists() {
        let check = export::read_exports(exports, |record| {
            exported_records += 1;
            feed(record);
        })
        .map_err(|error| StoreError::Corrupt { reason: error.to_string() })?;
        let through = check.manifests.iter().map(|m| m.last_seq).max().unwrap_or(0);
        (check.manifests.len(), check.problems, through)
    } else {
        (0, Vec::new(), 0)
    };
    let pruned = store.pruned_through();
    if pruned > exported_through {
        problems.push(format!(
            "records up to {pruned} were pruned but the exports in {} end at {exported_through}",
            exports.display()
        ));
    }
    for record in store.records_after(exported_through) {
        feed(record?);
    }
    let mut report = finish(replay_error.map_or(Ok(&ledger), Err), audit);
    if let (Some(snapshot), true) = (snapshot, report.is_clean()) {
        let from_checkpoint = Ledger::restore_from(
            LedgerConfig::default(),
            Arc::new(NullJournal),
            Some(snapshot),
            store.records_after(snapshot.seq).map_while(Result::ok),
        )
        .map_err(StoreError::from)?;
        if from_checkpoint.wallet_totals() != ledger.wallet_totals() {
            report.mismatches.push(problem(
                "the ledger rebuilt from the newest checkpoint differs from the one rebuilt from the whole history"
                    .into(),
            ));
        }
    }
    Ok(FullHistory { days, exported_records, audit: report, problems })
}
