//! openraft storage. The log is in sled: one `Db` per node, two trees per
//! group (entries, and the group's vote and committed id). Appends from every
//! group go through one [`Flusher`], so a single `flush` makes many groups'
//! entries durable before openraft hears they are (group commit). The state
//! machine's tables are in redb, one database per group ([`crate::tables`]).

use std::fmt::Debug;
use std::future::Future;
use std::io::SeekFrom;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use ferry_store::codec as wire;
use ferry_store::StoreError;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::Database;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::machine::{StateMachine, TypeConfig};
use crate::tables::{self, ReadTables, WriteTables};
use crate::{GroupId, NodeId};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

enum FlushRequest<M: StateMachine> {
    /// Entries of one group written at `started`, timed into `latency` once durable.
    Log {
        callback: LogFlushed<TypeConfig<M>>,
        started: Instant,
        latency: metrics::Histogram,
    },
    Sync(oneshot::Sender<Result<(), std::io::Error>>),
}

/// Makes writes durable in batches: every request waiting when a flush starts
/// is answered by that flush.
pub struct Flusher<M: StateMachine> {
    tx: mpsc::Sender<FlushRequest<M>>,
}

impl<M: StateMachine> Clone for Flusher<M> {
    fn clone(&self) -> Self {
        Flusher { tx: self.tx.clone() }
    }
}

