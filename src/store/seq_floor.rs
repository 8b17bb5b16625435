//! A high-water mark for `seq` kept beside the database, so sequence numbers are never reused
//! even when a corrupt buffer file is moved aside and a fresh one started.
//!
//! Numbers are reserved in blocks: before a commit would hand out a seq at or above the
//! reserved mark, the mark is raised by [`BLOCK`] and written (temp file, fsync, rename). A fresh
//! database starts at the mark, so it skips at most one block.

use std::path::{Path, PathBuf};

pub(super) const BLOCK: u64 = 1_000_000;

pub(super) struct SeqFloor {
    path: PathBuf,
    reserved: u64,
}

impl SeqFloor {
    /// Reads the mark; a missing or unreadable file counts as nothing reserved.
    pub(super) fn load(path: &Path) -> Self {
        let reserved = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        Self {
            path: path.to_path_buf(),
            reserved,
        }
    }

    /// Every seq below this may have been handed out before.
    pub(super) fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Makes sure seqs below `upto` are covered by the mark on disk.
    pub(super) fn ensure(&mut self, upto: u64) -> std::io::Result<()> {
        if upto < self.reserved {
            return Ok(());
        }
        let next = upto + BLOCK;
        crate::common::files::write_atomic(&self.path, format!("{next}\n").as_bytes())?;
        self.reserved = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_in_blocks_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq.floor");
        let mut f = SeqFloor::load(&path);
        assert_eq!(f.reserved(), 1);
        f.ensure(1).unwrap();
        assert_eq!(f.reserved(), 1 + BLOCK);
        f.ensure(500).unwrap();
        assert_eq!(f.reserved(), 1 + BLOCK, "no write inside the block");
        assert_eq!(SeqFloor::load(&path).reserved(), 1 + BLOCK);
    }
}
