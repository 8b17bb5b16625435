//! The free-disk reserve (invariant 5): while the data directory's filesystem has less than
//! `min_free_disk` free, appends that carry readings are refused whole; forwarding continues
//! and frees space. Checked at open and once a second.

use std::path::Path;

use super::writer::Writer;

/// Bytes free to unprivileged users on the filesystem of `dir`, as `min_free_disk` counts them.
pub(crate) fn free_disk(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

impl Writer {
    /// Free space on the data directory's filesystem against `min_free_disk`.
    pub(super) fn check_disk(&mut self) {
        let low = match free_disk(&self.data_dir) {
            Ok(free) => free < self.buffer.min_free_disk.0,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.data_dir.display(), "cannot read free disk space");
                false
            }
        };
        if low != self.disk_low {
            if low {
                tracing::error!(dir = %self.data_dir.display(), reserve = self.buffer.min_free_disk.0, "free disk below min_free_disk: intake paused, forwarding continues");
            } else {
                tracing::info!("free disk above min_free_disk again: intake resumed");
            }
        }
        self.disk_low = low;
        self.metrics.intake_paused.set(i64::from(low || self.full));
    }
}
