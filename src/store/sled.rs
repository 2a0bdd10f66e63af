//! The sled backend: one tree of segments (see [`super::codec`]), each
//! holding records of one batch in number order, and a meta tree holding
//! the format version.
//!
//! A segment's key is `running_max_seq ‖ segment_number` (both big-endian):
//! the highest sequence number stored so far, including this segment, then a
//! counter. Both only grow, so sled's key order is number order (replay
//! order), and the first segment whose running maximum exceeds `n` is where
//! records after `n` begin (paging). A record that comes after higher
//! numbers were stored (its thread stalled) is merged into the segment
//! where its number belongs, so key order stays number order. Stores of the
//! first format (one JSON record per key, keyed by its sequence number) open
//! and keep working: their 8-byte keys sort before every later segment.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::ledger::journal::Record;
use crate::store::codec::{self, CodecError};
use crate::store::watermark::{Position, Watermark, WatermarkFile};
use crate::store::{Store, StoreError};

/// Written to the meta tree; bump when the layout changes.
const FORMAT: &str = "creditgate-ledger-2";
/// Formats this build reads (and upgrades by writing segments after them).
const READABLE: [&str; 2] = ["creditgate-ledger-1", FORMAT];
/// A segment closes once it holds this many bytes (about 25 debits). sled
/// keeps up to 17 values in a leaf and writes a leaf larger than a quarter
/// of its 512 KiB log segment to a file of its own, one file per write:
/// small segments keep leaves under that.
const SEGMENT_BYTES: usize = 6 * 1024;

/// Records in a sled database.
#[derive(Debug, Clone)]
pub struct SledStore {
    dir: PathBuf,
    /// `None` only while [`Store::reopen`] swaps a failed database for a
    /// fresh one (sled keeps its first I/O error for good).
    open: Arc<RwLock<Option<Open>>>,
    /// Where the next segment goes; only the writer appends.
    tail: Arc<Mutex<Tail>>,
    /// The store's end at the last successful flush.
    durable: Arc<Mutex<Position>>,
    /// The watermark as last read or written, and its file once opened.
    watermark: Arc<Mutex<(Watermark, Option<WatermarkFile>)>>,
    /// Held across a sync and the flag it may set, so a failed sync by the
    /// prune is seen by the writer's next flush.
    sync_lock: Arc<Mutex<()>>,
    /// A flush failed since the last reopen: what the file seems to hold
    /// past the durable position may be only in the page cache (a failed
    /// writeback can leave its pages clean), so a reopen trusts none of it.
    flush_failed: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Clone)]
struct Open {
    db: ::sled::Db,
    records: ::sled::Tree,
    /// sled's data file, synced after each flush (see `flushed_to_disk`).
    file: Arc<std::fs::File>,
}

#[derive(Debug, Default)]
struct Tail {
    running_max: u64,
    next_segment: u64,
    /// Reused between appends.
    buffer: Vec<u8>,
}

impl Tail {
    fn position(&self) -> Position {
        (self.running_max, self.next_segment)
    }
}

/// Meta key: records up to this sequence number (big-endian) may be pruned.
const PRUNED_THROUGH: &str = "pruned_through";
/// Stored values removed per batch (and flush) while pruning.
const PRUNE_BATCH: usize = 4_096;

impl SledStore {
    fn meta(&self) -> Result<::sled::Tree, StoreError> {
        let db = self.open.read().as_ref().map(|open| open.db.clone()).ok_or(StoreError::Reopening)?;
        Ok(db.open_tree("meta")?)
    }

