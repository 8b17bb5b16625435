//! [`Inspector`]: the buffer opened read-only, for the CLI and `/status` while the gateway
//! may be running. It never writes and takes no lock; each method is one read of the file as
//! it is now, returning the store's typed rows (the SQL stays in [`super::db`]).

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::liveness::SensorRow;
use super::{db, ActuatorRow, CommandRow, DeadLetterRow, Stats, StoreError};

/// A read-only view of an existing buffer file.
pub struct Inspector {
    path: PathBuf,
    conn: Connection,
}

impl Inspector {
    /// Opens the buffer at `path` read-only: [`StoreError::Missing`] if there is no file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            path: path.to_path_buf(),
            conn: db::open_read_only(path)?,
        })
    }

    /// The file this inspector reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Totals for `buffer stats`.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        super::stats(&self.conn).map_err(|e| self.sqlite(e))
    }

    /// The newest `limit` dead-letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetterRow>, StoreError> {
        db::dead_letters(&self.conn, limit).map_err(|e| self.sqlite(e))
    }

    /// Dead-letters counted by reason, ordered by reason.
    pub fn dead_letters_by_reason(&self) -> Result<Vec<(String, u64)>, StoreError> {
        db::dead_letters_by_reason(&self.conn).map_err(|e| self.sqlite(e))
    }

    /// Every sensor's liveness as the buffer records it, by field, device and type.
    pub fn sensors(&self) -> Result<Vec<SensorRow>, StoreError> {
        db::sensors::list(&self.conn).map_err(|e| self.sqlite(e))
    }

    /// Every actuator the buffer has a state or result for, by id.
    pub fn actuators(&self) -> Result<Vec<ActuatorRow>, StoreError> {
        db::actuators::list(&self.conn).map_err(|e| self.sqlite(e))
    }

    /// The newest `limit` commands received, newest first.
    pub fn commands(&self, limit: usize) -> Result<Vec<CommandRow>, StoreError> {
        db::commands::newest(&self.conn, limit).map_err(|e| self.sqlite(e))
    }

    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    #[test]
    fn missing_file_is_reported_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let err = Inspector::open(&path).err().expect("no file, no inspector");
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("has the gateway run"), "{err}");
        assert!(!path.exists(), "opening read-only must not create the file");
    }

    #[test]
    fn reads_an_empty_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        drop(db::open(&path, Synchronous::Normal, false).unwrap());
        let i = Inspector::open(&path).unwrap();
        assert_eq!(i.path(), path);
        let s = i.stats().unwrap();
        assert_eq!((s.readings, s.status_events), (0, 0));
        assert!(i.dead_letters(10).unwrap().is_empty());
        assert!(i.dead_letters_by_reason().unwrap().is_empty());
        assert!(i.sensors().unwrap().is_empty());
        assert!(i.actuators().unwrap().is_empty());
        assert!(i.commands(10).unwrap().is_empty());
    }
}
