//! The sled backend: one tree of records keyed by big-endian sequence
//! number (so sled's key order is replay order), values in JSON (amounts are
//! strings, never floats), and a meta tree holding the format version.

use std::path::Path;

use crate::ledger::journal::Record;
use crate::store::{Store, StoreError};

/// Written to the meta tree; bump when the record encoding changes.
const FORMAT: &str = "creditgate-ledger-1";

/// Records in a sled database.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: ::sled::Db,
    records: ::sled::Tree,
}

impl SledStore {
    /// Opens or creates the store in `dir`. sled's background flusher is
    /// off: durability comes only from [`Store::flush`], which the
    /// group-commit writer calls on its own schedule.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = open_db(dir)?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            Some(found) if found.as_ref() != FORMAT.as_bytes() => {
                return Err(StoreError::Format {
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: FORMAT,
                });
            }
            Some(_) => {}
            None => {
                meta.insert("format", FORMAT)?;
                db.flush()?;
            }
        }
        let records = db.open_tree("records")?;
        Ok(SledStore { db, records })
    }
}

/// How long to wait for another holder of the directory's lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Open the sled database, waiting briefly if its file lock is still held: a
/// dropped `Db` releases the lock from sled's own threads a moment later, so
/// a quick reopen (restart, `ledger verify` right after a test) can race it.
fn open_db(dir: &Path) -> Result<::sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match ::sled::Config::new().path(dir).flush_every_ms(None).open() {
            Err(::sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

fn decode(key: &[u8], value: &[u8]) -> Result<Record, StoreError> {
    let seq = <[u8; 8]>::try_from(key).map(u64::from_be_bytes).unwrap_or(0);
    serde_json::from_slice(value).map_err(|error| StoreError::Decode { seq, reason: error.to_string() })
}

impl Store for SledStore {
    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        let mut batch = ::sled::Batch::default();
        for record in records {
            let value = serde_json::to_vec(record)
                .map_err(|error| StoreError::Encode { seq: record.seq, reason: error.to_string() })?;
            batch.insert(&record.seq.to_be_bytes(), value);
        }
        self.records.apply_batch(batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        Box::new(self.records.iter().map(|item| {
            let (key, value) = item?;
            decode(&key, &value)
        }))
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        self.records
            .range(start..)
            .take(limit)
            .map(|item| {
                let (key, value) = item?;
                decode(&key, &value)
            })
            .collect()
    }
}
