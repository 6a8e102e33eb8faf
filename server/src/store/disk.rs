//! The embedded store's file: one redb database under `data_dir`, written in batches by one
//! thread, each batch one transaction made durable (fsync) before anyone hears of it.
//!
//! Records are the same versioned texts Redis holds (`records.rs`); the memory side decides
//! what to write, this side only how.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};

use super::{LAYOUT_VERSION, StoreError};

/// Every table: key → record. Keys join their parts with [`SEP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// "layout" → the layout version; "registry_seq" → the registry's change number.
    Meta,
    /// project SEP branch → the ref's position, and which entries of its rings are live.
    Facts,
    /// project SEP branch SEP slot → one push of the ref, a ring of `PUSHES_KEPT`.
    FactPushes,
    /// project SEP branch SEP sha:id → one pipeline of the ref.
    FactPipelines,
    /// project SEP branch SEP slot → one rejected claim of the ref, a ring of `MAX_REJECTED`.
    FactRejected,
    /// project SEP branch SEP delivery id → when it was first seen (Unix ms).
    Deliveries,
    /// agent → version, core record, and which entries of its two rings are live.
    Agents,
    /// slot SEP agent → one decision of the agent's history, a ring of `DECISION_HISTORY`.
    /// Slot first: a fan-out writes one slot of thousands of agents, which then share pages.
    AgentDecisions,
    /// slot SEP agent → one commit of the agent's deployed set, a ring of `DEPLOYED_HISTORY`.
    AgentDeployed,
    /// agent → its newest reports, length-prefixed.
    Reports,
    /// agent → why its desired revision cannot be delivered.
    SyncErrors,
    /// agent SEP sha SEP state → when the status was posted (Unix ms).
    Statuses,
    /// agent SEP sha SEP state → when a claim on it was taken (Unix ms).
    Taken,
    /// change log entry id (20 digits, so that keys sort as numbers) → the message.
    Feed,
    /// agent name → version and record.
    Registry,
}

impl Table {
    const ALL: [Table; 15] = [
        Table::Meta,
        Table::Facts,
        Table::FactPushes,
        Table::FactPipelines,
        Table::FactRejected,
        Table::Deliveries,
        Table::Agents,
        Table::AgentDecisions,
        Table::AgentDeployed,
        Table::Reports,
        Table::SyncErrors,
        Table::Statuses,
        Table::Taken,
        Table::Feed,
        Table::Registry,
    ];

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(match self {
            Table::Meta => "meta",
            Table::Facts => "facts",
            Table::FactPushes => "fact_pushes",
            Table::FactPipelines => "fact_pipelines",
            Table::FactRejected => "fact_rejected",
            Table::Deliveries => "deliveries",
            Table::Agents => "agents",
            Table::AgentDecisions => "agent_decisions",
            Table::AgentDeployed => "agent_deployed",
            Table::Reports => "reports",
            Table::SyncErrors => "sync_errors",
            Table::Statuses => "statuses",
            Table::Taken => "taken",
            Table::Feed => "feed",
            Table::Registry => "registry",
        })
    }
}

/// The file's page cache. The store reads the file once, when it is opened, and serves
/// from memory after that: the cache only holds the pages a batch rewrites. A larger one
/// keeps pages read at the start for as long as the server runs (redb's default is 1 GiB):
/// with 10,000 agents, 64 MiB held 70 MB more after a restart than 8 MiB, and fan-outs were
/// no faster for it.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Separates the parts of a key: no project, branch, agent, sha or delivery id holds it.
pub const SEP: char = '\u{1f}';

/// One change to write: the record's new text, or `None` to remove it.
pub type Put = (Table, String, Option<Vec<u8>>);

/// The embedded database file.
pub struct Disk {
    db: Database,
    path: PathBuf,
}