    /// Opens or creates the store in `dir`. sled's background flusher is
    /// off: durability comes only from [`Store::flush`], which the
    /// group-commit writer calls on its own schedule.
    ///
    /// Refuses a damaged store: one sled cannot read, and one that ends
    /// before its durable watermark (acknowledged records were lost).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        crate::store::compact::finish_interrupted(dir)?;
        let (open, tail) = open_checked(dir)?;
        let watermark = Watermark::load(dir)?;
        if let Some(mark) = watermark {
            if tail.position() < mark.acknowledged_at {
                return Err(StoreError::BehindWatermark {
                    found_seq: tail.running_max,
                    acknowledged_seq: mark.acknowledged_seq,
                    path: Watermark::path(dir),
                });
            }
        }
        let durable = tail.position();
        Ok(SledStore {
            dir: dir.to_owned(),
            open: Arc::new(RwLock::new(Some(open))),
            tail: Arc::new(Mutex::new(tail)),
            durable: Arc::new(Mutex::new(durable)),
            watermark: Arc::new(Mutex::new((watermark.unwrap_or_default(), None))),
            sync_lock: Arc::default(),
            flush_failed: Arc::default(),
        })
    }

    /// sled's flush writes its buffers with `sync_file_range` only (its
    /// periodic fsync is off here), which neither commits the file's
    /// metadata (the blocks a write filled) nor empties the disk's write
    /// cache: the records would survive a crash of the process but not of
    /// the machine. An `fdatasync` after it does both.
    fn flushed_to_disk(&self) -> Result<(), StoreError> {
        let (db, file) = self
            .open
            .read()
            .as_ref()
            .map(|open| (open.db.clone(), Arc::clone(&open.file)))
            .ok_or(StoreError::Reopening)?;
        let _one_at_a_time = self.sync_lock.lock();
        let synced = db
            .flush()
            .map_err(StoreError::from)
            .and_then(|_| file.sync_data().map_err(|error| StoreError::Sled(::sled::Error::Io(error))));
        if synced.is_err() {
            self.flush_failed.store(true, std::sync::atomic::Ordering::Release);
        }
        synced
    }

    /// The records tree, or an error while the database is being reopened.
    fn tree(&self) -> Result<::sled::Tree, StoreError> {
        self.open.read().as_ref().map(|open| open.records.clone()).ok_or(StoreError::Reopening)
    }

    /// Appends records in the order given, as stores written before the
    /// writer ordered records may hold them (for tests of reading those).
    #[cfg(test)]
    pub(crate) fn append_as_given(&self, records: &[Record]) -> Result<(), StoreError> {
        let tree = self.tree()?;
        write_segments(&tree, &mut self.tail.lock(), records, ::sled::Batch::default(), true)
    }
}

/// Opens the database and finds its tail. sled panics on some damaged files
/// (a truncated log under a snapshot that points past its end) instead of
/// returning an error: the panic is caught here and reported as corruption.
fn open_checked(dir: &Path) -> Result<(Open, Tail), StoreError> {
    remove_unfinished_snapshots(dir)?;
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<_, StoreError> {
        let db = open_db(dir)?;
        check_format(&db)?;
        let records = db.open_tree("records")?;
        let tail = find_tail(&records)?;
        // The file sled writes everything to, and its directory entry.
        let file = std::fs::File::open(dir.join("db"))
            .map_err(|error| StoreError::Sled(::sled::Error::Io(error)))?;
        std::fs::File::open(dir)
            .and_then(|directory| directory.sync_all())
            .map_err(|error| StoreError::Sled(::sled::Error::Io(error)))?;
        Ok((Open { db, records, file: Arc::new(file) }, tail))
    }));
    opened.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(StoreError::Corrupt { reason: format!("sled cannot read {} ({message})", dir.display()) })
    })
}

/// sled writes a snapshot to `snap.<lsn>.generating` and renames it into
/// place once complete; one whose write failed (a full disk) stays behind,
/// and sled would then read it as the newest snapshot and call the store
/// corrupt. Such a file is never complete, so it goes before sled opens.
fn remove_unfinished_snapshots(dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(StoreError::Sled(::sled::Error::Io(error))),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a snapshot sled did not finish writing");
            std::fs::remove_file(entry.path()).map_err(|error| StoreError::Sled(::sled::Error::Io(error)))?;
        }
    }
    Ok(())
}

