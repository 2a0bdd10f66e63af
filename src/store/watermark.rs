//! The durable watermark: a small checksummed file beside sled's own files
//! that says how far the store must reach and which sequence numbers were
//! already handed out.
//!
//! sled recovers its log up to the first damaged write, silently: a store
//! whose last bytes were lost opens without complaint and replays a shorter,
//! self-consistent ledger. The watermark is what notices. It is rewritten
//! after every flush that acknowledges an admin operation and at shutdown,
//! so on open the store must end at or after the position it names.
//!
//! The file holds two fixed-size slots written in turn, each with a counter
//! and a checksum, with one `fdatasync` per write (it sits on the path of
//! every acknowledged admin write, so it must cost no more than one sync).
//! A write torn by a crash damages only the slot being written; the other
//! holds the previous mark, which the next open uses.
//!
//! It also reserves sequence numbers ahead of use, so that numbers a crash
//! lost (records that never reached a flush) are never handed out again
//! after the restart: the next run starts above the reservation.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// The file's name inside the sled directory.
const FILE_NAME: &str = "creditgate.watermark";
/// First word of each slot; bump when the layout changes.
const MAGIC: &str = "creditgate-watermark-2";
/// Bytes per slot (the text is padded with spaces).
const SLOT_BYTES: usize = 160;

/// Where a segment sits in the store: `(running_max_seq, segments written)`.
/// Both parts only grow, so positions compare in append order.
pub type Position = (u64, u64);

/// What the file records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watermark {
    /// The highest sequence number a flush had covered when an admin
    /// operation (or shutdown) was acknowledged.
    pub acknowledged_seq: u64,
    /// The store's end at that flush; a store that ends before it lost
    /// acknowledged records.
    pub acknowledged_at: Position,
    /// No sequence number up to this one may be handed out again.
    pub reserved_seq: u64,
}

impl Watermark {
    /// The path of the watermark in the sled directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads the watermark; `None` when the store has none yet (a new store,
    /// or one written before watermarks existed).
    pub fn load(dir: &Path) -> Result<Option<Watermark>, StoreError> {
        Ok(Self::load_slots(dir)?.map(|(mark, _)| mark))
    }

    /// The newest valid slot and its counter.
    fn load_slots(dir: &Path) -> Result<Option<(Watermark, u64)>, StoreError> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(corrupt(&path, &format!("cannot be read: {error}"))),
        };
        let mut problems = Vec::new();
        let mut newest: Option<(Watermark, u64)> = None;
        for slot in bytes.chunks(SLOT_BYTES) {
            match Self::parse(&String::from_utf8_lossy(slot)) {
                Ok((mark, counter)) if newest.is_none_or(|(_, best)| counter > best) => {
                    newest = Some((mark, counter));
                }
                Ok(_) => {}
                Err(reason) => problems.push(reason),
            }
        }
        // Slots are written in turn from slot 1, so a slot 0 that is still
        // the hole the first write left means that write was the only one:
        // torn, it acknowledged nothing (`save` returns after its sync).
        // (Damage that zeroes slot 0 exactly and breaks slot 1 would read
        // the same: a risk taken for a crash at first start.)
        let only_the_first_write = bytes.iter().take(SLOT_BYTES).all(|&byte| byte == 0);
        match newest {
            Some(found) => Ok(Some(found)),
            None if only_the_first_write => {
                if !bytes.is_empty() {
                    tracing::warn!(path = %path.display(), "the watermark's first write was torn; nothing was acknowledged by it");
                }
                Ok(None)
            }
            None => Err(corrupt(&path, &problems.join("; "))),
        }
    }

    fn render(&self, counter: u64) -> Vec<u8> {
        let (running_max, segments) = self.acknowledged_at;
        let body = format!(
            "{MAGIC} counter={counter} acknowledged_seq={} position={running_max}:{segments} reserved_seq={}",
            self.acknowledged_seq, self.reserved_seq
        );
        let mut slot = format!("{body} sha256={}\n", checksum(&body)).into_bytes();
        slot.resize(SLOT_BYTES, b' ');
        slot
    }

    fn parse(text: &str) -> Result<(Watermark, u64), String> {
        let text = text.trim_end_matches(' ').trim_end_matches('\n');
        let (body, sum) = text.rsplit_once(" sha256=").ok_or("a slot has no checksum")?;
        if checksum(body) != sum {
            return Err("a slot's checksum does not match its contents".into());
        }
        let mut words = body.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(format!("a slot does not start with {MAGIC}"));
        }
        let mut field = |name: &str| {
            words
                .next()
                .and_then(|word| word.strip_prefix(name))
                .and_then(|word| word.strip_prefix('='))
                .ok_or(format!("field {name} is missing"))
        };
        let number = |text: &str| text.parse::<u64>().map_err(|_| format!("{text:?} is not a number"));
        let counter = number(field("counter")?)?;
        let acknowledged_seq = number(field("acknowledged_seq")?)?;
        let (running_max, segments) =
            field("position")?.split_once(':').ok_or("field position is not MAX:SEGMENTS")?;
        let acknowledged_at = (number(running_max)?, number(segments)?);
        let reserved_seq = number(field("reserved_seq")?)?;
        Ok((Watermark { acknowledged_seq, acknowledged_at, reserved_seq }, counter))
    }
}

