//! Invariant 6 at run time: once SQLite finds the file corrupt, the writer stops writing,
//! tells the process once ([`super::StoreHandle::fatal`]), and answers every later caller
//! with [`StoreError::Corrupt`], so nothing is acknowledged that was not committed and the
//! ordered stop that follows loses nothing. The next start moves the file aside.

use super::writer::{Group, Writer};
use super::StoreError;

impl Writer {
    /// Stops all writing and tells the process, once.
    pub(super) fn became_corrupt(&mut self, e: &rusqlite::Error) {
        if self.corrupt.is_some() {
            return;
        }
        self.metrics.set_store_healthy(false);
        let cause = e.to_string();
        self.corrupt = Some(cause.clone());
        self.fatal.send_replace(Some(cause));
    }

    pub(super) fn corrupt_error(&self) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: self.corrupt.clone().unwrap_or_default(),
        }
    }

    /// After corruption: no transaction runs; callers that wait get an error, never a success,
    /// and a flush returns at once so the ordered stop does not hang.
    pub(super) fn refuse(&self, group: Group) {
        for (_, reply) in group.appends {
            let _ = reply.send(Err(self.corrupt_error()));
        }
        for (_, _, reply) in group.replays {
            let _ = reply.send(Err(self.corrupt_error()));
        }
        for (_, reply) in group.inbox {
            let _ = reply.send(Err(self.corrupt_error()));
        }
        for reply in group.flushes {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rusqlite::Connection;

    use crate::common::metrics::Metrics;
    use crate::config::Buffer;
    use crate::store::testkit::*;
    use crate::store::{start, StoreError};

    /// Overwrites every page after the first (header and schema) with garbage, where the
    /// running writer will read it.
    fn damage_behind_the_writers_back(path: &std::path::Path) {
        use std::io::{Seek, SeekFrom, Write};
        // A commit and checkpoint by another connection make the writer's page cache stale, so
        // its next transaction reads the pages from the file, as after a crash of the disk.
        Connection::open(path)
            .unwrap()
            .execute_batch(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('poke', 1);
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        // Every page after the first (header and schema) overwritten with garbage.
        let len = std::fs::metadata(path).unwrap().len();
        assert!(len > 3 * 4096, "the file spans several pages: {len}");
        let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.seek(SeekFrom::Start(4096)).unwrap();
        file.write_all(&vec![0xA5; len as usize - 4096]).unwrap();
        file.sync_all().unwrap();
    }

    #[tokio::test]
    async fn a_file_found_corrupt_while_running_is_reported_and_never_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let metrics = Arc::new(Metrics::new());
        let (store, thread) =
            start(path.clone(), Buffer::default(), 20.0, metrics.clone()).unwrap();
        for i in 0..300 {
            append(&store, message(i, false)).await;
        }
        let mut fatal = store.fatal();
        assert!(fatal.borrow().is_none());
        damage_behind_the_writers_back(&path);

        let first = store
            .append(message(1000, false))
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(first, Err(StoreError::Corrupt { .. })),
            "{first:?}"
        );
        let cause = tokio::time::timeout(Duration::from_secs(5), fatal.wait_for(Option::is_some))
            .await
            .expect("corruption reported on the fatal channel")
            .unwrap()
            .clone()
            .unwrap();
        assert!(cause.contains("malformed"), "{cause}");
        // Later callers get an error, never an acknowledgement; a flush does not hang.
        let later = store
            .append(message(1001, false))
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(later, Err(StoreError::Corrupt { .. })),
            "{later:?}"
        );
        assert!(matches!(
            store.fetch(0, 10).await,
            Err(StoreError::Corrupt { .. })
        ));
        store.flush().await.unwrap();
        close(store, thread).await;

        // Left unwritten for the next start, which moves it aside.
        let (store, thread) = start(path, Buffer::default(), 20.0, metrics.clone()).unwrap();
        assert_eq!(metrics.store_corruption_recovered.get(), 1);
        assert!(store.fetch(0, 10).await.unwrap().is_empty());
        close(store, thread).await;
    }
}
