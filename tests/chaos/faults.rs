//! Faults beyond stopping processes: a small filesystem that can be filled, a wall clock that
//! jumps (libfaketime, for the gateway process only), a buffer file damaged while the gateway is
//! stopped, and the process figures a soak watches (RSS, open files) from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rig::Rng;

/// A filesystem for the gateway's data directory whose free space the test controls: an ext4
/// image loop-mounted on the directory (needs root and `mount`), or, where mounting is not
/// allowed, the real filesystem with the reserve set just under its current free space.
pub struct Disk {
    pub dir: PathBuf,
    image: Option<PathBuf>,
    filler: PathBuf,
    /// The `min_free_disk` to configure.
    pub reserve: u64,
}

const IMAGE_BYTES: u64 = 48 << 20;

impl Disk {
    pub fn new(dir: &Path, scratch: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("data dir");
        let image = scratch.join("disk.img");
        let mounted = std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_BYTES))
            .is_ok()
            && run("mkfs.ext4", &["-q", "-F", "-m", "0", path(&image)])
            && run("mount", &["-o", "loop", path(&image), path(dir)]);
        let filler = dir.join("filler");
        if mounted {
            Self {
                dir: dir.to_path_buf(),
                image: Some(image),
                filler,
                reserve: 16 << 20,
            }
        } else {
            let _ = std::fs::remove_file(&image);
            let reserve = free_bytes(dir).saturating_sub(256 << 20);
            Self {
                dir: dir.to_path_buf(),
                image: None,
                filler,
                reserve,
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.image.is_some() {
            "48 MiB ext4 image, loop-mounted"
        } else {
            "real filesystem, reserve 256 MiB under its free space"
        }
    }

    /// Allocates a file so that `leave` bytes stay free (fewer than the reserve).
    pub fn fill_to(&self, leave: u64) {
        let free = free_bytes(&self.dir);
        let size = free.saturating_sub(leave);
        let file = std::fs::File::create(&self.filler).expect("filler");
        // Allocated blocks, not a sparse file: free space really shrinks.
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
            .expect("allocate filler");
        file.sync_all().expect("sync filler");
    }

    /// Gives the space back.
    pub fn free_up(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.free_up();
        if let Some(image) = &self.image {
            run("umount", &["-l", path(&self.dir)]);
            let _ = std::fs::remove_file(image);
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn free_bytes(dir: &Path) -> u64 {
    let s = rustix::fs::statvfs(dir).expect("statvfs");
    s.f_bavail * s.f_frsize
}

/// The gateway's wall clock, offset through libfaketime (Debian package `faketime`) while
/// monotonic time stays real: timers, timeouts and backoff are untouched, as on a gateway whose
/// NTP or RTC steps the clock.
pub struct Clock {
    file: PathBuf,
    library: PathBuf,
}

impl Clock {
    pub fn new(scratch: &Path) -> Self {
        let library = ["x86_64-linux-gnu", "aarch64-linux-gnu", "arm-linux-gnueabihf"]
            .iter()
            .map(|arch| PathBuf::from(format!("/usr/lib/{arch}/faketime/libfaketime.so.1")))
            .find(|p| p.exists())
            .expect("libfaketime not found: install the Debian package `faketime` (the README's test command does)");
        let clock = Self {
            file: scratch.join("faketime"),
            library,
        };
        clock.set_offset_minutes(0);
        clock
    }

    /// Environment for the gateway process.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.display().to_string(),
            ),
            // Re-read the offset file at most once a second.
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }

    /// Sets the wall clock to real time plus `minutes` (negative: back).
    pub fn set_offset_minutes(&self, minutes: i64) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{minutes:+}m\n")).expect("write faketime offset");
        std::fs::rename(&tmp, &self.file).expect("replace faketime offset");
    }
}

/// Damage done to a stopped gateway's buffer file.
#[derive(Debug, Clone, Copy)]
pub enum Damage {
    /// The whole file overwritten with garbage of the same length.
    Garbage,
    /// The SQLite header overwritten.
    Header,
    /// Cut at a random length, mid-page.
    Truncated,
    /// Cut to nothing.
    Empty,
}

impl Damage {
    pub const ALL: [Damage; 4] = [
        Damage::Garbage,
        Damage::Header,
        Damage::Truncated,
        Damage::Empty,
    ];

    pub fn apply(self, db: &Path, rng: &mut Rng) {
        let mut bytes = std::fs::read(db).expect("read buffer file");
        let noise =
            |rng: &mut Rng, n: usize| -> Vec<u8> { (0..n).map(|_| rng.next() as u8).collect() };
        match self {
            Damage::Garbage => bytes = noise(rng, bytes.len().max(4096)),
            Damage::Header => {
                let n = bytes.len().min(100);
                bytes[..n].copy_from_slice(&noise(rng, n));
            }
            Damage::Truncated => {
                let keep = 1 + rng.below(bytes.len().max(2) as u64 - 1) as usize;
                // Never on a page boundary: a cut there can leave a well-formed shorter file.
                let keep = if keep.is_multiple_of(4096) {
                    keep - 1
                } else {
                    keep
                };
                bytes.truncate(keep);
            }
            Damage::Empty => bytes.clear(),
        }
        std::fs::write(db, bytes).expect("write damaged buffer file");
    }
}

/// Readings still waiting in a stopped gateway's buffer: lost by design if the file is damaged.
pub fn pending_readings(db: &Path) -> Vec<usize> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open buffer read-only");
    let mut stmt = conn
        .prepare("SELECT body FROM outbox WHERE kind = 0 ORDER BY seq")
        .expect("query buffer");
    let rows = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .expect("read buffer");
    rows.map(|body| {
        let reading: sahool_gateway::reading::Reading =
            postcard::from_bytes(&body.expect("row")).expect("buffered reading decodes");
        reading.value as usize
    })
    .collect()
}

/// Resident memory (KiB) and open file descriptors of a process.
pub fn process_figures(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}