/// The open watermark file, written slot by slot.
#[derive(Debug)]
pub struct WatermarkFile {
    file: std::fs::File,
    /// The counter of the last slot written.
    counter: u64,
}

impl WatermarkFile {
    /// Opens (or creates) the file in the sled directory `dir`.
    pub fn open(dir: &Path) -> Result<WatermarkFile, StoreError> {
        let counter = Watermark::load_slots(dir)?.map_or(0, |(_, counter)| counter);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(Watermark::path(dir))
            .map_err(StoreError::Watermark)?;
        Ok(WatermarkFile { file, counter })
    }

    /// Writes `mark` to the slot after the last one written, durably.
    pub fn save(&mut self, mark: &Watermark) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let counter = self.counter + 1;
        let offset = u64::try_from(SLOT_BYTES).unwrap_or(u64::MAX) * (counter % 2);
        self.file.write_all_at(&mark.render(counter), offset)?;
        self.file.sync_data()?;
        self.counter = counter;
        Ok(())
    }
}

/// The first 16 hex digits of the SHA-256 of `body`.
fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..8])
}

fn corrupt(path: &Path, reason: &str) -> StoreError {
    StoreError::Corrupt {
        reason: format!(
            "the durable watermark {} is damaged ({reason}); the store cannot show it lost nothing \
             acknowledged. Restore the data directory from a backup, or remove the file to accept \
             the store as it is",
            path.display()
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_round_trips_a_torn_slot_falls_back_two_are_refused_a_torn_first_is_none() {
        // Proves the file reads back the newest mark, that a torn slot falls
        // back to the previous one, and that damage to both is reported
        // rather than trusted.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Watermark::load(dir.path()).unwrap(), None, "no file, no mark");
        let mut file = WatermarkFile::open(dir.path()).unwrap();
        let first = Watermark { acknowledged_seq: 40, acknowledged_at: (40, 6), reserved_seq: 1_000_040 };
        let mark = Watermark { acknowledged_seq: 41, acknowledged_at: (41, 7), reserved_seq: 1_000_041 };
        file.save(&first).unwrap();
        file.save(&mark).unwrap();
        assert_eq!(Watermark::load(dir.path()).unwrap(), Some(mark), "the newest slot wins");
        let path = Watermark::path(dir.path());
        let torn = std::fs::read_to_string(&path).unwrap().replace("=41 ", "=42 ");
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(Watermark::load(dir.path()).unwrap(), Some(first), "a torn slot leaves the previous mark");
        std::fs::write(&path, torn.replace("=40 ", "=43 ")).unwrap();
        let error = Watermark::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");
        // A torn first write (slot 0 still the hole it left) acknowledged
        // nothing: no mark, not a damaged file the store refuses to open on.
        let mut first_only = vec![0; SLOT_BYTES];
        first_only.extend_from_slice(&torn.as_bytes()[SLOT_BYTES..SLOT_BYTES + 20]);
        std::fs::write(&path, &first_only).unwrap();
        assert_eq!(Watermark::load(dir.path()).unwrap(), None);
        assert!(WatermarkFile::open(dir.path()).is_ok());
    }
}
