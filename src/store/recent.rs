//! The source messages committed last, for recognising a redelivery (an MQTT message whose
//! ack was lost to a crash or a dropped link comes again with its DUP flag set).
//!
//! On disk, `recent_messages` is append-only in commit order and trimmed from its old end: no
//! index on the key, because random keys in a B-tree dirty pages all over it at every commit.
//! Lookups go to this in-memory copy of the newest [`RECENT_MESSAGES`] keys instead, loaded at
//! open. Only 64 bits of each 128-bit key are kept here: among 65,536 entries a false match has
//! a chance of about 4·10⁻¹⁵ per lookup, and lookups happen only for messages flagged as resent.
//! The table's statements are in [`super::db::recent`]; the checks that use this copy in
//! `dedupe.rs`.

use std::collections::VecDeque;

use rusqlite::Connection;

/// Messages remembered: the most a broker can have unacknowledged towards one MQTT session
/// (`receive_maximum` is a 16-bit number), which is what a reconnect redelivers.
pub(super) const RECENT_MESSAGES: usize = 65_536;

/// The part of a message key kept in memory.
pub(super) fn fingerprint(key: &[u8; 16]) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&key[..8]);
    u64::from_le_bytes(head)
}

pub(super) struct RecentMessages {
    /// Oldest first.
    fingerprints: VecDeque<u64>,
}

impl RecentMessages {
    /// The newest [`RECENT_MESSAGES`] keys in the table.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let newest_first = super::db::recent::message_keys(conn, RECENT_MESSAGES)?;
        let fingerprints = newest_first
            .iter()
            .rev()
            .filter_map(|bytes| <[u8; 16]>::try_from(bytes.as_slice()).ok())
            .map(|key| fingerprint(&key))
            .collect();
        Ok(Self { fingerprints })
    }

    pub(super) fn contains(&self, fingerprint: u64) -> bool {
        self.fingerprints.contains(&fingerprint)
    }

    /// Keys just committed, in commit order; the oldest beyond the bound are forgotten.
    pub(super) fn extend(&mut self, committed: &[u64]) {
        self.fingerprints.extend(committed);
        let excess = self.fingerprints.len().saturating_sub(RECENT_MESSAGES);
        self.fingerprints.drain(..excess);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.fingerprints.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_newest_keys_and_forgets_the_oldest_beyond_the_bound() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE recent_messages (id INTEGER PRIMARY KEY, key BLOB NOT NULL);",
        )
        .unwrap();
        let key = |i: u64| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&i.to_le_bytes());
            k
        };
        let total = RECENT_MESSAGES as u64 + 10;
        for i in 0..total {
            conn.execute(
                "INSERT INTO recent_messages (key) VALUES (?1)",
                [&key(i)[..]],
            )
            .unwrap();
        }
        let mut recent = RecentMessages::load(&conn).unwrap();
        assert_eq!(recent.len(), RECENT_MESSAGES);
        assert!(
            !recent.contains(fingerprint(&key(9))),
            "older than the bound"
        );
        assert!(recent.contains(fingerprint(&key(10))));
        assert!(recent.contains(fingerprint(&key(total - 1))));
        recent.extend(&[fingerprint(&key(total))]);
        assert_eq!(recent.len(), RECENT_MESSAGES);
        assert!(!recent.contains(fingerprint(&key(10))));
        assert!(recent.contains(fingerprint(&key(total))));
    }
}