impl<M: StateMachine> Flusher<M> {
    /// Starts the flush loop on `tracker`; it ends once every handle is dropped
    /// or `cancel` fires, after flushing what it holds.
    pub fn start(db: sled::Db, queue_max: usize, tracker: &TaskTracker, cancel: CancellationToken) -> Flusher<M> {
        let (tx, mut rx) = mpsc::channel::<FlushRequest<M>>(queue_max);
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
pub struct LogStore<M: StateMachine> {
    group: GroupId,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher<M>,
    committed: CommittedIndex,
    /// From an append call until its entries are durable.
    append_seconds: metrics::Histogram,
}

impl<M: StateMachine> Clone for LogStore<M> {
    fn clone(&self) -> Self {
        LogStore {
            group: self.group,
            log: self.log.clone(),
            meta: self.meta.clone(),
            flusher: self.flusher.clone(),
            committed: self.committed.clone(),
            append_seconds: self.append_seconds.clone(),
        }
    }
}

impl<M: StateMachine> LogStore<M> {
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

fn decode_entry<M: StateMachine>(bytes: &[u8]) -> StorageResult<Entry<TypeConfig<M>>> {
    wire::decode(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl<M: StateMachine> RaftLogReader<TypeConfig<M>> for LogStore<M> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig<M>>>> {
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

impl<M: StateMachine> RaftLogStorage<TypeConfig<M>> for LogStore<M> {
    type LogReader = LogStore<M>;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig<M>>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, bytes)) => Some(decode_entry::<M>(&bytes)?.log_id),
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

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig<M>>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig<M>>> + OptionalSend,
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

/// Where and how a node keeps its groups' state.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// The directory of the state databases, one file per group.
    pub dir: PathBuf,
    /// The page cache of each group's database.
    pub cache_bytes: usize,
}

/// How often apply makes the state durable. Between those commits the state
/// on disk may lag what was applied: a restart replays the log from what is
/// durable, and the log is purged only behind it. A durable commit writes out
/// what the commits since the last one changed, and also costs in proportion
/// to the database (redb's allocator state, for a quick repair): made four
/// times a second, each took longer on average than one a second does.
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// What a group has applied, as readers see it: updated after each commit.
#[derive(Debug, Default, Clone)]
pub struct Applied<R> {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// The state machine's resident part.
    pub resident: R,
}

/// The state machine of one group, in its redb database. Apply writes each
/// batch in one transaction; readers, digests and snapshots read a
/// consistent view without stopping it.
pub struct StateMachineStore<M: StateMachine> {
    group: GroupId,
    options: StateOptions,
    machine: Arc<M>,
    /// Replaced when a snapshot is installed.
    db: Arc<RwLock<Arc<Database>>>,
    applied: Arc<RwLock<Applied<M::Resident>>>,
    last_durable: Arc<Mutex<Instant>>,
    /// Bumped after every applied batch, so readers can wait for changes.
    changes: Arc<watch::Sender<u64>>,
    /// `ferry_log_apply_wait_seconds` (waiting to write) and
    /// `ferry_log_apply_seconds` (writing and committing a batch) of this group.
    apply_wait: metrics::Histogram,
    apply_seconds: metrics::Histogram,
    /// `ferry_log_state_durable_commit_seconds`: the commits that make the
    /// state durable (an fsync).
    durable_commit: metrics::Histogram,
}

impl<M: StateMachine> Clone for StateMachineStore<M> {
    fn clone(&self) -> Self {
        StateMachineStore {
            group: self.group,
            options: self.options.clone(),
            machine: self.machine.clone(),
            db: self.db.clone(),
            applied: self.applied.clone(),
            last_durable: self.last_durable.clone(),
            changes: self.changes.clone(),
            apply_wait: self.apply_wait.clone(),
            apply_seconds: self.apply_seconds.clone(),
            durable_commit: self.durable_commit.clone(),
        }
    }
}

fn db_path(options: &StateOptions, group: GroupId) -> PathBuf {
    options.dir.join(format!("{group}.redb"))
}

/// Where a snapshot is installed before it replaces the group's database.
fn installing_path(options: &StateOptions, group: GroupId) -> PathBuf {
    options.dir.join(format!("{group}.redb.installing"))
}

fn storage_error(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::<NodeId>::write_state_machine(&e).into()
}

impl<M: StateMachine> StateMachineStore<M> {
    fn open(group: GroupId, machine: M, options: StateOptions) -> Result<Self, crate::Error> {
        std::fs::create_dir_all(&options.dir).map_err(|e| StoreError(format!("{}: {e}", options.dir.display())))?;
        // An install that did not finish.
        let _ = std::fs::remove_file(installing_path(&options, group));
        let db = tables::open_db::<M::Tables>(&db_path(&options, group), options.cache_bytes)?;
        let db = Arc::new(db);
        let applied = read_applied::<M>(&ReadTables::open(db.clone())?)?;
        Ok(StateMachineStore {
            group,
            options,
            machine: Arc::new(machine),
            db: Arc::new(RwLock::new(db)),
            applied: Arc::new(RwLock::new(applied)),
            last_durable: Arc::new(Mutex::new(Instant::now())),
            changes: Arc::new(watch::channel(0).0),
            apply_wait: metrics::histogram!("ferry_log_apply_wait_seconds", "group" => group.to_string()),
            apply_seconds: metrics::histogram!("ferry_log_apply_seconds", "group" => group.to_string()),
            durable_commit: metrics::histogram!(
                "ferry_log_state_durable_commit_seconds",
                "group" => group.to_string()
            ),
        })
    }

    fn db(&self) -> Arc<Database> {
        self.db.read().expect("state db lock poisoned").clone()
    }

    /// The last log id applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.applied.read().expect("state lock poisoned").last_applied
    }

    /// Reads the applied resident part of the state.
    pub fn read_resident<R>(&self, f: impl FnOnce(&M::Resident) -> R) -> R {
        f(&self.applied.read().expect("state lock poisoned").resident)
    }

    /// Reads a consistent view of the applied tables.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&M, &ReadTables<M::Tables>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let view = ReadTables::open(self.db())?;
        f(&self.machine, &view)
    }

    /// The digest of the group's state ([`StateMachine::digest`]) and the
    /// index it was applied to, read from one view.
    pub fn digest(&self) -> Result<(Option<u64>, u128), StoreError> {
        let view = ReadTables::open(self.db())?;
        let applied = read_applied::<M>(&view)?;
        let digest = self.machine.digest(&view, &applied.resident)?;
        Ok((applied.last_applied.map(|id| id.index), digest))
    }

    /// Makes everything applied so far durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (db, last_durable) = (self.db(), self.last_durable.clone());
        tokio::task::spawn_blocking(move || {
            tables::sync(&db)?;
            *last_durable.lock().expect("durable lock poisoned") = Instant::now();
            Ok(())
        })
        .await
        .map_err(tables::store_error)?
    }

    /// The machine that applies this group's commands.
    pub fn machine(&self) -> Arc<M> {
        self.machine.clone()
    }

    /// A receiver that sees a new value after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The snapshot of what `view` holds.
    fn snapshot_of(&self, view: ReadTables<M::Tables>) -> StorageResult<Snapshot<TypeConfig<M>>> {
        let applied = read_applied::<M>(&view).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let snapshot_id = match applied.last_applied {
            Some(last) => format!("{}-{}-{}", self.group, last.leader_id, last.index),
            None => format!("{}-none", self.group),
        };
        let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership, snapshot_id };
        let (dir, group) = (self.options.dir.clone(), self.group);
        let dump = move || {
            let started = Instant::now();
            let mut file = tempfile::tempfile_in(&dir)?;
            view.dump(&mut file)?;
            let bytes = std::io::Seek::seek(&mut file, SeekFrom::Current(0))?;
            std::io::Seek::seek(&mut file, SeekFrom::Start(0))?;
            metrics::counter!("ferry_log_snapshot_dumps_total", "group" => group.to_string()).increment(1);
            metrics::gauge!("ferry_log_snapshot_bytes", "group" => group.to_string()).set(bytes as f64);
            tracing::info!(group, bytes, seconds = started.elapsed().as_secs_f64(), "snapshot written out to send");
            Ok(file)
        };
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::view(dump)) })
    }
}

