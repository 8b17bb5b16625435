//! An advisory lock beside the buffer (`{file}.lock`, `flock`): one process at a time writes
//! the buffer. The owner thread caches totals and `next_seq` (invariant 1), so a second writer
//! (a second gateway on the same `data_dir`, or `dead-letters replay` opening the buffer while
//! a gateway starts) would corrupt them. Readers (`buffer stats`, `dead-letters list`) take no
//! lock. The kernel drops the lock with the process, `kill -9` included.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use super::StoreError;

/// Held while the store runs; unlocks when dropped.
#[derive(Debug)]
pub(super) struct BufferLock {
    _file: File,
}

pub(super) fn path_of(db_path: &Path) -> PathBuf {
    let mut p = db_path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the lock, waiting up to `wait` while another process holds it.
pub(super) fn acquire(db_path: &Path, wait: Duration) -> Result<BufferLock, StoreError> {
    let path = path_of(db_path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::DataDir {
            path: path.clone(),
            source,
        })?;
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(BufferLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
            Err(e) => {
                return Err(StoreError::DataDir {
                    path,
                    source: e.into(),
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(StoreError::Locked {
                path: db_path.to_path_buf(),
                lock: path,
            });
        }
        if !told {
            tracing::warn!(lock = %path.display(), "the buffer is locked by another process (`dead-letters replay`, or another gateway on this data_dir); waiting");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("buffer.db");
        let held = acquire(&db, Duration::ZERO).unwrap();
        assert!(matches!(
            acquire(&db, Duration::from_millis(250)),
            Err(StoreError::Locked { .. })
        ));
        drop(held);
        acquire(&db, Duration::ZERO).unwrap();
    }
}