fn check_format(db: &::sled::Db) -> Result<(), StoreError> {
    let meta = db.open_tree("meta")?;
    match meta.get("format")? {
        Some(found) if !READABLE.iter().any(|known| found.as_ref() == known.as_bytes()) => {
            Err(StoreError::Format { found: String::from_utf8_lossy(&found).into_owned(), expected: FORMAT })
        }
        Some(found) if found.as_ref() == FORMAT.as_bytes() => Ok(()),
        _ => {
            meta.insert("format", FORMAT)?;
            db.flush()?;
            Ok(())
        }
    }
}

fn find_tail(records: &::sled::Tree) -> Result<Tail, StoreError> {
    Ok(match records.last()? {
        None => Tail::default(),
        Some((key, value)) => match segment_key(&key) {
            Some((running_max, segment)) => {
                Tail { running_max, next_segment: segment.saturating_add(1), buffer: Vec::new() }
            }
            None => {
                // A first-format record: its key is its sequence number.
                let seq = decode_all(&key, &value)?.iter().map(|r| r.seq).max().unwrap_or(0);
                Tail { running_max: seq, next_segment: 0, buffer: Vec::new() }
            }
        },
    })
}

/// `(running_max_seq, segment_number)` of a segment key; `None` for a
/// first-format key.
fn segment_key(key: &[u8]) -> Option<(u64, u64)> {
    let key = <[u8; 16]>::try_from(key).ok()?;
    let (max, segment) = key.split_at(8);
    Some((u64::from_be_bytes(max.try_into().ok()?), u64::from_be_bytes(segment.try_into().ok()?)))
}

fn decode_all(key: &[u8], value: &[u8]) -> Result<Vec<Record>, StoreError> {
    codec::decode_value(value).map_err(|error: CodecError| StoreError::Decode {
        seq: segment_key(key)
            .map(|(max, _)| max)
            .or_else(|| <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes))
            .unwrap_or(0),
        reason: error.to_string(),
    })
}

/// sled's page cache. The ledger lives in memory and only reads the store
/// at start, for paging and for the historian's read-back of the newest
/// records, so sled's 1 GiB default would only hold pages nobody reads.
/// sled counts this by on-disk size and holds several times that in
/// memory: at 64 MiB the gateway grew to 157 MB over a 5-round soak, at
/// 8 MiB to 122 MB, with the same write-through throughput (bench/README).
const SLED_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// How long to wait for another holder of the directory's lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Open the sled database, waiting briefly if its file lock is still held.
pub(super) fn open_db(dir: &Path) -> Result<::sled::Db, StoreError> {
    let config = ::sled::Config::new().path(dir).flush_every_ms(None).cache_capacity(SLED_CACHE_BYTES);
    Ok(open_waiting_for_lock(&config)?)
}

