//! `verify_store`: the offline audit behind `creditgate ledger verify`.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::ledger::journal::{NullJournal, RecordBody};
use crate::ledger::{Audit, AuditReport, Ledger, LedgerConfig, Mismatch};
use crate::store::{SledStore, Store, StoreError};

/// What the audit of a data directory found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records read.
    pub records: usize,
    /// The auditor's findings: per-wallet balances recomputed from entries
    /// and every mismatch (entries that do not add up, and wallets whose
    /// replayed state differs from their entries).
    pub audit: AuditReport,
}

impl Report {
    /// True when the ledger is sound.
    pub fn is_clean(&self) -> bool {
        self.audit.is_clean()
    }
}

/// Recomputes every wallet in the store at `dir` from its entries, replays
/// the whole ledger, and reports every mismatch. Needs the gateway stopped
/// (sled allows one process per directory). A store that cannot be read is an
/// error; a ledger that does not add up is a report with mismatches.
pub fn verify_store(dir: &Path) -> Result<Report, StoreError> {
    let store = SledStore::open(dir)?;
    verify(&store)
}

/// [`verify_store`] over any store.
pub fn verify<S: Store>(store: &S) -> Result<Report, StoreError> {
    let mut audit = Audit::default();
    let mut records = 0;
    let mut failure = None;
    let stream = store
        .records()
        .map_while(|record| record.map_err(|error| failure = Some(error)).ok())
        .inspect(|record| {
            records += 1;
            if let RecordBody::Entry(entry) = &record.body {
                audit.add(entry);
            }
        });
    let replayed = Ledger::restore(LedgerConfig::default(), Arc::new(NullJournal), stream);
    if let Some(error) = failure {
        return Err(error);
    }
    let report = match replayed {
        Ok(ledger) => ledger.compare_with(audit),
        Err(error) => {
            let mut report = audit.finish();
            report.mismatches.push(Mismatch {
                wallet: None,
                entry: None,
                problem: format!("replay stopped: {error}"),
            });
            report
        }
    };
    Ok(Report { records, audit: report })
}
