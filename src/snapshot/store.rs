//! Snapshot metadata in a redb database.
//!
//! One table maps snapshot names to JSON records; another holds the id counter. A
//! snapshot exists exactly when its record is committed; directories on disk are named
//! by id and made to agree with the records (see `overlay.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Info, Kind, Labels, SnapshotError, Usage};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// Names a snapshot's directory, root/snapshots/<id>. Allocated by the store and never
/// reused, so a directory left by a crash can never be mistaken for a later snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub(super) struct SnapshotId(u64);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A point in time stored as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Timestamp {
    secs: u64,
    nanos: u32,
}

impl Timestamp {
    pub(super) fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self {
            secs: since_epoch.as_secs(),
            nanos: since_epoch.subsec_nanos(),
        }
    }

    fn to_system_time(self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(self.secs, self.nanos)
    }
}

/// Everything stored about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    pub id: SnapshotId,
    pub kind: Kind,
    /// Empty when there is no parent.
    pub parent: String,
    pub labels: Labels,
    pub created: Timestamp,
    pub updated: Timestamp,
    /// Measured when the snapshot was committed.
    pub usage: Option<Usage>,
    /// Set for snapshots whose contents come from the remote-layer hook.
    pub remote_dir: Option<PathBuf>,
}

impl Record {
    pub(super) fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created_at: self.created.to_system_time(),
            updated_at: self.updated.to_system_time(),
        }
    }
}

pub(super) struct Store {
    db: redb::Database,
    path: PathBuf,
}

fn store_error<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(redb::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Store {
        path: path.to_owned(),
        operation,
        source: Box::new(source),
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|error| SnapshotError::Corrupt {
        key: name.to_owned(),
        reason: error.to_string(),
    })
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub(super) fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = redb::Database::create(path)
            .map_err(redb::Error::from)
            .map_err(store_error(path, "open"))?;
        let store = Self {
            db,
            path: path.to_owned(),
        };
        // Create the tables once so read transactions never meet a missing table.
        let txn = store.begin()?;
        txn.open_snapshots()?;
        txn.open_counters()?;
        txn.commit()?;
        Ok(store)
    }

    pub(super) fn begin(&self) -> Result<WriteTxn<'_>, SnapshotError> {
        let txn = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .map_err(store_error(&self.path, "begin write"))?;
        Ok(WriteTxn { txn, store: self })
    }

    fn read_table<T>(
        &self,
        use_table: impl FnOnce(
            &redb::ReadOnlyTable<&'static str, &'static [u8]>,
        ) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let txn = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(store_error(&self.path, "begin read"))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.path, "open table"))?;
        use_table(&table)
    }

    pub(super) fn get(&self, name: &str) -> Result<Option<Record>, SnapshotError> {
        self.read_table(|table| {
            let value = table
                .get(name)
                .map_err(redb::Error::from)
                .map_err(store_error(&self.path, "read"))?;
            value.map(|bytes| decode(name, bytes.value())).transpose()
        })
    }

    /// All snapshots, ordered by name.
    pub(super) fn all(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        self.read_table(|table| {
            let iter = table
                .iter()
                .map_err(redb::Error::from)
                .map_err(store_error(&self.path, "list"))?;
            let mut records = Vec::new();
            for entry in iter {
                let (name, bytes) = entry
                    .map_err(redb::Error::from)
                    .map_err(store_error(&self.path, "list"))?;
                records.push((
                    name.value().to_owned(),
                    decode(name.value(), bytes.value())?,
                ));
            }
            Ok(records)
        })
    }

    /// The snapshot and its ancestors, nearest first, read in one transaction so the chain
    /// is consistent.
    pub(super) fn chain(&self, name: &str) -> Result<Vec<(String, Record)>, SnapshotError> {
        self.read_table(|table| {
            let mut chain: Vec<(String, Record)> = Vec::new();
            let mut next = name.to_owned();
            loop {
                let value = table
                    .get(next.as_str())
                    .map_err(redb::Error::from)
                    .map_err(store_error(&self.path, "read"))?;
                let Some(bytes) = value else {
                    return match chain.last() {
                        None => Err(SnapshotError::NotFound { key: next }),
                        Some((child, _)) => Err(SnapshotError::Corrupt {
                            key: child.clone(),
                            reason: format!("its parent {next:?} is missing"),
                        }),
                    };
                };
                let record = decode(&next, bytes.value())?;
                let parent = record.parent.clone();
                if chain.len() > 10_000 {
                    return Err(SnapshotError::Corrupt {
                        key: name.to_owned(),
                        reason: "parent chain loops".to_owned(),
                    });
                }
                chain.push((next, record));
                if parent.is_empty() {
                    return Ok(chain);
                }
                next = parent;
            }
        })
    }
}

/// One write transaction; nothing is visible until [`WriteTxn::commit`].
pub(super) struct WriteTxn<'s> {
    txn: redb::WriteTransaction,
    store: &'s Store,
}

impl WriteTxn<'_> {
    fn open_snapshots(
        &self,
    ) -> Result<redb::Table<'_, &'static str, &'static [u8]>, SnapshotError> {
        self.txn
            .open_table(SNAPSHOTS)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "open table"))
    }

    fn open_counters(&self) -> Result<redb::Table<'_, &'static str, u64>, SnapshotError> {
        self.txn
            .open_table(COUNTERS)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "open table"))
    }

    pub(super) fn get(&self, name: &str) -> Result<Option<Record>, SnapshotError> {
        let table = self.open_snapshots()?;
        let value = table
            .get(name)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "read"))?;
        value.map(|bytes| decode(name, bytes.value())).transpose()
    }

    pub(super) fn put(&self, name: &str, record: &Record) -> Result<(), SnapshotError> {
        let bytes = serde_json::to_vec(record).map_err(|error| SnapshotError::Corrupt {
            key: name.to_owned(),
            reason: format!("cannot encode record: {error}"),
        })?;
        let mut table = self.open_snapshots()?;
        table
            .insert(name, bytes.as_slice())
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "write"))?;
        Ok(())
    }

    pub(super) fn delete(&self, name: &str) -> Result<(), SnapshotError> {
        let mut table = self.open_snapshots()?;
        table
            .remove(name)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "delete"))?;
        Ok(())
    }

    /// Some snapshot whose parent is `name`, if any.
    pub(super) fn first_child(&self, name: &str) -> Result<Option<String>, SnapshotError> {
        let table = self.open_snapshots()?;
        let iter = table
            .iter()
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "list"))?;
        for entry in iter {
            let (child, bytes) = entry
                .map_err(redb::Error::from)
                .map_err(store_error(&self.store.path, "list"))?;
            if decode(child.value(), bytes.value())?.parent == name {
                return Ok(Some(child.value().to_owned()));
            }
        }
        Ok(None)
    }

    /// A fresh id, never handed out before in a committed transaction.
    pub(super) fn next_id(&self) -> Result<SnapshotId, SnapshotError> {
        let mut counters = self.open_counters()?;
        let id = counters
            .get(NEXT_ID)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "read"))?
            .map_or(1, |value| value.value());
        counters
            .insert(NEXT_ID, id + 1)
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "write"))?;
        Ok(SnapshotId(id))
    }

    /// Makes every change durable (redb's default durability syncs before returning).
    pub(super) fn commit(self) -> Result<(), SnapshotError> {
        self.txn
            .commit()
            .map_err(redb::Error::from)
            .map_err(store_error(&self.store.path, "commit"))
    }
}
