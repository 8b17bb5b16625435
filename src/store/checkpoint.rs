//! WAL checkpoints on a thread of their own, so no commit waits for one.
//!
//! The writer's connection has automatic checkpoints turned off and nudges this thread after
//! each commit. At most every [`PAUSE`] after a nudge, a passive checkpoint copies committed
//! pages from the WAL into the database file, on its own connection and without blocking the
//! writer; the writer starts the WAL over once everything in it is copied. Should the WAL still
//! outgrow [`RESTART_FRAMES`] (a writer that never pauses), a restart checkpoint waits for the
//! writer's current transaction and makes the next one start the WAL over. What a checkpoint
//! copies is already durable in the WAL: a crash during one loses nothing.

use std::path::Path;
use std::sync::mpsc::{self, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;
use crate::log_limit::LogLimit;

/// Least time between checkpoints: each one syncs the database file.
const PAUSE: Duration = Duration::from_millis(200);

/// WAL frames (pages) beyond which the writer is made to start the WAL over: 64 MiB.
const RESTART_FRAMES: i64 = 16_384;

pub struct Checkpointer {
    nudge: SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens a second connection to the buffer at `path` and starts the thread.
    pub fn start(path: &Path, synchronous: &str) -> Result<Self, StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite)?;
        // A checkpoint syncs the database file at this level, as the writer's would.
        conn.execute_batch(&format!("PRAGMA synchronous = {synchronous};"))
            .map_err(sqlite)?;
        let (nudge, nudges) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || run(&conn, &nudges))
            .map_err(|source| StoreError::DataDir {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self { nudge, thread })
    }

    /// Something was committed: a checkpoint is due soon.
    pub fn nudge(&self) {
        // Full means one is pending already.
        let _ = self.nudge.try_send(());
    }

    /// Ends the thread after the checkpoint it may be running.
    pub fn stop(self) {
        drop(self.nudge);
        let _ = self.thread.join();
    }
}

fn run(conn: &Connection, nudges: &mpsc::Receiver<()>) {
    let failures = LogLimit::new(Duration::from_secs(60));
    // A nudge that came during the last pause.
    let mut due = false;
    loop {
        if !due && nudges.recv().is_err() {
            return;
        }
        if let Err(e) = checkpoint(conn) {
            if let Some(held) = failures.admit() {
                tracing::warn!(error = %e, repeats = held, "WAL checkpoint failed; retried after the next commit");
            }
        }
        std::thread::sleep(PAUSE);
        due = match nudges.try_recv() {
            Ok(()) => true,
            Err(TryRecvError::Empty) => false,
            Err(TryRecvError::Disconnected) => return,
        };
    }
}

fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    // (busy, frames in the WAL, frames copied)
    let frames: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
    if frames > RESTART_FRAMES {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(())
}