/// Opens `config`'s database, waiting up to [`LOCK_WAIT`] if its file lock is
/// still held: a dropped `Db` releases the lock from sled's own threads a
/// moment later, so a quick reopen (a restart, `ledger verify` right after
/// a test) can race it.
pub(crate) fn open_waiting_for_lock(config: &::sled::Config) -> Result<::sled::Db, ::sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(::sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Store for SledStore {
    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        // The writer hands records in number order, except one that came
        // after the writer had written past its number (its thread stalled):
        // that one is put in its place, so the store's order stays number
        // order and a reader paging by number finds it where it belongs.
        if !records.is_sorted_by_key(|record| record.seq) {
            let mut sorted = records.to_vec();
            sorted.sort_by_key(|record| record.seq);
            return self.append(&sorted);
        }
        let tree = self.tree()?;
        let mut tail = self.tail.lock();
        // At or below the stored maximum: late, or written again by a retry.
        let late = records.partition_point(|record| record.seq <= tail.running_max);
        let (late, rest) = records.split_at(late);
        let mut batch = ::sled::Batch::default();
        if !late.is_empty() {
            merge_late(&tree, late, &mut tail, &mut batch)?;
        }
        write_segments(&tree, &mut tail, rest, batch, late.is_empty())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Only the writer appends, and it is the caller: the tail is still.
        let position = self.tail.lock().position();
        self.flushed_to_disk()?;
        // A failed sync elsewhere (the prune) may have taken the error that
        // was this flush's to see: the writer must recover all the same.
        if self.flush_failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Sled(::sled::Error::Io(std::io::Error::other(
                "an earlier sync of the ledger store failed",
            ))));
        }
        *self.durable.lock() = position;
        Ok(())
    }

    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        let tree = match self.tree() {
            Ok(tree) => tree,
            Err(error) => return Box::new(std::iter::once(Err(error))),
        };
        Box::new(tree.iter().flat_map(|item| {
            let decoded = item.map_err(StoreError::from).and_then(|(key, value)| decode_all(&key, &value));
            match decoded {
                Ok(records) => records.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(error) => vec![Err(error)],
            }
        }))
    }

    fn records_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        let tree = match self.tree() {
            Ok(tree) => tree,
            Err(error) => return Box::new(std::iter::once(Err(error))),
        };
        // Segments before the first whose running maximum exceeds `after`
        // hold nothing after it (see `read_after`).
        let start = after.saturating_add(1).to_be_bytes();
        Box::new(tree.range(start..).flat_map(move |item| {
            let decoded = item.map_err(StoreError::from).and_then(|(key, value)| decode_all(&key, &value));
            match decoded {
                Ok(records) => {
                    records.into_iter().filter(|record| record.seq > after).map(Ok).collect::<Vec<_>>()
                }
                Err(error) => vec![Err(error)],
            }
        }))
    }

    fn pruned_through(&self) -> u64 {
        self.meta()
            .and_then(|meta| Ok(meta.get(PRUNED_THROUGH)?))
            .ok()
            .flatten()
            .and_then(|value| <[u8; 8]>::try_from(value.as_ref()).ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Records the new floor durably first, then removes whole segments
    /// (every record in them at or below `seq`) in batches, flushing each.
    /// A crash part-way leaves some of them, which the next prune removes;
    /// a restart skips them anyway (the checkpoint covers them).
    fn prune_through(&self, seq: u64, pause: &dyn Fn()) -> Result<usize, StoreError> {
        let db = self.open.read().as_ref().map(|open| open.db.clone()).ok_or(StoreError::Reopening)?;
        let floor = self.pruned_through().max(seq);
        self.meta()?.insert(PRUNED_THROUGH, &floor.to_be_bytes())?;
        self.flushed_to_disk()?;
        let tree = self.tree()?;
        let last = tree.last()?.map(|(key, _)| key);
        let mut removed = 0;
        loop {
            let mut batch = ::sled::Batch::default();
            let mut taken = 0;
            for item in tree.iter() {
                let (key, _) = item?;
                let max = segment_key(&key)
                    .map(|(max, _)| max)
                    .or_else(|| <[u8; 8]>::try_from(key.as_ref()).ok().map(u64::from_be_bytes))
                    .unwrap_or(u64::MAX);
                if max > floor || Some(&key) == last.as_ref() || taken == PRUNE_BATCH {
                    break;
                }
                batch.remove(key);
                taken += 1;
            }
            if taken == 0 {
                return Ok(removed);
            }
            pause();
            tree.apply_batch(batch)?;
            db.flush()?;
            removed += taken;
        }
    }

    /// Segments before the first whose running maximum exceeds `after` hold
    /// nothing after it. From there, records come in number order (the
    /// writer orders them, and one stored late is put in its place); a
    /// store written before the writer ordered records may hold a few a
    /// segment out of place, so one segment past the page is read and the
    /// page sorted.
    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut found = Vec::new();
        let mut extra_segments = 0;
        for item in self.tree()?.range(start..) {
            if found.len() >= limit {
                if extra_segments == 1 {
                    break;
                }
                extra_segments += 1;
            }
            let (key, value) = item?;
            found.extend(decode_all(&key, &value)?.into_iter().filter(|record| record.seq > after));
        }
        found.sort_unstable_by_key(|record| record.seq);
        found.truncate(limit);
        Ok(found)
    }

    fn acknowledge(&self, reserved_seq: u64) -> Result<(), StoreError> {
        let position = *self.durable.lock();
        let mut guard = self.watermark.lock();
        let (mark, file) = &mut *guard;
        let next = Watermark {
            acknowledged_seq: position.0,
            acknowledged_at: position,
            reserved_seq: reserved_seq.max(mark.reserved_seq),
        };
        if next == *mark {
            return Ok(());
        }
        let file = match file {
            Some(file) => file,
            None => file.insert(WatermarkFile::open(&self.dir)?),
        };
        file.save(&next).map_err(StoreError::Watermark)?;
        *mark = next;
        Ok(())
    }

    fn reserved_seq(&self) -> u64 {
        self.watermark.lock().0.reserved_seq
    }

    /// sled keeps its first I/O error for good, so the database is closed
    /// (which releases its lock on the directory) and opened again; sled's
    /// recovery then keeps a prefix of what was written.
    fn reopen(&self) -> Result<HashSet<u64>, StoreError> {
        let failed = self.open.write().take();
        drop(failed);
        let (fresh, tail) = open_checked(&self.dir)?;
        let durable = *self.durable.lock();
        if tail.position() < durable {
            // The store lost what an earlier flush made durable (damage the
            // failure left behind): writing on would hide that for good. The
            // watermark records the position it lost, so a restart refuses
            // the store too.
            if let Err(error) = self.acknowledge(self.reserved_seq()) {
                tracing::error!(%error, "the watermark could not record the ledger store's loss");
            }
            return Err(StoreError::BehindWatermark {
                found_seq: tail.running_max,
                acknowledged_seq: durable.0,
                path: Watermark::path(&self.dir),
            });
        }
        let mut present = HashSet::new();
        // After a failed flush nothing past the durable position counts as
        // present: it is written again, and what the store does hold is
        // merged with it, not doubled (see `merge_late`).
        if !self.flush_failed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            for item in fresh.records.range(segment_key_bytes(durable)..) {
                let (key, value) = item?;
                present.extend(decode_all(&key, &value)?.iter().map(|record| record.seq));
            }
        }
        *self.tail.lock() = tail;
        *self.open.write() = Some(fresh);
        Ok(present)
    }
}

