//! The durable watermark: a small checksummed file beside sled's own files
//! that says how far the store must reach and which sequence numbers were
//! already handed out.
//!
//! sled recovers its log up to the first damaged write, silently: a store
//! whose last bytes were lost opens without complaint and replays a shorter,
//! self-consistent ledger. The watermark is what notices. It is rewritten
//! (atomically: temporary file, fsync, rename, fsync of the directory) after
//! every flush that acknowledges an admin operation and at shutdown, so on
//! open the store must end at or after the position it names.
//!
//! It also reserves sequence numbers ahead of use, so that numbers a crash
//! lost (records that never reached a flush) are never handed out again
//! after the restart: the next run starts above the reservation.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// The file's name inside the sled directory.
const FILE_NAME: &str = "creditgate.watermark";
/// First word of the file; bump when the layout changes.
const MAGIC: &str = "creditgate-watermark-1";

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
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(corrupt(&path, &format!("cannot be read: {error}"))),
        };
        Self::parse(&text).map(Some).map_err(|reason| corrupt(&path, &reason))
    }

    /// Writes the watermark durably and atomically.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let path = Self::path(dir);
        let temporary = dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(self.render().as_bytes())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, &path)?;
        // The rename is durable only once the directory is.
        std::fs::File::open(dir)?.sync_all()
    }

    fn render(&self) -> String {
        let (running_max, segments) = self.acknowledged_at;
        let body = format!(
            "{MAGIC} acknowledged_seq={} position={running_max}:{segments} reserved_seq={}",
            self.acknowledged_seq, self.reserved_seq
        );
        format!("{body} sha256={}\n", checksum(&body))
    }

    fn parse(text: &str) -> Result<Watermark, String> {
        let text = text.trim_end_matches('\n');
        let (body, sum) = text.rsplit_once(" sha256=").ok_or("it has no checksum")?;
        if checksum(body) != sum {
            return Err("its checksum does not match its contents".into());
        }
        let mut words = body.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(format!("it does not start with {MAGIC}"));
        }
        let mut field = |name: &str| {
            words
                .next()
                .and_then(|word| word.strip_prefix(name))
                .and_then(|word| word.strip_prefix('='))
                .ok_or(format!("field {name} is missing"))
        };
        let number = |text: &str| text.parse::<u64>().map_err(|_| format!("{text:?} is not a number"));
        let acknowledged_seq = number(field("acknowledged_seq")?)?;
        let (running_max, segments) =
            field("position")?.split_once(':').ok_or("field position is not MAX:SEGMENTS")?;
        let acknowledged_at = (number(running_max)?, number(segments)?);
        let reserved_seq = number(field("reserved_seq")?)?;
        Ok(Watermark { acknowledged_seq, acknowledged_at, reserved_seq })
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
    fn a_watermark_round_trips_and_a_flipped_digit_is_refused() {
        // Proves the file reads back what was saved and that damage to it is
        // reported rather than trusted.
        let dir = tempfile::tempdir().unwrap();
        let mark = Watermark { acknowledged_seq: 41, acknowledged_at: (41, 7), reserved_seq: 1_000_041 };
        mark.save(dir.path()).unwrap();
        assert_eq!(Watermark::load(dir.path()).unwrap(), Some(mark));
        let path = Watermark::path(dir.path());
        let damaged = std::fs::read_to_string(&path).unwrap().replace("=41 ", "=42 ");
        std::fs::write(&path, damaged).unwrap();
        let error = Watermark::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");
        assert_eq!(Watermark::load(tempfile::tempdir().unwrap().path()).unwrap(), None, "no file, no mark");
    }
}
