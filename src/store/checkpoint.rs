//! Checkpoint files: a [`LedgerSnapshot`] on disk, versioned and checksummed.
//!
//! A checkpoint lives in `<ledger dir>/checkpoints/` as
//! `checkpoint-<seq, 20 digits>.cgcp`, where `seq` is the last record it
//! covers. Its layout is two text lines and a JSON body:
//!
//! ```text
//! creditgate-checkpoint 1
//! seq=<u64> bytes=<body length> sha256=<hex of the body>
//! <body: the LedgerSnapshot as JSON, amounts as decimal strings>
//! ```
//!
//! The first line names the format and its version; a reader refuses a
//! version it does not know rather than guess. A checkpoint of version 1 is
//! checked in as `tests/fixtures/checkpoint-v1.cgcp`, and a test reads it:
//! a later version must keep reading it (or convert it).
//!
//! Written atomically: the bytes go to a temporary file, which is fsynced,
//! renamed into place, and the directory fsynced. A crash leaves either the
//! old set of checkpoints or the new one, plus perhaps a temporary file that
//! the next write removes. The newest [`KEPT`] checkpoints that read back
//! whole are kept (a damaged newer one stays until that many good ones are
//! newer), so a damaged newest one (a bad checksum, a truncated file) falls
//! back to the one before; [`load_newest`] says which were skipped and why.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ledger::snapshot::LedgerSnapshot;

/// First line of every checkpoint file.
const MAGIC: &str = "creditgate-checkpoint";
/// The layout this build writes.
pub const VERSION: u32 = 1;
/// Versions this build reads.
const READABLE: [u32; 1] = [1];
/// How many checkpoints stay on disk (the newest and its fallback).
pub const KEPT: usize = 2;
const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".cgcp";
/// Longest header line a reader looks at: a damaged file cannot make it
/// scan far.
const HEADER_MAX: usize = 256;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a checkpoint this build can read.
    #[error("{path}: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The directory checkpoints of the sled store in `ledger_dir` go to.
pub fn dir_of(ledger_dir: &Path) -> PathBuf {
    ledger_dir.join("checkpoints")
}

/// The file of the checkpoint covering `seq`.
pub fn path_of(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq:020}{SUFFIX}"))
}

/// The checkpoint's bytes: header and body.
pub fn encode(snapshot: &LedgerSnapshot) -> Vec<u8> {
    // A snapshot holds strings, numbers and decimals as strings only:
    // serializing it cannot fail.
    let body = serde_json::to_vec(snapshot).unwrap_or_default();
    let mut bytes = format!(
        "{MAGIC} {VERSION}\nseq={} bytes={} sha256={}\n",
        snapshot.seq,
        body.len(),
        hex::encode(Sha256::digest(&body))
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Reads a checkpoint's bytes, checking version, length and checksum.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<LedgerSnapshot, CheckpointError> {
    let damaged = |reason: String| CheckpointError::Damaged { path: path.to_owned(), reason };
    let (seq, body) = checked_body(path, bytes)?;
    let snapshot: LedgerSnapshot =
        serde_json::from_slice(body).map_err(|error| damaged(format!("body does not parse: {error}")))?;
    if snapshot.seq != seq {
        return Err(damaged(format!("body covers record {} but the header says {seq}", snapshot.seq)));
    }
    Ok(snapshot)
}

/// The header's sequence number and the body, once the header, the length
/// and the checksum are right (the body is not parsed).
fn checked_body<'a>(path: &Path, bytes: &'a [u8]) -> Result<(u64, &'a [u8]), CheckpointError> {
    let damaged = |reason: String| CheckpointError::Damaged { path: path.to_owned(), reason };
    let (first, rest) = split_line(bytes).ok_or_else(|| damaged("no header line".into()))?;
    let version = first
        .strip_prefix(MAGIC)
        .and_then(|v| v.strip_prefix(' '))
        .ok_or_else(|| damaged(format!("does not start with {MAGIC:?}")))?;
    let version: u32 =
        version.parse().map_err(|_| damaged(format!("version {version:?} is not a number")))?;
    if !READABLE.contains(&version) {
        return Err(damaged(format!(
            "format version {version} is not supported (this build reads {READABLE:?})"
        )));
    }
    let (second, body) = split_line(rest).ok_or_else(|| damaged("no second header line".into()))?;
    let field = |name: &str| {
        second
            .split(' ')
            .find_map(|word| word.strip_prefix(name).and_then(|w| w.strip_prefix('=')))
            .ok_or_else(|| damaged(format!("header field {name} is missing")))
    };
    let seq: u64 = field("seq")?.parse().map_err(|_| damaged("header seq is not a number".into()))?;
    // The name is what the list and retention read (a file restored or
    // renamed by hand could say another number): the two must agree.
    if let Some(named) = seq_of_name(path).filter(|named| *named != seq) {
        return Err(damaged(format!("the file is named for record {named} but covers {seq}")));
    }
    let length: usize =
        field("bytes")?.parse().map_err(|_| damaged("header bytes is not a number".into()))?;
    let sum = field("sha256")?;
    if body.len() != length {
        return Err(damaged(format!("body is {} bytes, header says {length} (truncated?)", body.len())));
    }
    if hex::encode(Sha256::digest(body)) != sum {
        return Err(damaged("checksum does not match the body".into()));
    }
    Ok((seq, body))
}