/// Writes `records` as new segments after the tail, in the order given,
/// together with what `batch` already holds (`alone`: nothing).
fn write_segments(
    tree: &::sled::Tree,
    tail: &mut Tail,
    mut rest: &[Record],
    mut batch: ::sled::Batch,
    alone: bool,
) -> Result<(), StoreError> {
    let mut segments = 0;
    while !rest.is_empty() {
        let taken = codec::encode_segment(rest, SEGMENT_BYTES, &mut tail.buffer)
            .map_err(|error| StoreError::Encode { seq: rest[0].seq, reason: error.to_string() })?;
        let (chunk, after) = rest.split_at(taken.clamp(1, rest.len()));
        rest = after;
        tail.running_max = chunk.iter().map(|record| record.seq).fold(tail.running_max, u64::max);
        let key = segment_key_bytes((tail.running_max, tail.next_segment));
        tail.next_segment += 1;
        segments += 1;
        if alone && segments == 1 && rest.is_empty() {
            // One segment, the usual flush window: a single insert is
            // atomic by itself and skips the batch's log marker and lock.
            tree.insert(key, tail.buffer.as_slice())?;
            return Ok(());
        }
        batch.insert(&key, tail.buffer.as_slice());
    }
    tree.apply_batch(batch)?;
    Ok(())
}