impl Disk {
    /// Opens (or creates) `data_dir/greenlight.redb`, refusing a file another process holds
    /// or one of another layout.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            StoreError::Embedded(format!(
                "cannot create data_dir {}: {error}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join("greenlight.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|error| match error {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Embedded(format!(
                    "{} is in use by another process: each server needs its own data_dir (run \
                 several replicas on Redis instead)",
                    path.display()
                )),
                other => StoreError::Embedded(format!("cannot open {}: {other}", path.display())),
            })?;
        let disk = Self { db, path };
        disk.prepare()?;
        Ok(disk)
    }

    /// Creates the tables and checks (or writes) the layout marker.
    fn prepare(&self) -> Result<(), StoreError> {
        let found = self.get(Table::Meta, "layout")?;
        match found.as_deref() {
            Some(layout) if layout != LAYOUT_VERSION.as_bytes() => {
                Err(StoreError::Embedded(format!(
                    "{} holds layout {} and this version reads layout {LAYOUT_VERSION}: move \
                     the data_dir aside to start afresh (agents keep running what they have and \
                     receive the next green commit)",
                    self.path.display(),
                    String::from_utf8_lossy(layout)
                )))
            }
            Some(_) => Ok(()),
            None => self.write(vec![(
                Table::Meta,
                "layout".to_owned(),
                Some(LAYOUT_VERSION.as_bytes().to_vec()),
            )]),
        }
    }

    /// The record under `key`, if any.
    pub fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let found = self.reading(table, |open| {
            Ok(open
                .get(key)
                .map_err(failed)?
                .map(|value| value.value().to_vec()))
        })?;
        Ok(found.flatten())
    }

    /// Every record of `table`, in key order.
    pub fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut records = Vec::new();
        self.scan_each(table, |key, value| {
            records.push((key.to_owned(), value.to_vec()));
            Ok(())
        })?;
        Ok(records)
    }

    /// Hands every record of `table` to `each`, in key order, without holding them all.
    pub fn scan_each(
        &self,
        table: Table,
        mut each: impl FnMut(&str, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.reading(table, |open| {
            for entry in open.iter().map_err(failed)? {
                let (key, value) = entry.map_err(failed)?;
                each(key.value(), value.value())?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Runs `read` on `table` in a read transaction; `None` when the table was never
    /// created (a file from before it existed, or one nothing was written to yet).
    fn reading<T>(
        &self,
        table: Table,
        read: impl FnOnce(&ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let transaction = self.db.begin_read().map_err(failed)?;
        match transaction.open_table(table.definition()) {
            Ok(open) => read(&open).map(Some),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(error) => Err(failed(error)),
        }
    }

    /// Writes `puts` in one transaction, durable when this returns.
    pub fn write(&self, puts: Vec<Put>) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(failed)?;
        // Only the tables this batch touches are opened.
        for table in Table::ALL {
            let mut changes = puts.iter().filter(|(t, _, _)| *t == table).peekable();
            if changes.peek().is_none() {
                continue;
            }
            let mut open = write.open_table(table.definition()).map_err(failed)?;
            for (_, key, value) in changes {
                match value {
                    Some(value) => open.insert(key.as_str(), value.as_slice()),
                    None => open.remove(key.as_str()),
                }
                .map_err(failed)?;
            }
        }
        write.commit().map_err(failed)
    }

    /// Removes the records of `table` whose value, a Unix ms time, is older than `age`.
    pub fn forget_older(
        &self,
        table: Table,
        age: Duration,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let old: Vec<Put> = self
            .scan(table)?
            .into_iter()
            .filter(|(_, value)| time_of(value).is_none_or(|at| at < cutoff))
            .map(|(key, _)| (table, key, None))
            .collect();
        let removed = old.len();
        if removed > 0 {
            self.write(old)?;
        }
        Ok(removed)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A Unix ms time as the marker tables hold it.
pub fn encode_time(at_ms: i64) -> Vec<u8> {
    at_ms.to_string().into_bytes()
}

/// The Unix ms time of a marker, `None` when unreadable.
pub fn time_of(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Reports, newest first, as one value: each a 4-byte big-endian length and the bytes.
pub fn encode_frames(frames: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        let frame = frame.as_ref();
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&frame[..len as usize]);
    }
    out
}

/// The frames of [`encode_frames`]; `None` when the value is cut short.
pub fn decode_frames(mut value: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut frames = Vec::new();
    while !value.is_empty() {
        let (len, rest) = value.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        frames.push(rest[..len].to_vec());
        value = &rest[len..];
    }
    Some(frames)
}

fn failed(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Embedded(error.into().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_survive_reopening_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path()).unwrap();
        disk.write(vec![
            (Table::Agents, "prod".into(), Some(b"one".to_vec())),
            (Table::Agents, "gone".into(), Some(b"two".to_vec())),
        ])
        .unwrap();
        disk.write(vec![(Table::Agents, "gone".into(), None)])
            .unwrap();
        let refused = Disk::open(dir.path()).err().unwrap().to_string();
        assert!(refused.contains("in use by another process"), "{refused}");
        drop(disk);
        let disk = Disk::open(dir.path()).unwrap();
        assert_eq!(
            disk.scan(Table::Agents).unwrap(),
            [("prod".to_owned(), b"one".to_vec())]
        );
    }

    #[test]
    fn another_layout_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path()).unwrap();
        disk.write(vec![(Table::Meta, "layout".into(), Some(b"1".to_vec()))])
            .unwrap();
        drop(disk);
        let refused = Disk::open(dir.path()).err().unwrap().to_string();
        assert!(refused.contains("move the data_dir aside"), "{refused}");
    }

    #[test]
    fn old_markers_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path()).unwrap();
        disk.write(vec![
            (Table::Deliveries, "old".into(), Some(encode_time(1_000))),
            (Table::Deliveries, "new".into(), Some(encode_time(9_000))),
            (Table::Deliveries, "garbage".into(), Some(b"x".to_vec())),
        ])
        .unwrap();
        let removed = disk
            .forget_older(Table::Deliveries, Duration::from_secs(5), 10_000)
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(disk.scan(Table::Deliveries).unwrap().len(), 1);
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8)) {
            prop_assert_eq!(decode_frames(&encode_frames(&frames)), Some(frames));
        }

        #[test]
        fn cut_frames_are_refused_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_frames(&bytes);
        }
    }
}