fn split_line(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().take(HEADER_MAX).position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&bytes[..end]).ok()?;
    Some((line, &bytes[end + 1..]))
}

/// Reads one checkpoint file.
pub fn read(path: &Path) -> Result<LedgerSnapshot, CheckpointError> {
    let bytes =
        std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_owned(), source })?;
    decode(path, &bytes)
}

/// The checkpoint files in `dir`, newest (highest sequence number) first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CheckpointError::Io { path: dir.to_owned(), source }),
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            Some((seq_of_name(&path)?, path))
        })
        .collect();
    found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    Ok(found)
}

/// The record a checkpoint file's name says it covers (`None`: not a
/// checkpoint's name).
fn seq_of_name(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?.parse().ok()
}

/// The newest checkpoint that reads back whole, and a line for each newer
/// one that did not (those are logged too).
pub fn load_newest(dir: &Path) -> Result<(Option<LedgerSnapshot>, Vec<String>), CheckpointError> {
    let mut skipped = Vec::new();
    for (_, path) in list(dir)? {
        match read(&path) {
            Ok(snapshot) => {
                if !skipped.is_empty() {
                    tracing::warn!(checkpoint = %path.display(), ?skipped, "fell back to an older checkpoint");
                }
                return Ok((Some(snapshot), skipped));
            }
            Err(error) => {
                tracing::error!(%error, "a checkpoint is damaged; trying the one before");
                skipped.push(error.to_string());
            }
        }
    }
    Ok((None, skipped))
}

/// Writes `snapshot` atomically into `dir` and removes all but the newest
/// [`KEPT`] checkpoints. `pause` runs halfway through the temporary file
/// (a test hook that widens the crash window; a no-op otherwise).
pub fn write(dir: &Path, snapshot: &LedgerSnapshot, pause: impl Fn()) -> Result<PathBuf, CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let bytes = encode(snapshot);
    let path = path_of(dir, snapshot.seq);
    let temp = dir.join(format!(".{PREFIX}{:020}.tmp", snapshot.seq));
    {
        let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        file.write_all(head).map_err(io(&temp))?;
        pause();
        file.write_all(tail).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
    }
    std::fs::rename(&temp, &path).map_err(io(&path))?;
    sync_dir(dir).map_err(io(dir))?;
    remove_old(dir, &path)?;
    Ok(path)
}