/// The group's own rows of a view.
fn read_applied<M: StateMachine>(view: &ReadTables<M::Tables>) -> Result<Applied<M::Resident>, StoreError> {
    let (last_applied, membership) = match view.get_group(tables::APPLIED)? {
        Some(bytes) => wire::decode(&bytes)?,
        None => (None, StoredMembership::default()),
    };
    let resident = match view.get_group(tables::RESIDENT)? {
        Some(bytes) => wire::decode(&bytes)?,
        None => M::Resident::default(),
    };
    Ok(Applied { last_applied, membership, resident })
}

/// Opens the trees of `group` and its state, applied by `machine`.
pub fn open<M: StateMachine>(
    db: &sled::Db,
    group: GroupId,
    machine: M,
    flusher: Flusher<M>,
    state: StateOptions,
) -> Result<(LogStore<M>, StateMachineStore<M>), crate::Error> {
    let (log_name, meta_name) = tree_names(group);
    let log = db.open_tree(log_name)?;
    let meta = db.open_tree(meta_name)?;
    let sm = StateMachineStore::open(group, machine, state)?;
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

/// Runs `f` on a blocking thread: apply, commits and snapshot dumps and
/// loads may wait for the disk, and must not hold the runtime's few threads
/// (and with them every group's heartbeats).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StorageResult<T> + Send + 'static) -> StorageResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StorageIOError::read_state_machine(&e))?
}

impl<M: StateMachine> RaftSnapshotBuilder<TypeConfig<M>> for StateMachineStore<M> {
    /// A snapshot is a view of the state as applied now, made durable first
    /// so that the log may be purged behind it. Building one copies nothing:
    /// the view is written out only when a follower needs it.
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig<M>>> {
        let db = self.db();
        let view =
            blocking(move || ReadTables::open(db).map_err(|e| StorageIOError::read_snapshot(None, &e).into())).await?;
        // Tests hold a build here, between taking its view and making it durable.
        fail::fail_point!("snapshot-build-before-sync");
        self.sync().await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.snapshot_of(view)
    }
}