/// Puts records numbered below the stored tail (stored late) into the
/// segments where their numbers belong: the first whose running maximum
/// reaches the number (every segment before it holds only lower numbers).
/// The same record written again (a retry) is not doubled. Rare, so
/// reading and rewriting a segment is fine.
fn merge_late(
    tree: &::sled::Tree,
    late: &[Record],
    tail: &mut Tail,
    batch: &mut ::sled::Batch,
) -> Result<(), StoreError> {
    let mut targets: std::collections::BTreeMap<::sled::IVec, Vec<Record>> = Default::default();
    for record in late {
        let segment = match tree.range(segment_key_bytes((record.seq, 0))..).next().transpose()? {
            Some((key, value)) => match targets.entry(key) {
                std::collections::btree_map::Entry::Occupied(found) => found.into_mut(),
                std::collections::btree_map::Entry::Vacant(empty) => {
                    let records = decode_all(empty.key(), &value)?;
                    empty.insert(records)
                }
            },
            // Nothing stored reaches it (cannot happen below the tail): a
            // segment of its own at the end.
            None => {
                let key = ::sled::IVec::from(&segment_key_bytes((tail.running_max, tail.next_segment)));
                tail.next_segment += 1;
                targets.entry(key).or_default()
            }
        };
        let at = segment.partition_point(|held| held.seq < record.seq);
        match segment.get(at) {
            // Written again (a retry after a failed flush): already there.
            Some(held) if held == record => {}
            Some(held) if held.seq == record.seq => {
                // Two records under one number is a bug; keep both, so
                // `ledger verify` and replay see it rather than lose one.
                tracing::error!(seq = record.seq, "a different record under a stored number; both kept");
                segment.insert(at + 1, record.clone());
            }
            _ => segment.insert(at, record.clone()),
        }
    }
    for (key, records) in targets {
        codec::encode_segment(&records, usize::MAX, &mut tail.buffer)
            .map_err(|error| StoreError::Encode { seq: records[0].seq, reason: error.to_string() })?;
        batch.insert(key, tail.buffer.as_slice());
    }
    Ok(())
}

/// The key of the segment at `position`.
fn segment_key_bytes((running_max, segment): Position) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&running_max.to_be_bytes());
    key[8..].copy_from_slice(&segment.to_be_bytes());
    key
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::SledStore;
    use crate::store::{Store, StoreError};

    #[test]
    fn a_reopen_that_finds_flushed_records_gone_is_refused() {
        // Proves the writer's recovery cannot write on over a loss: a store
        // that, reopened after a failure, ends before what an earlier flush
        // made durable is refused (BehindWatermark), where before its new
        // records were written after the gap and the watermark moved past
        // it, so no later start could tell.
        let numbered = crate::store::tests::numbered_records();
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        for seq in 1..=40 {
            store.append(&[numbered(seq)]).unwrap();
        }
        store.flush().unwrap();
        assert!(store.reopen().unwrap().is_empty(), "nothing lost, nothing after the flush");
        // Damage: the newest segments vanish behind the store's back.
        {
            let tree = store.tree().unwrap();
            for _ in 0..3 {
                let (key, _) = tree.last().unwrap().unwrap();
                tree.remove(key).unwrap();
            }
            // Removals reach the file; sled's lock goes with the last handle.
            store.flushed_to_disk().unwrap();
        }
        let error = store.reopen().unwrap_err();
        assert!(
            matches!(error, StoreError::BehindWatermark { found_seq: 37, acknowledged_seq: 40, .. }),
            "{error}"
        );
        drop(store);
        let error = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(error, StoreError::BehindWatermark { .. }), "a restart refuses it too: {error}");
    }

    #[test]
    fn after_a_failed_flush_a_reopen_trusts_nothing_past_the_last_good_one() {
        // Proves records the file seems to hold after a failed flush (maybe
        // only in the page cache) are written again, and once, not doubled.
        let numbered = crate::store::tests::numbered_records();
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let first: Vec<_> = (1..=40).map(&numbered).collect();
        store.append(&first).unwrap();
        store.flush().unwrap();
        let next: Vec<_> = (41..=45).map(&numbered).collect();
        store.append(&next).unwrap();
        assert_eq!(store.reopen().unwrap().len(), 5, "a reopen after no failure trusts what it finds");
        store.flush_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.flush().is_err(), "the writer is told");
        assert!(store.reopen().unwrap().is_empty(), "nothing past the last good flush is trusted");
        store.append(&next).unwrap();
        store.flush().unwrap();
        let stored: Vec<u64> = store.records().map(|r| r.unwrap().seq).collect();
        assert_eq!(stored, (1..=45).collect::<Vec<u64>>(), "written again, not doubled");
    }
}
