//! openraft storage on sled: one `Db` per node, two trees per group (entries,
//! and the group's vote, committed id and snapshot). Appends from every group
//! go through one [`Flusher`], so a single `flush` makes many groups' entries
//! durable before openraft hears they are (group commit).

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{GroupId, NodeId, TypeConfig};
use ferry_partition::state::GroupState;
use ferry_partition::wire::{self, v1::Response};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

enum FlushRequest {
    /// Entries of one group written at `started`, timed into `latency` once durable.
    Log {
        callback: LogFlushed<TypeConfig>,
        started: Instant,
        latency: metrics::Histogram,
    },
    Sync(oneshot::Sender<Result<(), std::io::Error>>),
}

/// Makes writes durable in batches: every request waiting when a flush starts
/// is answered by that flush.
#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::Sender<FlushRequest>,
}

impl Flusher {
    /// Starts the flush loop on `tracker`; it ends once every handle is dropped
    /// or `cancel` fires, after flushing what it holds.
    pub fn start(db: sled::Db, queue_max: usize, tracker: &TaskTracker, cancel: CancellationToken) -> Flusher {
        let (tx, mut rx) = mpsc::channel::<FlushRequest>(queue_max);
        tracker.spawn(async move {
            let mut pending = Vec::with_capacity(queue_max);
            loop {
                let received = tokio::select! {
                    n = rx.recv_many(&mut pending, queue_max) => n,
                    _ = cancel.cancelled() => {
                        rx.close();
                        rx.recv_many(&mut pending, queue_max).await
                    }
                };
                if received == 0 {
                    let _ = db.flush_async().await;
                    return;
                }
                let started = std::time::Instant::now();
                let result = db.flush_async().await.map(|_| ()).map_err(std::io::Error::other);
                metrics::histogram!("ferry_log_flush_seconds").record(started.elapsed().as_secs_f64());
                metrics::histogram!("ferry_log_flush_batch_size").record(pending.len() as f64);
                for request in pending.drain(..) {
                    let result = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::other(e.to_string())),
                    };
                    match request {
                        FlushRequest::Log { callback, started, latency } => {
                            latency.record(started.elapsed().as_secs_f64());
                            callback.log_io_completed(result);
                        }
                        FlushRequest::Sync(tx) => {
                            let _ = tx.send(result);
                        }
                    }
                }
            }
        });
        Flusher { tx }
    }

    async fn sync(&self) -> Result<(), std::io::Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(FlushRequest::Sync(tx)).await.map_err(|_| std::io::Error::other("flusher stopped"))?;
        rx.await.map_err(|_| std::io::Error::other("flusher stopped"))?
    }
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn tree_names(group: GroupId) -> (String, String) {
    (format!("log-{group}"), format!("meta-{group}"))
}

/// Opens the trees of `group`.
pub fn open(db: &sled::Db, group: GroupId, flusher: Flusher) -> Result<(LogStore, StateMachineStore), crate::Error> {
    let (log_name, meta_name) = tree_names(group);
    let log = db.open_tree(log_name)?;
    let meta = db.open_tree(meta_name)?;
    let sm = StateMachineStore::open(group, meta.clone(), flusher.clone())?;
    let store = LogStore {
        group,
        log,
        meta,
        flusher,
        committed: CommittedIndex::default(),
        append_seconds: metrics::histogram!("ferry_log_append_seconds", "group" => group.to_string()),
    };
    let committed = store.get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten();
    store.committed.set(committed);
    Ok((store, sm))
}

/// The highest log index a group has seen committed, readable while openraft
/// owns the [`LogStore`].
#[derive(Debug, Clone, Default)]
pub struct CommittedIndex(Arc<AtomicU64>);

impl CommittedIndex {
    /// The index, or `None` before anything is committed.
    pub fn get(&self) -> Option<u64> {
        // Stored plus one, so that zero means none.
        self.0.load(Ordering::Relaxed).checked_sub(1)
    }

    fn set(&self, committed: Option<LogId<NodeId>>) {
        self.0.store(committed.map_or(0, |id| id.index + 1), Ordering::Relaxed);
    }
}

/// The Raft log of one group.
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher,
    committed: CommittedIndex,
    /// From an append call until its entries are durable.
    append_seconds: metrics::Histogram,
}

