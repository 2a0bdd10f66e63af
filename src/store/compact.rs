//! `creditgate ledger compact`: gives the space of pruned records back to
//! the file system.
//!
//! sled reuses the space of removed values for new writes but never shrinks
//! its file, so after retention first prunes a long history the store stays
//! as large as it was (it then stops growing). Compaction copies what the
//! store holds (its records, meta, watermark and checkpoints) into a fresh
//! directory beside it and swaps the two, with the gateway stopped:
//!
//! 1. `<dir>.compacting/` is written and fsynced, then marked complete
//!    (`COMPLETE`, fsynced).
//! 2. `<dir>` is renamed to `<dir>.old`, `<dir>.compacting` to `<dir>`, the
//!    parent fsynced, and `<dir>.old` removed.
//!
//! [`finish_interrupted`] (run before every open) completes or discards an
//! interrupted compaction: a complete copy with `<dir>` missing is moved into
//! place; an incomplete one is removed; a leftover `<dir>.old` beside a
//! present `<dir>` is removed, and one with `<dir>` missing is put back if
//! compaction moved it (its `MOVED_BY_COMPACTION` mark; not one an operator
//! moved). The original is never removed before its copy is in place.

use std::path::{Path, PathBuf};

use crate::store::checkpoint::sync_dir;
use crate::store::sled::open_db;
use crate::store::StoreError;

const COMPLETE: &str = "COMPLETE";
/// Left in the original just before it is moved aside: only an original
/// compaction moved is put back (not one an operator moved on purpose).
const MOVED_ASIDE: &str = "MOVED_BY_COMPACTION";

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

fn io(error: std::io::Error) -> StoreError {
    StoreError::Sled(::sled::Error::Io(error))
}

/// Completes or discards a compaction a crash interrupted; see the module doc.
pub fn finish_interrupted(dir: &Path) -> Result<(), StoreError> {
    let copy = sibling(dir, ".compacting");
    let old = sibling(dir, ".old");
    if copy.exists() {
        if !dir.exists() && copy.join(COMPLETE).exists() {
            tracing::warn!(dir = %dir.display(), "finishing an interrupted ledger compaction");
            std::fs::rename(&copy, dir).map_err(io)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent).map_err(io)?;
            }
        } else {
            tracing::warn!(copy = %copy.display(), "removing an unfinished ledger compaction");
            std::fs::remove_dir_all(&copy).map_err(io)?;
        }
    }
    if old.exists() && dir.exists() {
        std::fs::remove_dir_all(&old).map_err(io)?;
    } else if old.join(MOVED_ASIDE).exists() {
        // Moved aside, but no complete copy took its place (the swap
        // failed, or another command removed the copy meanwhile): the
        // original goes back, or the next open would make an empty store.
        tracing::warn!(dir = %dir.display(), "putting back a ledger an interrupted compaction moved aside");
        std::fs::rename(&old, dir).map_err(io)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(io)?;
        }
    }
    // From a compaction that failed before moving the original.
    if dir.join(MOVED_ASIDE).exists() {
        std::fs::remove_file(dir.join(MOVED_ASIDE)).map_err(io)?;
    }
    Ok(())
}

/// Copies the store at `dir` into a fresh directory and swaps it in.
/// Returns the bytes on disk before and after.
pub fn compact(dir: &Path) -> Result<(u64, u64), StoreError> {
    finish_interrupted(dir)?;
    let before = size(dir);
    let copy = sibling(dir, ".compacting");
    {
        // Opening checks the store (format, watermark) before anything is copied.
        let _checked = crate::store::SledStore::open(dir)?;
    }
    copy_store(dir, &copy)?;
    let old = sibling(dir, ".old");
    std::fs::write(dir.join(MOVED_ASIDE), b"").map_err(io)?;
    sync_dir(dir).map_err(io)?;
    std::fs::rename(dir, &old).map_err(io)?;
    std::fs::rename(&copy, dir).map_err(io)?;
    std::fs::remove_file(dir.join(COMPLETE)).map_err(io)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent).map_err(io)?;
    }
    std::fs::remove_dir_all(&old).map_err(io)?;
    Ok((before, size(dir)))
}

/// Writes the copy: sled trees value by value, then the watermark and the
/// checkpoints, all fsynced, then the completion mark.
fn copy_store(dir: &Path, copy: &Path) -> Result<(), StoreError> {
    if copy.exists() {
        std::fs::remove_dir_all(copy).map_err(io)?;
    }
    {
        let from = open_db(dir)?;
        let to = open_db(copy)?;
        for name in ["meta", "records"] {
            let (source, target) = (from.open_tree(name)?, to.open_tree(name)?);
            let mut batch = ::sled::Batch::default();
            let mut pending = 0;
            for item in source.iter() {
                let (key, value) = item?;
                batch.insert(key, value);
                pending += 1;
                if pending == 4_096 {
                    target.apply_batch(std::mem::take(&mut batch))?;
                    pending = 0;
                }
            }
            target.apply_batch(batch)?;
        }
        to.flush()?;
    }
    // sled's flush does not fsync (see `SledStore::flush`).
    std::fs::File::open(copy.join("db")).and_then(|f| f.sync_all()).map_err(io)?;
    for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "creditgate.watermark" {
            std::fs::copy(entry.path(), copy.join(&*name)).map_err(io)?;
        }
    }
    let checkpoints = crate::store::checkpoint::dir_of(dir);
    if checkpoints.exists() {
        let target = crate::store::checkpoint::dir_of(copy);
        std::fs::create_dir_all(&target).map_err(io)?;
        for (_, path) in crate::store::checkpoint::list(&checkpoints)
            .map_err(|e| StoreError::Corrupt { reason: e.to_string() })?
        {
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, target.join(name)).map_err(io)?;
                std::fs::File::open(target.join(name)).and_then(|f| f.sync_all()).map_err(io)?;
            }
        }
        sync_dir(&target).map_err(io)?;
    }
    std::fs::File::open(copy.join("creditgate.watermark")).and_then(|f| f.sync_all()).ok();
    std::fs::write(copy.join(COMPLETE), b"").map_err(io)?;
    std::fs::File::open(copy.join(COMPLETE)).and_then(|f| f.sync_all()).map_err(io)?;
    sync_dir(copy).map_err(io)?;
    Ok(())
}

/// Bytes under `dir`.
pub fn size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