/// Removes checkpoints past the newest [`KEPT`] that read back whole (the
/// one just `written` counts without a read), and leftover temporary files.
/// A damaged one is not counted: after a start that fell back past it, the
/// good fallback it would have displaced is kept instead.
fn remove_old(dir: &Path, written: &Path) -> Result<(), CheckpointError> {
    let mut whole = 0;
    for (_, path) in list(dir)? {
        if whole >= KEPT {
            std::fs::remove_file(&path)
                .map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
        } else if path == written || reads_back_whole(&path) {
            whole += 1;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// Whether a checkpoint's header, length and checksum are right: what
/// [`remove_old`] needs, without building the snapshot (the new one is
/// still in memory while it runs).
fn reads_back_whole(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| checked_body(path, &bytes).is_ok())
}

/// fsyncs a directory, so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot(seq: u64) -> LedgerSnapshot {
        let ledger = crate::ledger::Ledger::new(
            crate::ledger::LedgerConfig::default(),
            std::sync::Arc::new(crate::ledger::journal::NullJournal),
        );
        ledger.snapshot(seq)
    }

    #[test]
    fn the_newest_whole_checkpoint_wins_and_damage_falls_back() {
        // Proves a checkpoint round-trips, only the newest two are kept, and
        // a truncated or altered newest one falls back to the one before.
        let dir = tempfile::tempdir().unwrap();
        for seq in [10, 20, 30] {
            write(dir.path(), &snapshot(seq), || {}).unwrap();
        }
        let kept: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(kept, [30, 20], "only the newest two stay");
        assert_eq!(load_newest(dir.path()).unwrap().0.unwrap().seq, 30);
        let newest = path_of(dir.path(), 30);
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() - 3]).unwrap();
        let (found, skipped) = load_newest(dir.path()).unwrap();
        assert_eq!(found.unwrap().seq, 20, "a truncated newest falls back");
        assert!(skipped[0].contains("truncated"), "{skipped:?}");
        let mut altered = bytes.clone();
        let last = altered.len() - 2;
        altered[last] ^= 1;
        std::fs::write(&newest, &altered).unwrap();
        let (_, skipped) = load_newest(dir.path()).unwrap();
        assert!(skipped[0].contains("checksum"), "{skipped:?}");
        std::fs::write(path_of(dir.path(), 20), b"creditgate-checkpoint 9\n").unwrap();
        let (found, skipped) = load_newest(dir.path()).unwrap();
        assert!(found.is_none() && skipped.len() == 2, "no valid checkpoint: full replay ({skipped:?})");
        assert!(skipped[1].contains("version 9"), "{skipped:?}");
    }

    #[test]
    fn a_damaged_checkpoint_does_not_push_out_the_good_fallback() {
        // Proves the two kept are the two newest that read back whole: with
        // 30 damaged (a start fell back to 20), writing 40 keeps 20. Before,
        // 40 and the damaged 30 were kept and 20 deleted, leaving one good
        // checkpoint, and retention failed on reading 30.
        let dir = tempfile::tempdir().unwrap();
        for seq in [10, 20, 30] {
            write(dir.path(), &snapshot(seq), || {}).unwrap();
        }
        std::fs::write(path_of(dir.path(), 30), b"damaged").unwrap();
        write(dir.path(), &snapshot(40), || {}).unwrap();
        let kept: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(kept, [40, 30, 20]);
        write(dir.path(), &snapshot(50), || {}).unwrap();
        let kept: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(kept, [50, 40], "the damaged one goes once two good ones are newer");
    }

    #[test]
    fn a_checkpoint_renamed_to_another_record_is_damaged_and_not_counted() {
        // Retention reads a checkpoint's record from its name: one restored
        // or renamed by hand that covers less would let it prune records the
        // restart still needs.
        let dir = tempfile::tempdir().unwrap();
        let written = write(dir.path(), &snapshot(10), || {}).unwrap();
        let renamed = path_of(dir.path(), 30);
        std::fs::rename(&written, &renamed).unwrap();
        assert!(matches!(read(&renamed), Err(CheckpointError::Damaged { .. })));
        assert!(!reads_back_whole(&renamed));
        let (newest, skipped) = load_newest(dir.path()).unwrap();
        assert!(newest.is_none() && skipped.len() == 1, "{skipped:?}");
    }

    #[test]
    fn garbage_never_panics() {
        // Proves arbitrary bytes are refused as damaged, never a panic.
        let path = Path::new("x");
        for bytes in
            [&b""[..], b"\n\n", b"creditgate-checkpoint 1\nseq=1 bytes=99999999999999999999 sha256=x\n"]
        {
            assert!(decode(path, bytes).is_err());
        }
    }
}