impl<M: StateMachine> RaftStateMachine<TypeConfig<M>> for StateMachineStore<M> {
    type SnapshotBuilder = StateMachineStore<M>;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let applied = self.applied.read().expect("state lock poisoned");
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<M::Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig<M>>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Tests hold one group's apply here: `apply-<group>`.
        fail::fail_point!(&format!("apply-{}", self.group));
        let entries: Vec<Entry<TypeConfig<M>>> = entries.into_iter().collect();
        let this = self.clone();
        let responses = blocking(move || this.apply_batch(entries).map_err(storage_error)).await?;
        self.changes.send_modify(|v| *v += 1);
        self.machine.published();
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<SnapshotData>> {
        let dir = self.options.dir.clone();
        let file =
            blocking(move || tempfile::tempfile_in(&dir).map_err(|e| StorageIOError::write_snapshot(None, &e).into()))
                .await?;
        Ok(Box::new(SnapshotData::file(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> StorageResult<()> {
        let signature = Some(meta.signature());
        let file = snapshot.into_file().await.map_err(|e| StorageIOError::read_snapshot(signature.clone(), &e))?;
        let (this, installing) = (self.clone(), meta.clone());
        let installed = blocking(move || {
            this.install(&installing, file)
                .map_err(|e| StorageIOError::write_snapshot(Some(installing.signature()), &e).into())
        })
        .await?;
        let (db, applied) = installed;
        *self.db.write().expect("state db lock poisoned") = db;
        *self.applied.write().expect("state lock poisoned") = applied;
        *self.last_durable.lock().expect("durable lock poisoned") = Instant::now();
        self.changes.send_modify(|v| *v += 1);
        self.machine.replaced();
        metrics::counter!("ferry_log_snapshots_installed_total", "group" => self.group.to_string()).increment(1);
        tracing::info!(group = self.group, snapshot = %meta.snapshot_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig<M>>>> {
        let db = self.db();
        let view =
            blocking(move || ReadTables::open(db).map_err(|e| StorageIOError::read_snapshot(None, &e).into())).await?;
        // Nothing applied, nothing to send.
        let snapshot = self.snapshot_of(view)?;
        Ok(snapshot.meta.last_log_id.is_some().then_some(snapshot))
    }
}

impl<M: StateMachine> StateMachineStore<M> {
    /// Applies `entries` in one write transaction and publishes the result.
    fn apply_batch(&self, entries: Vec<Entry<TypeConfig<M>>>) -> Result<Vec<M::Response>, StoreError> {
        let db = self.db();
        let waiting = Instant::now();
        let mut txn = db.begin_write().map_err(tables::store_error)?;
        let started = Instant::now();
        self.apply_wait.record(started.duration_since(waiting).as_secs_f64());
        let durable = self.last_durable.lock().expect("durable lock poisoned").elapsed() >= DURABLE_EVERY;
        if durable {
            txn.set_quick_repair(true);
        } else {
            txn.set_durability(redb::Durability::None).map_err(tables::store_error)?;
        }
        let mut applied = self.applied.read().expect("state lock poisoned").clone();
        let mut responses = Vec::with_capacity(entries.len());
        {
            let mut tables = WriteTables::<M::Tables>::open(&txn)?;
            let mut resident_changed = false;
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => M::empty_response(),
                    EntryPayload::Normal(command) => {
                        resident_changed |= M::changes_resident(&command);
                        self.machine.apply(&mut tables, &mut applied.resident, command)?
                    }
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        M::empty_response()
                    }
                };
                responses.push(response);
            }
            tables.put_group(tables::APPLIED, &wire::encode(&(applied.last_applied, &applied.membership)))?;
            if resident_changed {
                tables.put_group(tables::RESIDENT, &wire::encode(&applied.resident))?;
            }
        }
        let committing = Instant::now();
        txn.commit().map_err(tables::store_error)?;
        if durable {
            *self.last_durable.lock().expect("durable lock poisoned") = Instant::now();
            self.durable_commit.record(committing.elapsed().as_secs_f64());
        }
        self.apply_seconds.record(started.elapsed().as_secs_f64());
        *self.applied.write().expect("state lock poisoned") = applied;
        Ok(responses)
    }

    /// Loads a snapshot into a new database beside the group's, then puts it
    /// in its place: a crash before that leaves the old state whole, one
    /// after leaves the new one.
    fn install(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        file: std::fs::File,
    ) -> Result<(Arc<Database>, Applied<M::Resident>), StoreError> {
        let (path, installing) = (db_path(&self.options, self.group), installing_path(&self.options, self.group));
        let io = |e: std::io::Error| StoreError(format!("{}: {e}", installing.display()));
        match std::fs::remove_file(&installing) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let db = tables::open_db::<M::Tables>(&installing, self.options.cache_bytes)?;
        let applied_row = wire::encode(&(meta.last_log_id, &meta.last_membership));
        tables::load::<M::Tables>(&db, file, |tables| tables.put_group(tables::APPLIED, &applied_row))?;
        std::fs::rename(&installing, &path).map_err(io)?;
        std::fs::File::open(&self.options.dir).and_then(|dir| dir.sync_all()).map_err(io)?;
        let db = Arc::new(db);
        let applied = read_applied::<M>(&ReadTables::open(db.clone())?)?;
        Ok((db, applied))
    }
}

/// The bytes of a snapshot as openraft moves them. A snapshot built here is
/// a view that is written to an unnamed file only when it is first read;
/// one being received is such a file from the start. Either way a snapshot
/// is never held in memory whole.
pub struct SnapshotData {
    state: DataState,
    /// A seek started before the file was there.
    seek: Option<SeekFrom>,
}

type Dump = Box<dyn FnOnce() -> std::io::Result<std::fs::File> + Send>;

enum DataState {
    View(Option<Dump>),
    Dumping(tokio::task::JoinHandle<std::io::Result<std::fs::File>>),
    File(tokio::fs::File),
}

impl SnapshotData {
    fn view(dump: impl FnOnce() -> std::io::Result<std::fs::File> + Send + 'static) -> Self {
        SnapshotData { state: DataState::View(Some(Box::new(dump))), seek: None }
    }

    fn file(file: std::fs::File) -> Self {
        SnapshotData { state: DataState::File(tokio::fs::File::from_std(file)), seek: None }
    }

    /// Drives the snapshot to its file: starts or waits for the dump of a view.
    fn poll_file(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            match &mut self.state {
                DataState::View(dump) => {
                    let dump = dump.take().expect("a view is dumped once");
                    self.state = DataState::Dumping(tokio::task::spawn_blocking(dump));
                }
                DataState::Dumping(dumping) => {
                    let file = ready!(Pin::new(dumping).poll(cx)).map_err(std::io::Error::other)??;
                    self.state = DataState::File(tokio::fs::File::from_std(file));
                }
                DataState::File(_) => return Poll::Ready(Ok(())),
            }
        }
    }

    fn file_mut(&mut self) -> &mut tokio::fs::File {
        match &mut self.state {
            DataState::File(file) => file,
            _ => unreachable!("polled to its file first"),
        }
    }

    /// The snapshot's file, from its start.
    async fn into_file(mut self) -> std::io::Result<std::fs::File> {
        std::future::poll_fn(|cx| self.poll_file(cx)).await?;
        let DataState::File(mut file) = self.state else { unreachable!("polled to its file") };
        file.flush().await?;
        file.seek(SeekFrom::Start(0)).await?;
        Ok(file.into_std().await)
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_file(cx))?;
        Pin::new(this.file_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_file(cx))?;
        Pin::new(this.file_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_file(cx))?;
        Pin::new(this.file_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_file(cx))?;
        Pin::new(this.file_mut()).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        self.get_mut().seek = Some(position);
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        let this = self.get_mut();
        ready!(this.poll_file(cx))?;
        if let Some(position) = this.seek.take() {
            Pin::new(this.file_mut()).start_seek(position)?;
        }
        Pin::new(this.file_mut()).poll_complete(cx)
    }
}