impl LogStore {
    /// The group's committed index, kept current as openraft saves it.
    pub fn committed_index(&self) -> CommittedIndex {
        self.committed.clone()
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(|e| StorageIOError::read(&e))? {
            Some(bytes) => Ok(Some(wire::decode(&bytes).map_err(|e| StorageIOError::read(&e))?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        self.meta.insert(key, wire::encode(value)).map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }
}

fn decode_entry(bytes: &[u8]) -> StorageResult<Entry<TypeConfig>> {
    wire::decode(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(log_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(log_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(log_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(log_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.log
            .range::<[u8; 8], _>((start, end))
            .map(|item| {
                let (_, bytes) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                decode_entry(&bytes)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, bytes)) => Some(decode_entry(&bytes)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(KEY_VOTE, vote)?;
        self.flusher.sync().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not flushed on its own: a lost committed id only means replaying less
        // at start-up until the leader commits again.
        self.put_meta(KEY_COMMITTED, &committed)?;
        self.committed.set(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        // Tests make one group's storage fail here: `log-append-<group>`.
        fail::fail_point!(&format!("log-append-{}", self.group), |_| {
            Err(StorageIOError::write_logs(&std::io::Error::other("injected append failure")).into())
        });
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&log_key(entry.log_id.index), wire::encode(&entry));
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        let latency = self.append_seconds.clone();
        self.flusher
            .tx
            .send(FlushRequest::Log { callback, started, latency })
            .await
            .map_err(|_| StorageIOError::write_logs(&std::io::Error::other("flusher stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(log_key(log_id.index)..).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash in between leaves entries that
        // are ignored, never a gap that is not accounted for.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=log_key(log_id.index)).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log.apply_batch(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        tracing::debug!(group = self.group, index = log_id.index, "log purged");
        Ok(())
    }
}

/// What a group has applied. Shared between the state machine (which writes
/// it) and readers such as the admin API.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: GroupState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine of one group: in memory, rebuilt at start-up from the
/// last snapshot plus the committed log after it.
#[derive(Clone)]
pub struct StateMachineStore {
    group: GroupId,
    applied: Arc<RwLock<Applied>>,
    meta: sled::Tree,
    flusher: Flusher,
    /// Bumped after every applied batch, so readers can wait for changes.
    changes: Arc<watch::Sender<u64>>,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The last log id the stored snapshot covers. Held while a snapshot is
    /// stored, so that a slow build never replaces a newer installed one.
    snapshot_stored: Arc<Mutex<Option<LogId<NodeId>>>>,
    /// `ferry_log_apply_wait_seconds` and `ferry_log_snapshot_encode_seconds`
    /// of this group.
    apply_wait: metrics::Histogram,
    snapshot_encode: metrics::Histogram,
}

impl StateMachineStore {
    fn open(group: GroupId, meta: sled::Tree, flusher: Flusher) -> Result<Self, crate::Error> {
        let mut applied = Applied::default();
        let mut snapshot_stored = None;
        if let Some(bytes) = meta.get(KEY_SNAPSHOT)? {
            let stored: StoredSnapshot = wire::decode(&bytes)?;
            applied = wire::decode(&stored.data)?;
            applied.state.partition.recount();
            snapshot_stored = stored.meta.last_log_id;
        }
        Ok(StateMachineStore {
            group,
            applied: Arc::new(RwLock::new(applied)),
            meta,
            flusher,
            changes: Arc::new(watch::channel(0).0),
            snapshot_seq: Arc::default(),
            snapshot_stored: Arc::new(Mutex::new(snapshot_stored)),
            apply_wait: metrics::histogram!("ferry_log_apply_wait_seconds", "group" => group.to_string()),
            snapshot_encode: metrics::histogram!("ferry_log_snapshot_encode_seconds", "group" => group.to_string()),
        })
    }

    /// Reads the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&Applied) -> R) -> R {
        f(&self.applied.read().expect("state lock poisoned"))
    }

    /// A receiver that sees a new value after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn stored_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        match self.meta.get(KEY_SNAPSHOT).map_err(|e| StorageIOError::read_snapshot(None, &e))? {
            Some(bytes) => Ok(Some(wire::decode(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?)),
            None => Ok(None),
        }
    }

    /// Stores `stored` unless the stored snapshot already covers as much of
    /// the log: a build that read the state before a newer snapshot was
    /// installed must not replace it, or a restart would find the log purged
    /// behind a snapshot that does not reach it. The encoding and the write
    /// run on a blocking thread, never on the runtime's.
    async fn store_snapshot(&self, stored: StoredSnapshot) -> StorageResult<StoredSnapshot> {
        let signature = Some(stored.meta.signature());
        let (group, tree, newest) = (self.group, self.meta.clone(), self.snapshot_stored.clone());
        let (stored, written) = blocking(move || {
            let mut newest = newest.lock().expect("snapshot lock poisoned");
            if newest.is_some() && stored.meta.last_log_id <= *newest {
                tracing::debug!(group, snapshot = %stored.meta.snapshot_id, "a newer snapshot is stored");
                return Ok((stored, false));
            }
            tree.insert(KEY_SNAPSHOT, wire::encode(&stored))
                .map_err(|e| StorageIOError::write_snapshot(Some(stored.meta.signature()), &e))?;
            *newest = stored.meta.last_log_id;
            Ok((stored, true))
        })
        .await?;
        if written {
            self.flusher.sync().await.map_err(|e| StorageIOError::write_snapshot(signature, &e))?;
        }
        Ok(stored)
    }
}

/// Runs `f` on a blocking thread: encoding or decoding a whole state takes
/// long enough to stall the runtime's few threads, and with them every
/// group's heartbeats.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StorageResult<T> + Send + 'static) -> StorageResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StorageIOError::read_state_machine(&e))?
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (applied, encode_seconds) = (self.applied.clone(), self.snapshot_encode.clone());
        let (data, last_log_id, last_membership) = blocking(move || {
            let applied = applied.read().expect("state lock poisoned");
            let started = Instant::now();
            let encoded = (wire::encode(&*applied), applied.last_applied, applied.membership.clone());
            encode_seconds.record(started.elapsed().as_secs_f64());
            Ok(encoded)
        })
        .await?;
        // Tests hold a build here, between reading the state and storing it.
        fail::fail_point!("snapshot-build-before-store");
        let seq = self.snapshot_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{}-{seq}", self.group, id.leader_id, id.index),
            None => format!("{}-none-{seq}", self.group),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let stored = self.store_snapshot(StoredSnapshot { meta: meta.clone(), data }).await?;
        metrics::gauge!("ferry_log_snapshot_bytes", "group" => self.group.to_string()).set(stored.data.len() as f64);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let applied = self.applied.read().expect("state lock poisoned");
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Tests hold one group's apply here: `apply-<group>`.
        fail::fail_point!(&format!("apply-{}", self.group));
        // On a blocking thread: while a snapshot build reads the state, the
        // apply waits there, not on one of the runtime's threads.
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let (applied, wait_seconds) = (self.applied.clone(), self.apply_wait.clone());
        let responses = blocking(move || {
            // How long apply waits for the state: a snapshot encoding holds it.
            let waiting = Instant::now();
            let mut applied = applied.write().expect("state lock poisoned");
            wait_seconds.record(waiting.elapsed().as_secs_f64());
            let mut responses = Vec::with_capacity(entries.len());
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => Response::Empty,
                    EntryPayload::Normal(command) => applied.state.apply(command),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Response::Empty
                    }
                };
                responses.push(response);
            }
            Ok(responses)
        })
        .await?;
        self.changes.send_modify(|v| *v += 1);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let signature = Some(meta.signature());
        let (mut installed, data) = blocking(move || {
            let mut installed: Applied =
                wire::decode(&data).map_err(|e| StorageIOError::read_snapshot(signature, &e))?;
            installed.state.partition.recount();
            Ok((installed, data))
        })
        .await?;
        // The snapshot's meta is authoritative for what it covers.
        installed.last_applied = meta.last_log_id;
        installed.membership = meta.last_membership.clone();
        self.store_snapshot(StoredSnapshot { meta: meta.clone(), data }).await?;
        *self.applied.write().expect("state lock poisoned") = installed;
        self.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self
            .stored_snapshot()?
            .map(|stored| Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}
